"""Task batching: one task at a time (loop) or a stack of tasks in one computation (vmap).

A :class:`Unit` is what an engine works on: either one task (tensors as the user gave them) or a
stack of T tasks of equal shapes. For a stack the adapted parameters carry a leading task
dimension (θ_i has shape ``(T, *p.shape)``), the model's forward pass is mapped over tasks with
``torch.func.vmap`` and the loss of the unit is the SUM of the per-task losses, so that ordinary
autograd on the stacked tensors yields every task's own gradient at once (tasks do not interact).
Everything else, the fused ``pymaml.ops`` updates, HVPs and the backward recursion, then sees one
larger list of tensors; per-element step sizes are broadcast over the task dimension.

Choice (``task_batching="auto"``): vmap for models without convolutions or BatchNorm (the sinusoid
MLP: ~8× faster than a loop on 2 CPU cores), the loop for conv nets and anything with BatchNorm
(vmap there was 1.6–2.9× slower on the CPU, held every task's graph at once, and needs the
primitive-op BatchNorm to get correct second-order gradients), and the loop whenever the tasks'
shapes differ. A batched unit of a plain chain of Linear layers and element-wise activations does
not call vmap at all: :mod:`pymaml.functional.stacked` runs it as batched matrix products (2× faster
than vmap on the sinusoid MLP); ``task_batching`` is still reported as ``"vmap"``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .buffers import active_policy, has_batch_norm
from .inner import Task, model_call
from .layout import to_layout
from .stacked import stacked_forward, stacked_task_losses

__all__ = ["Unit", "make_units", "choose_batching", "is_stacked"]


class Unit:
    """One task (``batched=False``) or a stack of tasks (``batched=True``) for the engines."""

    def __init__(self, model: nn.Module, loss_fn: Callable, names_ad: Sequence[str], names_fx: Sequence[str],
                 task: Task, batched: bool):
        self.model, self.loss_fn = model, loss_fn
        self.names_ad, self.names_fx = list(names_ad), list(names_fx)
        self.support, self.query = tuple(task.support), tuple(task.query)
        self.batched = batched
        self.T: Optional[int] = int(self.support[0].shape[0]) if batched else None
        self.n_tasks = self.T if batched else 1
        self._vmapped = None
        self._stacked = stacked_forward(model) if batched else None

    def _fwd(self, theta, phi, x):
        return model_call(self.model, self.names_ad, self.names_fx, theta, phi, x)

    def _task_loss(self, theta, phi, x, y):
        out = self._fwd(theta, phi, x)
        loss = self.loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"meta_gradient: loss_fn(output, target) must return a scalar Tensor (one loss "
                             f"per task), got {what}")
        return loss, out

    #: multiplies the query loss (loss scaling for float16: the query loss's gradients, and so every
    #: adjoint vector and the meta-gradient, come out multiplied by it; the support loss is not scaled)
    query_scale: float = 1.0

    def loss(self, theta: Sequence[Tensor], phi: Sequence[Tensor], which: str,
             target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(sum over the unit's tasks of the loss, outputs) on the support (``"s"``) or query (``"q"``)
        set; ``target`` replaces the set's targets (same values; used to give them a jvp tangent).
        The query loss is multiplied by :attr:`query_scale`."""
        loss, out = self._loss(theta, phi, which, target)
        if which == "q" and self.query_scale != 1.0:
            loss = loss * self.query_scale
        return loss, out

    def _loss(self, theta, phi, which, target):
        x, y = self.support if which == "s" else self.query
        if target is not None:
            y = target
        if not self.batched:
            return _depends("support" if which == "s" else "query", self._task_loss(theta, phi, x, y), theta, phi)
        if self._stacked is not None:
            params = dict(zip(self.names_ad, theta))
            params.update(zip(self.names_fx, phi))
            out = self._stacked(params, x)
            return _depends("support" if which == "s" else "query",
                            (stacked_task_losses(self.loss_fn, out, y).sum(), out), theta, phi)
        bn = active_policy(self.model)
        if bn is not None and bn.collects(self.model):
            return _depends("support" if which == "s" else "query",
                            self._loss_collecting(bn, theta, phi, x, y), theta, phi)
        if self._vmapped is None:
            self._vmapped = torch.func.vmap(self._task_loss, in_dims=(0, None, 0, 0), randomness="different")
        per_task, out = self._vmapped(list(theta), list(phi), x, y)
        return _depends("support" if which == "s" else "query", (per_task.sum(), out), theta, phi)

    def _loss_collecting(self, bn, theta, phi, x, y):
        """The mapped loss of a pass that updates BatchNorm running statistics: every task's batch
        statistics come out of vmap as extra outputs and are kept by the policy (applied later in
        task order, see :class:`pymaml.functional.buffers.BatchNormPolicy`)."""
        modules = []

        def task_loss(theta_, phi_, x_, y_):
            with bn.collect() as seen:
                loss, out = self._task_loss(theta_, phi_, x_, y_)
            modules[:] = [m for m, _, _ in seen]
            return loss, out, tuple(t for _, mean, var in seen for t in (mean, var))

        per_task, out, stats = torch.func.vmap(task_loss, in_dims=(0, None, 0, 0), randomness="different")(
            list(theta), list(phi), x, y)
        bn.record(modules, stats)
        return per_task.sum(), out

    def to_layout(self, layout: str) -> None:
        """Lays out the 4-D inputs (support and query x) in ``layout`` (see :mod:`.layout`)."""
        self.support = (to_layout(self.support[0], layout), *self.support[1:])
        self.query = (to_layout(self.query[0], layout), *self.query[1:])

    def stack(self, t: Tensor) -> Tensor:
        """θ (shared) → the unit's θ_0: expanded over tasks for a stack (a differentiable view)."""
        return t.unsqueeze(0).expand(self.T, *t.shape) if self.batched else t

    def unstack_sum(self, t: Tensor) -> Tensor:
        return t.sum(0) if self.batched else t

    def outputs(self, out: Tensor) -> List[Tensor]:
        return list(out.detach().unbind(0)) if self.batched else [out.detach()]


