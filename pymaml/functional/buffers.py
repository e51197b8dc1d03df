"""Buffers and randomness during meta-gradient computation: the policy.

BatchNorm
---------
Every door of pymaml (:func:`pymaml.functional.meta_gradient`, :func:`pymaml.functional.inner_loop`,
the algorithms and :class:`pymaml.MetaOptimizer`) takes ``batch_norm=``:

``"mode"`` (the default)
    The module's mode decides, as in PyTorch and learn2learn. In ``train()`` mode a BatchNorm layer
    normalises with the statistics of the batch it sees and updates its running statistics the way
    an ordinary forward pass does (``running_mean``, ``running_var``, ``num_batches_tracked``; the
    module's ``momentum``, or the cumulative average when it is None). The forward passes that
    count are those an unrolled training loop runs: the support pass of every inner step and every
    query pass (once per task, or once per weighted step with a multi-step loss), task after task.
    Passes the engines add for their own purposes do not count: the recomputation of a step by the
    ``recompute`` engine, finite-difference evaluations, HVP passes and the support loss reported
    when there are no inner steps. On the head-only fast path the body sees the support set once
    per task but its running statistics are updated once per inner step, as the loop would. In
    ``eval()`` mode the layer normalises with its running statistics and updates nothing. A layer
    without running statistics (``track_running_stats=False``) always uses batch statistics.
``"transductive"``
    The MAML paper's setting: every BatchNorm layer normalises with the statistics of the batch it
    sees (the support set in inner steps, the query set for the query loss) whatever its mode, and
    its running statistics are neither read nor written, so nothing computed on one task leaks into
    another.

With ``task_batching="vmap"`` (tasks stacked in one computation) each task's batch statistics are
computed inside the mapped pass and the running statistics are updated from them after the unit's
forward sweep, task after task and pass after pass: the same sequence of updates as the task loop
(equal up to rounding, since the update is written out instead of run by ``F.batch_norm``).
Affine parameters (``weight``, ``bias``) are ordinary meta-parameters in every case.

The policy is applied by :func:`batch_norm_policy`, which for the duration of a call replaces the
``forward`` of each BatchNorm instance (an instance attribute, restored afterwards; not
thread-safe for the same module object). Batch statistics under ``torch.func.vmap`` are computed
from primitive ops (mean, biased variance), because second-order gradients through
``F.batch_norm`` with batch statistics are wrong under vmap in torch 2.14 (see docs/design.md).
Outside vmap they go through :func:`pymaml.ops.batch_norm`: the same values and gradients as
``F.batch_norm`` with batch statistics, but its second derivative is the fused
``pymaml::batch_norm_double_backward`` (1.8× faster exact HVPs through the MiniImageNet conv net on
the CPU). Under any other ``torch.func`` transform (the ``jvp`` HVP) they fall back to
``F.batch_norm``, because the ops' Python-registered autograd does not support functorch. Running
statistics are updated from the batch mean and variance computed without autograd
(``torch.batch_norm_update_stats``, bit for bit what ``F.batch_norm`` would do).

Other buffers are left to their modules: functional calls read the module's own buffers.

Dropout and other random layers
-------------------------------
The ``recompute`` engine runs each inner step's forward pass twice (once going forward, once for
the Hessian-vector product). :class:`RngTape` captures the global generator states (CPU, and the
current CUDA device when the parameters live there) before each step and restores them before the
recomputation, so random layers draw the same numbers both times; after the backward sweep the
state is put back to where the forward sweep left it, so the stream of random numbers seen by the
caller is the same for every engine.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import batch_norm as _fused_batch_norm

__all__ = ["BATCH_NORM_POLICIES", "batch_norm_policy", "BatchNormPolicy", "active_policy", "has_batch_norm", "has_randomness",
           "updates_running_stats", "RngTape", "primitive_batch_norm"]


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def has_randomness(model: nn.Module) -> bool:
    """Whether the model holds layers that draw random numbers in training mode."""
    rand = (nn.modules.dropout._DropoutNd, nn.RReLU)
    return any(isinstance(m, rand) and m.training for m in model.modules())


def primitive_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Batch-statistics normalisation over every dim but 1, from primitive ops (vmap-safe to any order)."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


_functorch_active = torch._C._are_functorch_transforms_active

#: the values of the ``batch_norm=`` argument
BATCH_NORM_POLICIES = ("mode", "transductive")


def check_policy(op: str, policy: str) -> str:
    if policy not in BATCH_NORM_POLICIES:
        raise ValueError(f"{op}: batch_norm must be one of {BATCH_NORM_POLICIES}, got {policy!r}")
    return policy


def _updates_running_stats(m: _BatchNorm) -> bool:
    return m.training and m.track_running_stats and m.running_mean is not None


def _uses_running_stats(m: _BatchNorm) -> bool:
    return not m.training and m.running_mean is not None and m.running_var is not None


class BatchNormPolicy:
    """The active policy of one :func:`batch_norm_policy` block. Forward passes run inside
    :meth:`counted` update running statistics (``"mode"``, train-mode layers); all others do not.

    Under vmap (``primitive=True``) a counted pass cannot write the buffers: each layer's per-task
    mean and unbiased variance are collected (:meth:`collect`, returned out of the mapped function
    by :class:`pymaml.functional.batching.Unit`), kept by :meth:`record`, and applied in task order
    by :meth:`flush`. The head-only path collects the statistics of its two body passes and
    replays them (:meth:`replay`) in the order of the unrolled loop's passes."""

    def __init__(self, policy: str, primitive: bool):
        self.policy, self.primitive = policy, primitive
        self.counting = False
        self._collecting: Optional[list] = None    # (module, mean, var) of the call in progress
        self._pending: List[list] = []             # per mapped pass: [(module, mean [T, C], var [T, C])]

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Forward passes in the block count as ordinary forward passes."""
        old, self.counting = self.counting, True
        try:
            yield
        finally:
            self.counting = old

    def collects(self, model: nn.Module) -> bool:
        """Whether a mapped pass of ``model`` run now must return batch statistics."""
        return self.primitive and self.counting and self.policy == "mode" and updates_running_stats(model)

    @contextlib.contextmanager
    def collect(self) -> Iterator[list]:
        """Counted passes in the block gather their layers' batch statistics instead of writing them."""
        self._collecting = out = []
        try:
            yield out
        finally:
            self._collecting = None

    def record(self, modules: Sequence[_BatchNorm], stats: Sequence[Tensor]) -> None:
        """Keeps the statistics a mapped pass returned ([T, C] means and variances, alternating)."""
        self._pending.append([(m, stats[2 * k], stats[2 * k + 1]) for k, m in enumerate(modules)])

    def flush(self) -> None:
        """Applies the recorded statistics task by task, each task's passes in order."""
        pending, self._pending = self._pending, []
        n_tasks = next((mean.shape[0] for layers in pending for _, mean, _ in layers), 0)
        for t in range(n_tasks):
            self.replay([[(m, mean[t], var[t]) for m, mean, var in layers] for layers in pending])

    def replay(self, passes: Sequence[Sequence[tuple]]) -> None:
        """Updates running statistics as the given forward passes would, in order; each pass is the
        list of (layer, batch mean, unbiased batch variance) that :meth:`collect` gathered."""
        with torch.no_grad():
            for layers in passes:
                for m, mean, var in layers:
                    f = self._factor(m)
                    m.running_mean.mul_(1 - f).add_(f * mean.to(m.running_mean.dtype))
                    m.running_var.mul_(1 - f).add_(f * var.to(m.running_var.dtype))

    @staticmethod
    def _factor(m: _BatchNorm) -> float:
        """Advances ``num_batches_tracked``; the factor of this update (as _BatchNorm.forward)."""
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:
                factor = 1.0 / float(m.num_batches_tracked)
        return factor

    def _update(self, m: _BatchNorm, x: Tensor) -> None:
        with torch.no_grad():
            x = x.detach()
            if self._collecting is not None:  # gathered (under vmap: per task, leaving as outputs)
                dims = [0] + list(range(2, x.dim()))
                self._collecting.append((m, x.mean(dims), x.var(dims, correction=1)))
                return
            torch.batch_norm_update_stats(x, m.running_mean, m.running_var, self._factor(m))

    def forward_for(self, m: _BatchNorm):
        def forward(x: Tensor) -> Tensor:
            m._check_input_dim(x)
            if self.policy == "mode":
                if _uses_running_stats(m):
                    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
                if self.counting and _updates_running_stats(m):
                    self._update(m, x)
            if self.primitive:
                return primitive_batch_norm(x, m.weight, m.bias, m.eps)
            if _functorch_active():
                return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
            return _fused_batch_norm(x, m.weight, m.bias, m.eps)
        return forward


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, BatchNormPolicy]" = weakref.WeakKeyDictionary()


