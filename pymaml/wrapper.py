"""A learn2learn-style wrapper, so that learn2learn MAML scripts run by changing the import.

    maml = pymaml.MAML(model, lr=0.4, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    for task in batch:
        learner = maml.clone()                       # θ, still connected to the graph
        learner.adapt(loss_fn(learner(x_s), y_s))    # θ' = θ − α ∇L_s (fused pymaml.ops.sgd_update)
        (loss_fn(learner(x_q), y_q) / len(batch)).backward()
    opt.step()

``clone()`` shares the module (and its buffers) and holds the parameters as differentiable tensors;
``adapt`` keeps the graph (second order) unless ``first_order=True``. This is the unrolled path:
memory grows with the number of adaptation steps. For the memory-flat exact engine use
:class:`pymaml.MetaOptimizer` or :func:`pymaml.functional.meta_gradient`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["MAML"]


class MAML(nn.Module):
    """learn2learn's ``MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False)``."""

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False,
                 allow_unused: Optional[bool] = None, allow_nograd: bool = False):
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self.__dict__["_fast"] = None  # name -> Tensor for clones, None for the original

    def _current(self) -> Dict[str, Tensor]:
        return self._fast if self._fast is not None else dict(self.module.named_parameters())

    def forward(self, *args, **kwargs):
        if self._fast is None:
            return self.module(*args, **kwargs)
        return torch.func.functional_call(self.module, self._fast, args, kwargs)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A learner whose parameters are differentiable copies of the current ones."""
        new = MAML.__new__(MAML)
        nn.Module.__init__(new)
        new.module = self.module
        new.lr = self.lr
        new.first_order = self.first_order if first_order is None else first_order
        new.allow_unused = self.allow_unused if allow_unused is None else allow_unused
        new.allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        new.__dict__["_fast"] = {n: p.clone() for n, p in self._current().items()}
        return new

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One SGD step on ``loss``: θ ← θ − lr ∇θ loss, differentiable unless first order."""
        if self._fast is None:
            raise RuntimeError("MAML.adapt: call clone() first and adapt the clone (the original holds θ)")
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        names = [n for n, p in self._fast.items() if p.requires_grad or not allow_nograd]
        params = [self._fast[n] for n in names]
        if not allow_nograd and any(not p.requires_grad for p in params):
            bad = [n for n, p in zip(names, params) if not p.requires_grad]
            raise RuntimeError(f"MAML.adapt: parameters {bad} do not require grad; pass allow_nograd=True")
        grads = torch.autograd.grad(loss, params, retain_graph=not first_order, create_graph=not first_order,
                                    allow_unused=allow_unused)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        new = ops.sgd_update(params, grads, self.lr)
        self._fast.update(zip(names, new))
