"""Buffers and randomness during meta-gradient computation: the policy.

BatchNorm
---------
Inside :func:`pymaml.functional.meta_gradient` and :func:`pymaml.functional.adapt` every
``nn.modules.batchnorm._BatchNorm`` module normalises with the statistics of the batch it sees
(the support set in inner steps, the query set for the query loss), whatever the module's
``train()``/``eval()`` mode, as in the MAML paper. Its running statistics (``running_mean``,
``running_var``, ``num_batches_tracked``) are neither read nor written: inner steps, the
recomputation of a step by the ``recompute`` engine and finite-difference evaluations therefore
cannot update them twice, and nothing computed on one task leaks into another. Affine parameters
(``weight``, ``bias``) are ordinary meta-parameters. Code that wants running statistics for
evaluation updates them itself with an ordinary forward pass outside the engine.

The policy is applied by :func:`batch_norm_policy`, which for the duration of a call replaces the
``forward`` of each BatchNorm instance (an instance attribute, restored afterwards; not
thread-safe for the same module object). Under ``torch.func.vmap`` the replacement is written from
primitive ops (mean, biased variance), because second-order gradients through ``F.batch_norm`` with
batch statistics are wrong under vmap in torch 2.14 (see DESIGN.md). Outside vmap it calls
:func:`pymaml.batch_norm.batch_norm`: the same values and gradients as ``F.batch_norm`` with no
running statistics, but its second derivative is the fused ``pymaml::batch_norm_double_backward``
(1.8× faster exact HVPs through the MiniImageNet conv net on the CPU). Under any other
``torch.func`` transform (the ``jvp`` HVP) it falls back to ``F.batch_norm``, because the ops'
Python-registered autograd does not support functorch.

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
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import batch_norm as _fused_batch_norm

__all__ = ["batch_norm_policy", "has_batch_norm", "has_randomness", "RngTape", "primitive_batch_norm"]


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


def _batch_stats_forward(module: _BatchNorm, primitive: bool):
    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        if primitive:
            return primitive_batch_norm(x, module.weight, module.bias, module.eps)
        if _functorch_active():
            return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
        return _fused_batch_norm(x, module.weight, module.bias, module.eps)
    return forward


@contextlib.contextmanager
def batch_norm_policy(model: nn.Module, primitive: bool = False) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``model`` use batch statistics and leave their running
    statistics untouched (see the module docstring). ``primitive=True`` for vmapped calls."""
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                had = "forward" in m.__dict__
                patched.append((m, had, m.__dict__.get("forward")))
                m.forward = _batch_stats_forward(m, primitive)
        yield
    finally:
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
