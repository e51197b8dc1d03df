"""Memory layout of the meta-gradient computation (``meta_gradient(memory_format=...)``).

On the CPU, PyTorch's oneDNN convolutions work in channels-last (NHWC) order internally, and
several ops around them have much faster NHWC kernels: in torch 2.14 a 2×2 ``max_pool2d`` with
indices on a [75, 64, 28, 28] NCHW tensor takes 22 ms against 1.5 ms in channels-last (one thread).
Inside a conv net, though, one NCHW tensor (an input, a weight, an inner-loop update) is enough to
send the whole pass back to NCHW or into slow mixed-layout kernels. So the engines lay out every
4-D parameter and every 4-D input of a task in channels-last once, at the start; the fused ops keep
the layout (csrc/include/pymaml/ops.h), as do the BatchNorm ops and torch's own kernels, and the
gradients are handed back in each parameter's own layout. Values are those of the NCHW
computation up to floating-point rounding (the convolutions may sum in another order).

``memory_format``:

``"auto"``
    ``"channels_last"`` for a model holding an ``nn.Conv2d`` whose parameters are on the CPU, with
    tasks looped one by one (``task_batching="loop"``, the choice for conv nets); else
    ``"preserve"``. On the MiniImageNet/Omniglot nets of benchmarks/side_by_side.py this made an
    exact second-order meta-step 1.3–1.6× faster (see the README).
``"channels_last"``
    As above, whatever the device and model.
``"preserve"``
    The tensors as given.

A model that assumes NCHW strides, typically ``x.view(x.size(0), -1)`` on a conv activation, raises
in channels-last; under ``"auto"`` :func:`~pymaml.functional.meta_gradient` then warns and runs it
as given (``.reshape`` and ``torch.flatten`` work in any layout).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MEMORY_FORMATS", "resolve", "to_layout", "like", "is_layout_error"]

MEMORY_FORMATS = ("auto", "channels_last", "preserve")


def has_conv2d(model: nn.Module) -> bool:
    """Whether the model holds an ``nn.Conv2d``."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve(op: str, memory_format: str, model: nn.Module, params: Sequence[Tensor], batched: bool) -> str:
    """The layout that runs: ``"channels_last"`` or ``"preserve"``."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"{op}: memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format != "auto":
        return memory_format
    conv2d = has_conv2d(model)
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    return "channels_last" if conv2d and on_cpu and not batched else "preserve"


def to_layout(t: Tensor, layout: str) -> Tensor:
    """``t`` in ``layout`` when it is 4-D (a conv weight, an [N, C, H, W] batch); else ``t``.

    With the strides ``torch.empty_like(t, memory_format=torch.channels_last)`` gives, which for one
    channel (a grey-scale batch, a first conv's weight) differ from the NCHW ones although both are
    "contiguous": ``t.contiguous(memory_format=...)`` would leave such a tensor NCHW, and a conv of
    NCHW input and weight then returns NCHW, sending the rest of the net back to it."""
    if layout == "channels_last" and isinstance(t, Tensor) and t.dim() == 4:
        # torch's channels-last strides for this shape, from a meta tensor (nothing allocated)
        want = torch.empty(t.shape, device="meta", memory_format=torch.channels_last).stride()
        if t.stride() != want:
            return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    return t


def like(g: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """``g`` (same shape as ``ref``) with ``ref``'s strides when ``ref`` is dense, else contiguous."""
    if g is None or g.stride() == ref.stride():
        return g
    out = torch.empty_like(ref, dtype=g.dtype)
    if out.stride() == g.stride():
        return g
    return out.copy_(g)


def is_layout_error(e: BaseException) -> bool:
    """Whether ``e`` is torch's error for a ``.view`` that the strides do not allow."""
    return isinstance(e, RuntimeError) and "view size is not compatible with input tensor's size and stride" in str(e)
