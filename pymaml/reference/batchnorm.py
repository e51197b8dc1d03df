"""Pure-torch reference of the batch-statistics BatchNorm ops (``pymaml::batch_norm``,
``pymaml::batch_norm_backward``, ``pymaml::batch_norm_double_backward``).

Why these ops exist
-------------------
A second-order meta-gradient differentiates the backward pass of every BatchNorm layer. torch's
derivative of ``native_batch_norm_backward`` (``batchnorm_double_backward``) is a composite of some
thirty whole-tensor operations per layer; on the MiniImageNet conv net it is about half of the time
of one exact Hessian-vector product on the CPU. Here the double backward is written out per channel
(``batch_norm_double_backward``: five sums, then two affine combinations), which the compiled CPU
kernel does in two passes over the data.

The maths
---------
Per channel, with ⟨·⟩ the mean over the M = N·∏(spatial) elements of the channel, r = 1/√(σ² + ε),
x̂ = (x − μ) r, y = w x̂ + b. The backward, for an upstream gradient gy:

    grad_b = M ⟨gy⟩,   grad_w = M ⟨gy x̂⟩,   grad_x = w r (gy − ⟨gy⟩ − x̂ ⟨gy x̂⟩)

Its vector-Jacobian product with (G, G_w, G_b) — the cotangents of (grad_x, grad_w, grad_b) —
taking into account that μ and r depend on x: with P = ⟨G x̂⟩, Q = ⟨gy x̂⟩, A = ⟨G gy⟩ − ⟨G⟩⟨gy⟩,

    ∂/∂gy = w r (G − ⟨G⟩ − x̂ P) + G_w x̂ + G_b
    ∂/∂w  = M r (A − P Q)
    ∂/∂x  = r (D − ⟨D⟩ − x̂ ⟨D x̂⟩) − w r² x̂ (A − P Q),   D = G_w gy − w r (Q G + P gy)

(derivation: write S = Σ G·grad_x + G_w grad_w + G_b grad_b = M w r (A − P Q) + M G_w Q, take ∂S/∂x̂
at fixed r and ∂S/∂r at fixed x̂, and apply the BatchNorm Jacobians ∂x̂_i/∂x_j = r(δ_ij − 1/M −
x̂_i x̂_j/M) and ∂r/∂x_j = −r² x̂_j/M). The ops read μ and r (the forward's saved statistics) as
values; the third derivative (the autograd of the double backward) recomputes them from x.

Every function computes in float32 for float16/bfloat16 inputs and returns the input dtypes.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._checks import opmath_dtype

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_double_backward", "check_batch_norm",
           "double_backward_from_x", "BatchNormFn"]

def _shape(t: Optional[Tensor]):
    return None if t is None else list(t.shape)


def check_batch_norm(op: str, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     **like: Optional[Tensor]) -> None:
    """The compiled ops' checks: errors name the op and the shapes. ``like`` are tensors shaped like x."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [N, C, *] with at least 2 dims, got shape {_shape(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x has dtype {x.dtype}; only floating-point tensors are supported")
    c = x.shape[1]
    if c == 0 or x.numel() // c <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel, got x of shape {_shape(x)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != c:
            raise ValueError(f"{op}: {name} must have shape [{c}] (C of x {_shape(x)}), got {_shape(p)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    for name, t in like.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {_shape(t)} but x has shape {_shape(x)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _red(x: Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _cshape(x: Tensor) -> List[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) with batch statistics: ``torch.native_batch_norm(training=True)``."""
    check_batch_norm("batch_norm", x, weight, bias)
    return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)


