"""What every algorithm shares: settings, learned step sizes, the meta-gradient call, evaluation.

An :class:`Algorithm` is an ``nn.Module`` that holds only what the algorithm itself learns (e.g.
Meta-SGD's step sizes) and counters it needs (``iteration`` for MAML++'s annealing); the model is
passed in and never modified. ``meta_gradient(tasks)`` returns a :class:`MetaStep` with the
gradient of the mean query loss for every model parameter (``grads``) and for every parameter of
the algorithm (``extra_grads``); writing them into ``.grad`` and stepping an optimizer is the
front doors' business (:class:`pymaml.MetaOptimizer`, the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional import ENGINES, HVP_METHODS, Task, inner_loop, meta_gradient as _meta_gradient
from ..functional.batching import is_stacked
from ..functional.buffers import BATCH_NORM_POLICIES, batch_norm_policy
from ..functional.layout import MEMORY_FORMATS

__all__ = ["Algorithm", "MetaStep", "as_tasks", "head_names", "safe_name"]


@dataclass
class MetaStep:
    """Result of one meta-gradient computation. Every tensor is detached.

    grads        model parameter name -> meta-gradient (of the mean over tasks)
    extra_grads  algorithm parameter name (as in ``algorithm.named_parameters()``) -> gradient
    query_loss   mean query loss after adaptation (0-d)
    query_outputs  per task, the model's output on its query set after adaptation
    support_loss mean support loss before adaptation (0-d)
    info         what ran: engine, hvp, task_batching, and algorithm-specific entries
    nonfinite    where the fused inner-loop and adjoint ops met NaN or Inf, on the device
                 (:class:`pymaml.functional.nonfinite.StepFlags`), or None when not recorded
    """
    grads: Dict[str, Tensor]
    extra_grads: Dict[str, Tensor]
    query_loss: Tensor
    query_outputs: List[Tensor]
    support_loss: Tensor
    info: Dict[str, object] = field(default_factory=dict)
    nonfinite: object = None


def as_tasks(tasks) -> Union[Task, List[Task]]:
    """Accepts a list of Task / ((x_s, y_s), (x_q, y_q)), a stacked Task, or the 4-tuple
    ``(x_s, y_s, x_q, y_q)`` of task-stacked tensors that the samplers return."""
    if isinstance(tasks, Task):
        return tasks
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, Tensor) for t in tasks):
        return Task((tasks[0], tasks[1]), (tasks[2], tasks[3]))
    if is_stacked(tasks):
        return Task(tuple(tasks[0]), tuple(tasks[1]))
    return [t if isinstance(t, Task) else Task(tuple(t[0]), tuple(t[1])) for t in tasks]


def task_list(tasks) -> List[Task]:
    """The tasks one by one (unstacks a stacked Task)."""
    tasks = as_tasks(tasks)
    if isinstance(tasks, Task):
        n = tasks.support[0].shape[0]
        return [Task(tuple(t[i] for t in tasks.support), tuple(t[i] for t in tasks.query)) for i in range(n)]
    return tasks


def head_names(model: nn.Module) -> List[str]:
    """Parameter names of the model's head: ``head.*`` when the model has a ``head`` attribute,
    else the parameters of the last ``nn.Linear``."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(getattr(model, "head", None), nn.Module):
        found = [n for n in names if n.startswith("head.")]
        if found:
            return found
    last = None
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = mname
    if last is None:
        raise ValueError("head_names: the model has neither a `head` module nor an nn.Linear layer")
    return [n for n in names if n.rsplit(".", 1)[0] == last]


def safe_name(name: str) -> str:
    """A parameter name usable as an nn.Module attribute (no dots)."""
    return name.replace(".", "__")


_TASK_BATCHING = ("auto", "vmap", "loop")


