"""Pure-torch reference of ``pymaml::convolution`` and ``pymaml::convolution_backward``: a
convolution whose second derivative is computed with torch's weight- and input-gradient kernels.

Why
---
A second-order MAML step differentiates the backward pass of every convolution. torch's formula
for it (``ConvolutionBackwardBackward0``) computes the weight part, ∂⟨G_x, ∂L/∂x⟩/∂w for the
cotangent G_x of the input gradient, as a convolution of the transposed G_x with the transposed
output gradient, i.e. with a kernel as large as the feature map, dilated by the stride. On the
CPU that is the slowest convolution of the whole meta-step: 80 ms against 7 ms for the same
numbers from the weight-gradient kernel on one [25, 32, 42, 42] layer of the MiniImageNet net (one
thread). Here it is ``convolution_backward(gy, G_x, w)``'s weight gradient.

The maths (non-transposed convolution y = conv(x, w) + b, its backward (gx, gw, gb) at gy, and the
cotangents (G_x, G_w, G_b) of (gx, gw, gb)):

    ∂/∂gy = conv(G_x, w) + conv(x, G_w) + G_b      (per channel)
    ∂/∂x  = input gradient of conv(·, G_w) at gy    (convolution_backward(gy, x, G_w))
    ∂/∂w  = weight gradient of conv(G_x, ·) at gy   (convolution_backward(gy, G_x, w))

The values of the convolution and of its first backward are torch's (``torch.convolution``,
``aten.convolution_backward``); the second derivative sums in another order than torch's formula
(float64 agreement to ~1e-15). Third and higher derivatives go through torch's formulas.
The compiled twin is csrc/autograd.cpp; on the CPU its gradient kernels for small convolutions are
matrix products over an im2col buffer (csrc/cpu/conv_gemm.cpp), equal to these to rounding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["convolution", "convolution_backward", "ConvolutionFn"]

_conv_bwd = torch.ops.aten.convolution_backward.default


def convolution(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int) -> Tensor:
    """``torch.convolution`` (not transposed)."""
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def convolution_backward(grad_y: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int, mask: Sequence[bool]
                         ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x, grad_weight, grad_bias) of :func:`convolution` at ``grad_y``; None where ``mask`` is False."""
    bias_sizes = [weight.shape[0]] if mask[2] else None
    out = _conv_bwd(grad_y, x, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups,
                    list(mask))
    # aten may return more than asked (grad_weight when only grad_bias is)
    return tuple(t if m else None for t, m in zip(out, mask))


class _Backward(torch.autograd.Function):
    """:func:`convolution_backward` with the derivative of the module docstring."""

    @staticmethod
    def forward(grad_y, x, weight, conv, mask):
        return convolution_backward(grad_y, x, weight, *conv, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, conv, _ = inputs
        ctx.conv = conv
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight)

    @staticmethod
    def backward(ctx, g_x, g_w, g_b):
        gy, x, w = ctx.saved_tensors
        conv = ctx.conv
        d_gy = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            parts: List[Tensor] = []
            if g_x is not None:
                parts.append(convolution(g_x, w, None, *conv))
            if g_w is not None:
                parts.append(convolution(x, g_w, None, *conv))
            if g_b is not None:
                parts.append(g_b.reshape([1, -1] + [1] * (gy.dim() - 2)).expand(gy.shape))
            for p in parts:
                d_gy = p if d_gy is None else d_gy + p
        if ctx.needs_input_grad[1] and g_w is not None:
            d_x = convolution_backward(gy, x, g_w, *conv, (True, False, False))[0]
        if ctx.needs_input_grad[2] and g_x is not None:
            d_w = convolution_backward(gy, g_x, w, *conv, (False, True, False))[1]
        return d_gy, d_x, d_w, None, None


class ConvolutionFn(torch.autograd.Function):
    """``ConvolutionFn.apply(x, weight, bias, stride, padding, dilation, groups)``: :func:`convolution`
    with the derivative chain above. The fallback of ``torch.ops.pymaml.convolution``."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return convolution(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
        if not any(mask):
            return None, None, None, None, None, None, None
        gx, gw, gb = _Backward.apply(grad_y, x, w, ctx.conv, mask)
        return gx, gw, gb, None, None, None, None