def batch_norm_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                        eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias): ``native_batch_norm_backward(train=True)``."""
    check_batch_norm("batch_norm_backward", x, weight, grad_y=grad_y)
    # x and grad_y in one layout: ATen's CPU kernel computes wrong gradients when x is channels-last
    # only through size-1 dims (shape [1, 2, 1, 2], strides [1, 1, 2, 2]) and grad_y is contiguous.
    # Without a weight, ATen's CUDA kernel returns empty grad_weight and grad_bias; a weight of ones
    # gives the same grad_x and [C] gradients on every device.
    fmt = _layout(x)
    w = weight if weight is not None else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.ops.aten.native_batch_norm_backward(grad_y.contiguous(memory_format=fmt),
                                                     x.contiguous(memory_format=fmt), w, None, None, mean,
                                                     invstd, True, 0.0, [True, True, True])


def _layout(x: Tensor) -> torch.memory_format:
    """``x.suggest_memory_format()`` of ATen: channels-last when x is laid out so, else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _double(gy, x, w, mean, r, gg_x, gg_w, gg_b, dims, shape, m):
    """The module docstring's formulas; mean and r may carry autograd history (third order)."""
    xh = (x - mean.reshape(shape)) * r.reshape(shape)
    mgy, q = gy.mean(dims), (gy * xh).mean(dims)
    zero = torch.zeros_like(r)
    if gg_x is not None:
        mg, p = gg_x.mean(dims), (gg_x * xh).mean(dims)
        a = (gg_x * gy).mean(dims) - mg * mgy
    else:
        mg = p = a = zero
    gw = gg_w if gg_w is not None else zero
    gb = gg_b if gg_b is not None else zero
    wr = w * r
    c_g, c_gy = -wr * q, gw - wr * p
    m_d = c_g * mg + c_gy * mgy
    m_dx = -2 * wr * p * q + gw * q
    apq = a - p * q
    k_x = -r * m_dx - w * r * r * apq
    grad_x = (r * c_gy).reshape(shape) * gy + k_x.reshape(shape) * xh - (r * m_d).reshape(shape)
    ggy = (gw - wr * p).reshape(shape) * xh + (gb - wr * mg).reshape(shape)
    if gg_x is not None:
        grad_x = grad_x + (r * c_g).reshape(shape) * gg_x
        ggy = ggy + wr.reshape(shape) * gg_x
    return ggy, grad_x, m * r * apq


def _prep(gy, x, weight, gg_x, gg_w, gg_b):
    ct = opmath_dtype(x.dtype)
    up = (lambda t: None if t is None else t.to(ct))  # noqa: E731
    w = weight.to(ct) if weight is not None else torch.ones(x.shape[1], dtype=ct, device=x.device)
    return ct, up(gy), up(x), w, up(gg_x), up(gg_w), up(gg_b)


def batch_norm_double_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                               eps: float, gg_x: Optional[Tensor], gg_weight: Optional[Tensor],
                               gg_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_grad_y, grad_x, grad_weight): the VJP of :func:`batch_norm_backward` (module docstring)."""
    check_batch_norm("batch_norm_double_backward", x, weight, grad_y=grad_y, gg_x=gg_x)
    ct, gy, xx, w, g, gw, gb = _prep(grad_y, x, weight, gg_x, gg_weight, gg_bias)
    m = x.numel() // x.shape[1]
    ggy, gx, gwt = _double(gy, xx, w, mean.to(ct), invstd.to(ct), g, gw, gb, _red(x), _cshape(x), m)
    return ggy.to(grad_y.dtype), gx.to(x.dtype), gwt.to(weight.dtype if weight is not None else x.dtype)


def double_backward_from_x(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], eps: float,
                           gg_x: Optional[Tensor], gg_weight: Optional[Tensor], gg_bias: Optional[Tensor]
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_double_backward` with the statistics recomputed from x by differentiable ops:
    the function whose derivatives are the third derivatives of BatchNorm."""
    ct, gy, xx, w, g, gw, gb = _prep(grad_y, x, weight, gg_x, gg_weight, gg_bias)
    dims, shape = _red(x), _cshape(x)
    mean = xx.mean(dims)
    r = torch.rsqrt((xx - mean.reshape(shape)).square().mean(dims) + eps)
    ggy, gx, gwt = _double(gy, xx, w, mean, r, g, gw, gb, dims, shape, x.numel() // x.shape[1])
    return ggy.to(grad_y.dtype), gx.to(x.dtype), gwt.to(weight.dtype if weight is not None else x.dtype)


# ------------------------------------------------------------------ autograd, shared with the ops
# The derivative chain is the same for the compiled ops (registered in pymaml/_registration.py) and
# for the pure-torch fallback below: batch_norm -> batch_norm_backward -> batch_norm_double_backward
# -> double_backward_from_x (differentiated by autograd).

def third_order_vjp(saved, eps, grads):
    """VJP of batch_norm_double_backward, through :func:`double_backward_from_x`: (∂gy, ∂x, ∂w, ∂gg_x,
    ∂gg_w, ∂gg_b), None where the input was None."""
    gy, x, w, gg_x, gg_w, gg_b = saved
    present = [t is not None for t in (gy, x, w, gg_x, gg_w, gg_b)]
    args = [t for t in (gy, x, w, gg_x, gg_w, gg_b) if t is not None]

    def f(*a):
        it = iter(a)
        full = [next(it) if p else None for p in present]
        return double_backward_from_x(full[0], full[1], full[2], eps, full[3], full[4], full[5])

    outs, vjp = torch.func.vjp(f, *args)
    cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads))
    res = iter(vjp(cot))
    return tuple(next(res) if p else None for p in present)