def active_policy(model: nn.Module) -> Optional[BatchNormPolicy]:
    """The policy of the innermost :func:`batch_norm_policy` block of ``model``, if any."""
    return _ACTIVE.get(model)


def updates_running_stats(model: nn.Module) -> bool:
    """Whether some BatchNorm layer of ``model`` would update running statistics under ``"mode"``."""
    return any(isinstance(m, _BatchNorm) and _updates_running_stats(m) for m in model.modules())


@contextlib.contextmanager
def batch_norm_policy(model: nn.Module, primitive: bool = False,
                      policy: str = "transductive") -> Iterator[BatchNormPolicy]:
    """Within the block, BatchNorm layers of ``model`` follow ``policy`` (see the module docstring);
    yields the :class:`BatchNormPolicy`, whose :meth:`~BatchNormPolicy.counted` marks the forward
    passes that update running statistics. ``primitive=True`` for vmapped calls."""
    state = BatchNormPolicy(check_policy("batch_norm_policy", policy), primitive)
    patched = []
    outer = _ACTIVE.get(model)
    _ACTIVE[model] = state
    try:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                had = "forward" in m.__dict__
                patched.append((m, had, m.__dict__.get("forward")))
                m.forward = state.forward_for(m)
        yield state
    finally:
        if outer is None:
            _ACTIVE.pop(model, None)
        else:
            _ACTIVE[model] = outer
        for m, had, old in patched:
            if had:
                m.forward = old
            else:
                del m.forward


class RngTape:
    """Captures and restores the global RNG state(s) so recomputed steps replay their random numbers.
    A no-op when ``active`` is False (models without random layers)."""

    def __init__(self, active: bool, device: Optional[torch.device] = None):
        self.active = active
        self.cuda = active and device is not None and device.type == "cuda"
        self.device = device

    def capture(self):
        if not self.active:
            return None
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.cuda else None
        return cpu, cuda

    def restore(self, state) -> None:
        if state is None:
            return
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