class Algorithm(nn.Module):
    """Base class. Settings shared by all algorithms:

    inner_lr       α of the inner SGD steps (initial value when the algorithm learns it)
    inner_steps    K inner steps during meta-training
    eval_steps     inner steps at evaluation (default: inner_steps)
    engine         meta-gradient engine: "auto", "recompute", "unrolled" or "first_order"
                   (:func:`pymaml.functional.meta_gradient`); first-order algorithms accept only
                   "auto" and "first_order"
    hvp            HVP method for ``recompute`` ("auto", "double_backward", "jvp", "finite_difference")
    task_batching  "auto", "vmap" or "loop"
    weight_decay   inner-loop L2 term
    memory_format  "auto", "channels_last" or "preserve" (:mod:`pymaml.functional.layout`)
    batch_norm     "mode" (the module's train/eval mode decides; train-mode running statistics are
                   updated by the forward passes an unrolled loop would run) or "transductive"
                   (batch statistics always, running statistics untouched: the MAML paper);
                   see :mod:`pymaml.functional.buffers`. It applies to meta-training and to
                   :meth:`adapt`/:meth:`evaluate` alike.

    ``second_order`` (a class attribute, per instance for ANIL) says whether the meta-gradient
    differentiates through the inner loop's Hessians; a first-order algorithm runs the
    ``first_order`` engine. A setting an algorithm cannot honour raises a ``ValueError`` naming the
    algorithm and the value; nothing is silently ignored.
    """

    name = "base"
    second_order = True
    #: per setting, the values this algorithm honours when it restricts them (see _check_settings)
    supported: Dict[str, Tuple[str, ...]] = {}

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *, inner_lr: float = 0.01,
                 inner_steps: int = 1, eval_steps: Optional[int] = None, engine: str = "auto", hvp: str = "auto",
                 task_batching: str = "auto", weight_decay: float = 0.0, memory_format: str = "auto",
                 batch_norm: str = "mode"):
        super().__init__()
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"{self.name}: inner_steps must be a non-negative int, got {inner_steps!r}")
        self.__dict__["model"] = model  # not a submodule: the model's parameters are not ours
        self.loss_fn = loss_fn
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.eval_steps = inner_steps if eval_steps is None else int(eval_steps)
        self.engine, self.hvp, self.task_batching = engine, hvp, task_batching
        self.weight_decay = float(weight_decay)
        self.memory_format = memory_format
        self.batch_norm = batch_norm
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._check_settings()

    def _check_settings(self) -> None:
        """Every setting is one the engine knows and this algorithm honours."""
        known = {"engine": ENGINES + ("auto",), "hvp": HVP_METHODS + ("auto",), "task_batching": _TASK_BATCHING,
                 "memory_format": MEMORY_FORMATS, "batch_norm": BATCH_NORM_POLICIES}
        allowed = dict(known)
        if not self.second_order:
            allowed.update(engine=("auto", "first_order"), hvp=("auto",))
        allowed.update(self.supported)
        for key, values in allowed.items():
            value = getattr(self, key)
            if value in values:
                continue
            if value in known[key]:
                raise ValueError(f"{self.name}: {key}={value!r} is not supported by this algorithm "
                                 f"({self._why(key)}); use one of {values}")
            raise ValueError(f"{self.name}: {key} must be one of {values}, got {value!r}")

    def _why(self, key: str) -> str:
        if key in ("engine", "hvp") and not self.second_order:
            return "its meta-gradient is first order: no Hessian terms"
        return "see its documentation"

    # -- what subclasses override -------------------------------------------------------------
    def adapted_names(self) -> Optional[List[str]]:
        """Names adapted in the inner loop (None = all)."""
        return None

    def step_sizes(self, steps: int, detach: bool = False):
        """The ``lr`` argument of the engine for ``steps`` inner steps."""
        return self.inner_lr

    def engine_settings(self) -> dict:
        """Extra keyword arguments of :func:`pymaml.functional.meta_gradient` (engine, step weights)."""
        if not self.second_order:
            return {"engine": "first_order"}
        return {"engine": self.engine, "hvp": self.hvp}

    # -- the meta-gradient ------------------------------------------------------------------------
    def params(self) -> Dict[str, Tensor]:
        """The meta-parameters: the model's parameters that require grad (frozen ones stay fixed)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def meta_gradient(self, tasks, loss_scale: float = 1.0) -> MetaStep:
        """The meta-gradient of the mean query loss over ``tasks``; with ``loss_scale`` the gradients
        come back multiplied by it (the query losses are scaled before differentiating; see
        :func:`pymaml.functional.meta_gradient`), the losses unscaled."""
        tasks = as_tasks(tasks)
        lr = self.step_sizes(self.inner_steps)
        res = _meta_gradient(self.model, tasks, self.loss_fn, params=self.params(), steps=self.inner_steps, lr=lr,
                             adapt=self.adapted_names(), task_batching=self.task_batching,
                             weight_decay=self.weight_decay, memory_format=self.memory_format,
                             batch_norm=self.batch_norm, loss_scale=loss_scale, **self.engine_settings())
        self.iteration += 1
        return MetaStep(grads=res.grads, extra_grads=self.lr_grads_to_params(res.lr_grads),
                        query_loss=res.query_loss, query_outputs=res.query_outputs, support_loss=res.support_loss,
                        info={"engine": res.engine, "hvp": res.hvp, "task_batching": res.task_batching,
                              "memory_format": res.memory_format, "batch_norm": res.batch_norm},
                        nonfinite=res.nonfinite)

    def lr_grads_to_params(self, lr_grads) -> Dict[str, Tensor]:
        """Maps the engine's ``lr_grads`` (in the structure of ``step_sizes``) to our parameters."""
        return {}

    # -- evaluation -------------------------------------------------------------------------------
    def adapt(self, support: Tuple[Tensor, Tensor], steps: Optional[int] = None,
              params: Optional[Dict[str, Tensor]] = None, flags=None) -> Dict[str, Tensor]:
        """θ_K for one task (detached), with the algorithm's own inner loop, from ``params``
        (default: the model's parameters); ``flags`` as in :func:`pymaml.functional.inner_loop`."""
        steps = self.eval_steps if steps is None else steps
        with torch.no_grad():
            lr = self.step_sizes(steps, detach=True)
        if params is None:
            params = {n: p.detach() for n, p in self.params().items()}
        return inner_loop(self.model, support, self.loss_fn, params=params, steps=steps, lr=lr,
                          adapt=self.adapted_names(), weight_decay=self.weight_decay, batch_norm=self.batch_norm,
                          flags=flags)

    def evaluate(self, tasks, steps: Optional[int] = None) -> Tuple[List[float], List[Tensor]]:
        """Per task: (query loss after ``steps`` inner steps, query outputs). BatchNorm follows the
        ``batch_norm`` setting, as during training: under ``"mode"`` a model in ``eval()`` mode uses
        its running statistics, one in ``train()`` mode batch statistics (and its forward passes
        update the running statistics, as any train-mode forward pass does)."""
        losses, outputs = [], []
        for t in task_list(tasks):
            fast = self.adapt(t.support, steps)
            out, loss = self.query_pass(fast, t.query)
            losses.append(float(loss))
            outputs.append(out)
        return losses, outputs

    def query_pass(self, params: Dict[str, Tensor], query: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """(outputs, loss) on a query set at ``params``, no grad, one counted forward pass."""
        with torch.no_grad(), batch_norm_policy(self.model, policy=self.batch_norm) as bn, bn.counted():
            out = torch.func.functional_call(self.model, params, (query[0],))
            return out, self.loss_fn(out, query[1])

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, eval_steps={self.eval_steps}, "
                f"engine={self.engine!r}")


def per_step(lr_list: Sequence, steps: int):
    """Extends or cuts a per-step list to ``steps`` entries (the last entry repeats)."""
    if steps <= len(lr_list):
        return list(lr_list[:steps])
    return list(lr_list) + [lr_list[-1]] * (steps - len(lr_list))