# setup_context / backward bodies of the three links; ``backward_op`` and ``double_op`` are the next
# link (the compiled op, or the Function below). pymaml/_registration.py registers the same functions
# as the compiled ops' autograd.

def setup_bn(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, invstd = output
    ctx.has_bias = bias is not None
    ctx.eps = eps
    ctx.save_for_backward(x, weight, mean, invstd)


def backward_bn(ctx, gy, backward_op):
    """mean and invstd are values, not differentiable outputs: their cotangents are ignored."""
    x, w, mean, invstd = ctx.saved_tensors
    gx, gw, gb = backward_op(gy, x, w, mean, invstd, ctx.eps)
    return gx, (gw if w is not None else None), (gb if ctx.has_bias else None), None


def setup_backward(ctx, inputs, output):
    grad_y, x, weight, mean, invstd, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(grad_y, x, weight, mean, invstd)


def backward_backward(ctx, g_x, g_w, g_b, double_op):
    gy, x, w, mean, invstd = ctx.saved_tensors
    ggy, gx, gw = double_op(gy, x, w, mean, invstd, ctx.eps, g_x, g_w, g_b)
    return ggy, gx, (gw if w is not None else None), None, None, None


def setup_double(ctx, inputs, output):
    grad_y, x, weight, mean, invstd, eps, gg_x, gg_w, gg_b = inputs
    ctx.eps = eps
    ctx.save_for_backward(grad_y, x, weight, gg_x, gg_w, gg_b)


def backward_double(ctx, g_ggy, g_gx, g_gw):
    d = third_order_vjp(ctx.saved_tensors, ctx.eps, (g_ggy, g_gx, g_gw))
    return d[0], d[1], d[2], None, None, None, d[3], d[4], d[5]


class _Double(torch.autograd.Function):
    forward = staticmethod(batch_norm_double_backward)
    setup_context = staticmethod(setup_double)
    backward = staticmethod(backward_double)


class _Backward(torch.autograd.Function):
    forward = staticmethod(batch_norm_backward)
    setup_context = staticmethod(setup_backward)

    @staticmethod
    def backward(ctx, g_x, g_w, g_b):
        return backward_backward(ctx, g_x, g_w, g_b, _Double.apply)


class BatchNormFn(torch.autograd.Function):
    """Batch-statistics BatchNorm in pure torch with the same derivative chain as the compiled ops;
    ``BatchNormFn.apply(x, weight, bias, eps)`` returns (y, mean, invstd), the statistics not
    differentiable. The fallback of :func:`pymaml.ops.batch_norm`."""

    forward = staticmethod(batch_norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        setup_bn(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, gy, _g_mean, _g_invstd):
        return backward_bn(ctx, gy, _Backward.apply)
