"""The meta-optimizer: meta-learning inside an existing training loop.

    model = ConvNet(1, 5, 64, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = pymaml.MetaOptimizer(model, opt, algorithm="maml", loss_fn=F.cross_entropy,
                                inner_lr=0.4, inner_steps=1)
    for x_s, y_s, x_q, y_q in batches:          # task-stacked tensors, or a list of Task
        stats = meta.step((x_s, y_s, x_q, y_q))  # zero_grad, meta-gradient into .grad, opt.step()

``step`` is ``zero_grad`` + :meth:`MetaOptimizer.backward` + (optional clipping) + the outer
optimizer's ``step()``. Code that wants its own clipping, schedulers, gradient accumulation or DDP
all-reduce in between calls :meth:`backward` instead: it only ADDS the meta-gradient into ``.grad``
of the model's parameters and of the algorithm's learned step sizes (as ``loss.backward()`` would)
and leaves the optimizer alone. The learned step sizes (Meta-SGD, MAML++) are added to the outer
optimizer as an extra parameter group when it does not hold them yet.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import ops
from .algorithms import Algorithm, make

__all__ = ["MetaOptimizer"]


class MetaOptimizer:
    """Meta-gradients for ``model`` with ``algorithm``, stepped by ``outer_optimizer``.

    Args:
        model: the nn.Module whose parameters θ are meta-learned.
        outer_optimizer: any ``torch.optim.Optimizer`` over (at least) the model's parameters.
        algorithm: a name from :data:`pymaml.algorithms.ALGORITHMS` or an :class:`Algorithm`.
        loss_fn: ``loss_fn(output, target) -> scalar`` (required with an algorithm name).
        max_grad_norm: clip the global norm of every meta-gradient in :meth:`step` (None: no clip).
        step_size_lr: outer learning rate of the learned step sizes' group (default: the first
            group's ``lr``).
        **settings: the algorithm's settings (``inner_lr``, ``inner_steps``, ``engine``, ...).
    """

    def __init__(self, model: nn.Module, outer_optimizer: torch.optim.Optimizer,
                 algorithm: Union[str, Algorithm] = "maml", loss_fn: Optional[Callable] = None, *,
                 max_grad_norm: Optional[float] = None, step_size_lr: Optional[float] = None, **settings):
        if isinstance(algorithm, Algorithm):
            if settings or loss_fn is not None:
                raise ValueError("MetaOptimizer: pass settings and loss_fn to the Algorithm, not here, "
                                 f"when giving an Algorithm instance (got {sorted(settings)})")
            self.algorithm = algorithm
        else:
            if loss_fn is None:
                raise ValueError(f"MetaOptimizer: loss_fn is required with algorithm={algorithm!r}")
            self.algorithm = make(algorithm, model, loss_fn, **settings)
        if self.algorithm.model is not model:
            raise ValueError("MetaOptimizer: the algorithm was built for another model")
        self.model, self.optimizer, self.max_grad_norm = model, outer_optimizer, max_grad_norm
        held = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
        extra = [p for p in self.algorithm.parameters() if id(p) not in held]
        if extra:
            lr = step_size_lr if step_size_lr is not None else outer_optimizer.param_groups[0]["lr"]
            outer_optimizer.add_param_group({"params": extra, "lr": lr})
        self.last_info: Dict[str, object] = {}

    def parameters(self):
        """Every tensor that receives a meta-gradient: the model's, then the algorithm's."""
        yield from self.model.parameters()
        yield from self.algorithm.parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @staticmethod
    def _accumulate(p: Tensor, g: Tensor) -> None:
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)

    def backward(self, tasks) -> Dict[str, float]:
        """Adds the meta-gradient of the mean query loss over ``tasks`` into ``.grad``; returns
        ``{"query_loss", "support_loss"[, "accuracy"]}`` (accuracy for integer class targets)."""
        res = self.algorithm.meta_gradient(tasks)
        for name, p in self.model.named_parameters():
            g = res.grads.get(name)
            if g is not None and p.requires_grad:
                self._accumulate(p, g)
        own = dict(self.algorithm.named_parameters())
        for name, g in res.extra_grads.items():
            self._accumulate(own[name], g)
        self.last_info = dict(res.info)
        stats = {"query_loss": float(res.query_loss), "support_loss": float(res.support_loss)}
        acc = query_accuracy(tasks, res.query_outputs)
        if acc is not None:
            stats["accuracy"] = acc
        return stats

    def step(self, tasks) -> Dict[str, float]:
        """zero_grad, :meth:`backward`, optional clipping, ``outer_optimizer.step()``."""
        self.zero_grad()
        stats = self.backward(tasks)
        if self.max_grad_norm is not None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            stats["grad_norm"] = float(ops.clip_grad_norm_(grads, self.max_grad_norm))
        self.optimizer.step()
        return stats

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.optimizer.load_state_dict(state["optimizer"])


def query_accuracy(tasks, outputs) -> Optional[float]:
    """Mean query accuracy when targets are class indices and outputs are logits, else None."""
    from .algorithms.base import task_list
    if not outputs or outputs[0].dim() < 2 or outputs[0].shape[-1] < 2:
        return None
    tl = task_list(tasks)
    if tl[0].query[1].dtype not in (torch.int64, torch.int32):
        return None
    correct = sum(float((o.argmax(-1) == t.query[1]).float().mean()) for o, t in zip(outputs, tl))
    return correct / len(tl)
