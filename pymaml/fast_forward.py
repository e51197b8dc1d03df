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
- **Convolutions** (``F.conv2d`` with a gradient to record) go to ``torch.ops.pymaml.convolution``:
  torch's values, and a second derivative computed with the weight- and input-gradient kernels
  where torch's formula runs a convolution whose kernel is a whole feature map (the slowest
  convolution of a second-order CPU meta-step; see :mod:`pymaml.reference.conv`). On the CPU the
  gradient kernels of small convolutions (few-shot feature maps, e.g. the Omniglot net's 14×14 to
  2×2 layers) are one matrix product over an im2col buffer, which beats oneDNN's per-call cost
  there; ``PYMAML_CONV_GEMM=0`` keeps torch's kernels everywhere. Values are bit for bit torch's;
  derivatives agree with torch's to rounding (they sum in another order).
- **Channels-last inputs**: when the learner holds its conv weights channels-last (CPU conv nets,
  see :mod:`pymaml.functional.layout`), 4-D tensor arguments are laid out channels-last as well,
  so the whole pass stays in NHWC order.

Under ``torch.func`` transforms or for dtypes other than float32/float64, ``F.batch_norm`` and
``F.conv2d`` run as usual; where the compiled ops are not available for the device (the pure-torch
backend), BatchNorm runs as usual and convolutions through the pure-torch twin,
:class:`pymaml.reference.conv.ConvolutionFn`.
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
from .reference.conv import ConvolutionFn
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
        # In place, two ops per statistic: this runs once per BatchNorm layer per forward pass.
        with torch.no_grad():
            n = input.numel() // input.shape[1]
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            if running_var is not None:
                var = invstd.double().pow(-2).sub_(eps).mul_(n / (n - 1))  # pow: a new tensor (invstd is saved)
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return y


def _pair(v):
    return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v)] * 2


def _conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
            groups: int = 1):
    """``F.conv2d`` through ``pymaml::convolution`` where a second derivative may be taken;
    ``NotImplemented`` elsewhere."""
    if (isinstance(padding, str) or not isinstance(input, Tensor) or not isinstance(weight, Tensor)
            or input.dim() != 4 or input.dtype not in _FUSED_DTYPES or not torch.is_grad_enabled()
            or _functorch_active()
            or not (input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return NotImplemented
    args = (input, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups))
    if _backend.compiled_available("convolution", input.device):
        return torch.ops.pymaml.convolution(*args)
    return ConvolutionFn.apply(*args)


class _FastForwardMode(TorchFunctionMode):
    def __init__(self, fused_batch_norm: bool):
        super().__init__()
        self.fused_batch_norm = fused_batch_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            out = _conv2d(*args, **kwargs)
            if out is not NotImplemented:
                return out
        elif func is F.batch_norm and self.fused_batch_norm:
            out = _batch_norm(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_forward(fused_batch_norm: bool = True):
    """Within the block, convolutions and (with ``fused_batch_norm``) ``F.batch_norm`` with batch
    statistics use the fast second derivatives (module docstring)."""
    with _FastForwardMode(fused_batch_norm):
        yield


def layout_inputs(args, kwargs, layout: str):
    """4-D tensor arguments in ``layout`` (``"channels_last"`` or ``"preserve"``)."""
    if layout != "channels_last":
        return args, kwargs
    args = tuple(to_layout(a, layout) for a in args)
    if kwargs:
        kwargs = {k: to_layout(v, layout) for k, v in kwargs.items()}
    return args, kwargs