def _depends(which: str, result, theta, phi):
    """Raises when the loss has no autograd history although parameters require grad: a loss that
    does not depend on the parameters (a constant, a detached output) has no meta-gradient."""
    loss = result[0]
    if (torch.is_grad_enabled() and not loss.requires_grad and not _functorch_wrapped(loss)
            and any(t.requires_grad for t in (*theta, *phi))):
        raise ValueError(f"meta_gradient: the {which} loss ({loss.item():.6g}) does not depend on the parameters: "
                         f"loss_fn returned a Tensor without autograd history (a constant, or computed from a "
                         f"detached output)")
    return result


def _functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def is_stacked(tasks) -> bool:
    """Whether ``tasks`` is one Task (or ((x_s, y_s), (x_q, y_q))) of task-stacked tensors."""
    return isinstance(tasks, Task) or (isinstance(tasks, tuple) and len(tasks) == 2
                                        and isinstance(tasks[0], tuple) and isinstance(tasks[0][0], Tensor))


def _as_task(t) -> Task:
    if isinstance(t, Task):
        return t
    try:
        s, q = t
        return Task(tuple(s), tuple(q))
    except (TypeError, ValueError):
        raise TypeError(f"meta_gradient: a task must be Task(support=(x, y), query=(x, y)), got {type(t).__name__}") from None


def _shapes(task: Task):
    return tuple(tuple(t.shape) for t in (*task.support, *task.query))


def choose_batching(model: nn.Module) -> str:
    conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if conv or has_batch_norm(model) else "vmap"


def make_units(model, loss_fn, names_ad, names_fx, tasks, task_batching: str) -> Tuple[List[Unit], int, bool]:
    """(units, number of tasks, batched?) for ``tasks`` given as a list of Task or one stacked Task."""
    op = "meta_gradient"
    if task_batching not in ("auto", "vmap", "loop"):
        raise ValueError(f"{op}: task_batching must be 'auto', 'vmap' or 'loop', got {task_batching!r}")
    stacked = is_stacked(tasks)
    if stacked:
        task = _as_task(tasks)
        T = int(task.support[0].shape[0])
        for name, t in zip(("x_s", "y_s", "x_q", "y_q"), (*task.support, *task.query)):
            if t.dim() == 0 or t.shape[0] != T:
                raise ValueError(f"{op}: a stacked Task needs a leading task dim on every tensor; "
                                 f"{name} has shape {tuple(t.shape)} but x_s has {T} tasks")
        task_list = None
    else:
        task_list = [_as_task(t) for t in tasks]
        if not task_list:
            raise ValueError(f"{op}: tasks is empty")
        T = len(task_list)
    mode = task_batching
    if mode == "auto":
        mode = choose_batching(model)
        if mode == "vmap" and task_list is not None and len({_shapes(t) for t in task_list}) > 1:
            mode = "loop"
    if mode == "vmap":
        if task_list is not None:
            first = _shapes(task_list[0])
            for i, t in enumerate(task_list):
                for name, a, b in zip(("x_s", "y_s", "x_q", "y_q"), first, _shapes(t)):
                    if a != b:
                        raise ValueError(f"{op}: task_batching='vmap' needs tasks of equal shapes; task {i} has "
                                         f"{name} of shape {b} but task 0 has {a}; use 'loop'")
            task = Task(tuple(torch.stack(z) for z in zip(*(t.support for t in task_list))),
                        tuple(torch.stack(z) for z in zip(*(t.query for t in task_list))))
        return [Unit(model, loss_fn, names_ad, names_fx, task, True)], T, True
    if task_list is None:
        task_list = [Task(tuple(z[i] for z in task.support), tuple(z[i] for z in task.query)) for i in range(T)]
    return [Unit(model, loss_fn, names_ad, names_fx, t, False) for t in task_list], T, False
