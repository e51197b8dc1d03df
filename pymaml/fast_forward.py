"""What makes a learner's forward pass fast without changing its results.

:class:`pymaml.MAML` and :class:`pymaml.MetaSGD` run the wrapped module's forward inside
:func:`fast_forward`, which applies two of the engine's speed-ups to an ordinary unrolled loop:

- **BatchNorm with batch statistics** (train mode, or no running statistics) goes to
  :func:`pymaml.ops.batch_norm`, whose second derivative is the fused
  ``pymaml::batch_norm_double_backward``: the same values and gradients as ``F.batch_norm``, a
  cheaper Hessian-vector product. Running statistics are updated exactly as ``F.batch_norm``
  updates them (``momentum * batch + (1 - momentum) * running``, unbiased variance), once per
  forward call. Eval-mode calls (running statistics) go to ``F.batch_norm`` unchanged. The
  interception is a :class:`~torch.overrides.TorchFunctionMode` that sees every ``F.batch_norm``
  call of the forward, so BatchNorm layers written by hand with ``F.batch_norm`` are served too.
- **Channels-last inputs**: when the learner holds its conv weights channels-last (CPU conv nets,
  see :mod:`pymaml.functional.layout`), 4-D tensor arguments are laid out channels-last as well,
  so the whole pass stays in NHWC order.

Under ``torch.func`` transforms, for dtypes other than float32/float64, or where the compiled
BatchNorm op is not available for the device, ``F.batch_norm`` runs as usual.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _backend
from .reference.batchnorm import check_batch_norm
from .functional.layout import to_layout

__all__ = ["fast_forward", "layout_inputs"]

_functorch_active = torch._C._are_functorch_transforms_active
_FUSED_DTYPES = (torch.float32, torch.float64)


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5):
    """``F.batch_norm`` through the fused op where it applies; ``NotImplemented`` elsewhere."""
    if (not training or _functorch_active() or not isinstance(input, Tensor) or input.dtype not in _FUSED_DTYPES
            or input.dim() < 2 or not _backend.compiled_available("batch_norm", input.device)):
        return NotImplemented
    check_batch_norm("batch_norm", input, weight, bias)
    # the op behind pymaml.ops.batch_norm, whose statistics serve the running-statistics update
    y, mean, invstd = torch.ops.pymaml.batch_norm(input, weight, bias, float(eps))
    if running_mean is not None or running_var is not None:
        # The batch's statistics come with the normalisation (no second pass over x): the biased
        # variance is invstd⁻² − eps, made unbiased as F.batch_norm does for running_var.
        with torch.no_grad():
            n = input.numel() // input.shape[1]
            if running_mean is not None:
                running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
            if running_var is not None:
                var = (invstd.double().pow(-2) - eps) * (n / (n - 1))
                running_var.copy_(momentum * var.to(running_var.dtype) + (1 - momentum) * running_var)
    return y


class _FusedBatchNormMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _batch_norm(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_forward(fused_batch_norm: bool = True):
    """Within the block, ``F.batch_norm`` with batch statistics uses the fused double backward."""
    if not fused_batch_norm:
        yield
        return
    with _FusedBatchNormMode():
        yield


def layout_inputs(args, kwargs, layout: str):
    """4-D tensor arguments in ``layout`` (``"channels_last"`` or ``"preserve"``)."""
    if layout != "channels_last":
        return args, kwargs
    args = tuple(to_layout(a, layout) for a in args)
    if kwargs:
        kwargs = {k: to_layout(v, layout) for k, v in kwargs.items()}
    return args, kwargs
