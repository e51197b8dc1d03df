"""Every Python-side registration of the compiled ops in ``torch.ops.pymaml``, in one place:
fake (meta) kernels, autograd formulas and vmap rules.

Imported once by ``pymaml._backend`` right after ``pymaml._C`` loads (the schemas must exist).

* fused update, adjoint step, finite differences, norms: backward formulas written in plain
  differentiable torch ops, so gradients of gradients (gradgradcheck, MAML through an unrolled
  graph) work through the out-of-place ops. In-place ops (``sgd_update_``, ``sgd_update_lrs_``,
  ``clip_grad_norm_``) have no autograd: ``pymaml.ops`` refuses them on tensors that require grad.
  Neither have the ``found_inf`` overloads (``sgd_update.found_inf``, ``sgd_update_lrs.found_inf``,
  ``backward_step.found_inf``), which mutate their flag: ``pymaml.ops`` calls them without autograd
  only.
* BatchNorm (``batch_norm`` → ``batch_norm_backward`` → ``batch_norm_double_backward``): the
  derivative chain of :mod:`pymaml.reference.batchnorm`, with the compiled ops as its links.
* ``sgd_update`` (float step size), ``batch_norm``, ``batch_norm_backward``, ``convolution`` and
  ``convolution_backward``: autograd kernels in C++ (csrc/autograd.cpp); fake kernels here.
* ``linear_head_hvp``: a fake kernel and a vmap rule (its autograd kernel is in C++: the outputs
  read the inputs as constants).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._checks import opmath_dtype as _opm
from .reference import batchnorm as _bn
from .reference import conv as _conv_ref
from .reference.batchnorm import check_batch_norm


def _like(ts: Sequence[Tensor], dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Tensor]:
    """The outputs' layout (csrc/include/pymaml/ops.h): CPU kernels keep the strides of the list's
    first operand (torch.empty_like's rule), CUDA kernels return contiguous tensors."""
    dtypes = dtypes or [t.dtype for t in ts]
    return [t.new_empty(t.shape, dtype=d) if t.device.type == "cuda" else torch.empty_like(t, dtype=d)
            for t, d in zip(ts, dtypes)]


def _one_device(op: str, *lists) -> None:
    """A kernel sees one device (pymaml.ops groups mixed lists); the fake kernel checks it too, as
    a list mixing CPU and meta tensors dispatches here."""
    devs = {t.device for ts in lists for t in ts}
    torch._check(len(devs) <= 1, lambda: f"{op}: tensors on several devices {sorted(map(str, devs))}; "
                                         f"call through pymaml.ops, which groups tensors by device")


def _shared(lrs: Sequence[Tensor], n: int) -> bool:
    """The kernels' rule (``classify_lrs`` in csrc/include/pymaml/ops.h): one entry holding one number
    is the shared step size for any number of params."""
    return len(lrs) == 1 and (n != 1 or lrs[0].numel() == 1)


def _device_lrs(lrs: Sequence[Tensor], n: int) -> Sequence[Tensor]:
    """The step sizes that must share the parameters' device: all but a shared one on the CPU."""
    return [] if _shared(lrs, n) and lrs[0].device.type == "cpu" else lrs


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("pymaml::sgd_update")
def _(params, grads, lr, weight_decay):
    _one_device("sgd_update", params, grads)
    return _like(params)


@torch.library.register_fake("pymaml::sgd_update_lrs")
def _(params, grads, lrs, weight_decay):
    _one_device("sgd_update_lrs", params, grads, _device_lrs(lrs, len(params)))
    return _like(params)


def _flag(found_inf):
    return [] if found_inf is None else [found_inf]


@torch.library.register_fake("pymaml::sgd_update.found_inf")
def _(params, grads, lr, weight_decay, *, found_inf):
    _one_device("sgd_update", params, grads, _flag(found_inf))
    return _like(params)


@torch.library.register_fake("pymaml::sgd_update_lrs.found_inf")
def _(params, grads, lrs, weight_decay, *, found_inf):
    _one_device("sgd_update_lrs", params, grads, _device_lrs(lrs, len(params)), _flag(found_inf))
    return _like(params)


@torch.library.register_fake("pymaml::sgd_update_")
def _(params, grads, lr, weight_decay, *, found_inf=None):
    _one_device("sgd_update_", params, grads, _flag(found_inf))
    return None


@torch.library.register_fake("pymaml::sgd_update_lrs_")
def _(params, grads, lrs, weight_decay, *, found_inf=None):
    _one_device("sgd_update_lrs_", params, grads, _device_lrs(lrs, len(params)), _flag(found_inf))
    return None


@torch.library.register_fake("pymaml::backward_step.found_inf")
def _(v, hvp, grads, lrs, next_lrs, next_lr, has_next, *, found_inf):
    _one_device("backward_step", v, hvp, grads, _flag(found_inf))
    return _step_fake(v, hvp, grads, lrs, next_lrs, next_lr, has_next)


@torch.library.register_fake("pymaml::backward_step")
def _step_fake(v, hvp, grads, lrs, next_lrs, next_lr, has_next):
    _one_device("backward_step", v, hvp, grads, _device_lrs(lrs, len(v)), _device_lrs(next_lrs, len(v)))
    # shared: one entry shaped like lrs[0]; per parameter: like each entry, per element laid out
    # like v[i] in the dtype of lrs[i]
    if len(lrs) == len(v) and not _shared(lrs, len(v)):
        lr_grad = [_like([a])[0] if a.numel() == 1 else _like([t], [a.dtype])[0] for a, t in zip(lrs, v)]
    else:
        lr_grad = _like(lrs)
    return _like(v), lr_grad, (_like(v) if has_next else [])


@torch.library.register_fake("pymaml::fd_perturb")
def _(params, direction, eps, eps_scale):
    _one_device("fd_perturb", params, direction)
    return _like(params), _like(params)


@torch.library.register_fake("pymaml::fd_quotient")
def _(grads_plus, grads_minus, eps, eps_scale):
    _one_device("fd_quotient", grads_plus, grads_minus)
    return _like(grads_plus)


def _norm_fake(tensors):
    torch._check(len(tensors) > 0, lambda: "global_norm: tensors is empty")
    _one_device("global_norm", tensors)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].new_empty((), dtype=dt)


@torch.library.register_fake("pymaml::global_norm")
def _(tensors):
    return _norm_fake(tensors)


@torch.library.register_fake("pymaml::clip_grad_norm_")
def _(tensors, max_norm, eps):
    return _norm_fake(tensors)


# --------------------------------------------------------------------------- autograd
def _alpha(lrs: Sequence[Tensor], i: int, n: int, like: Tensor) -> Tensor:
    a = lrs[0] if _shared(lrs, n) else lrs[i]
    a = a.to(_opm(like.dtype))
    return a.reshape(()) if a.numel() == 1 else a


def _reduce_to(lrs: Sequence[Tensor], n: int, per_param: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Element-wise d/dα per parameter -> gradient of each α entry (its shape and dtype)."""
    if _shared(lrs, n):
        a = lrs[0]
        parts = [g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
                 for g in per_param if g is not None]
        total = torch.stack(parts).sum() if parts else a.new_zeros(())
        return [total.to(a.dtype).reshape(a.shape)]
    out = []
    for a, g in zip(lrs, per_param):
        if g is None:
            out.append(None)
        elif a.numel() == 1:
            out.append(g.sum().to(a.dtype).reshape(a.shape))
        else:
            out.append(g.to(a.dtype))
    return out


def _zero_if_none(gs, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, like)]


def _setup_update(ctx, inputs, output):
    params, grads, lr_or_lrs, wd = inputs
    ctx.n = len(params)
    ctx.wd = wd
    if isinstance(lr_or_lrs, float):
        ctx.lr = lr_or_lrs
        ctx.nl = 0
        ctx.save_for_backward(*params, *grads)
    else:
        ctx.lr = None
        ctx.nl = len(lr_or_lrs)
        ctx.save_for_backward(*params, *grads, *lr_or_lrs)


def _backward_update(ctx, gouts):
    n, wd = ctx.n, ctx.wd
    saved = ctx.saved_tensors
    params, grads, lrs = saved[:n], saved[n:2 * n], saved[2 * n:]
    gouts = _zero_if_none(gouts, params)
    dp, dg, da = [], [], []
    for i, (p, g, go) in enumerate(zip(params, grads, gouts)):
        a = ctx.lr if ctx.lr is not None else _alpha(lrs, i, n, p)
        go32 = go.to(_opm(p.dtype))
        dg.append((-(a * go32)).to(g.dtype))
        dp.append((go32 - (wd * a) * go32).to(p.dtype) if wd else go)
        if ctx.lr is None:
            d = g.to(go32.dtype) + wd * p.to(go32.dtype) if wd else g.to(go32.dtype)
            da.append(-(go32 * d))
    dlrs = _reduce_to(lrs, n, da) if ctx.lr is None else None
    return dp, dg, dlrs, None


# sgd_update (float step size): autograd kernel in csrc/autograd.cpp (same formula, no Python per node)
torch.library.register_autograd("pymaml::sgd_update_lrs", _backward_update, setup_context=_setup_update)


def _setup_step(ctx, inputs, output):
    v, hvp, grads, lrs, next_lrs, next_lr, has_next = inputs
    ctx.n, ctx.nl, ctx.nn = len(v), len(lrs), len(next_lrs)
    ctx.next_lr, ctx.has_next = next_lr, has_next
    ctx.save_for_backward(*v, *hvp, *grads, *lrs, *next_lrs)


def _backward_step(ctx, g_vout, g_lrgrad, g_unext):
    n, nl = ctx.n, ctx.nl
    s = ctx.saved_tensors
    v, hvp, grads = s[:n], s[n:2 * n], s[2 * n:3 * n]
    lrs, next_lrs = s[3 * n:3 * n + nl], s[3 * n + nl:]
    g_vout = _zero_if_none(g_vout, v)
    dv, dh, dg, dnext = [], [], [], []
    for i in range(n):
        vi, hi, gi = v[i], hvp[i], grads[i]
        om = _opm(vi.dtype)
        dvo = g_vout[i].to(om)
        if ctx.has_next and g_unext and g_unext[i] is not None:
            gu = g_unext[i].to(om)
            an = _alpha(next_lrs, i, n, vi) if next_lrs else ctx.next_lr
            dvo = dvo + an * gu
            if next_lrs:
                dnext.append(gu * (vi.to(om) - hi.to(om)))
        elif next_lrs:
            dnext.append(None)
        dv_i, dg_i = dvo, None
        if nl and g_lrgrad:
            gl = g_lrgrad[0] if _shared(lrs, n) else g_lrgrad[i]
            if gl is not None:
                gl = gl.to(om)
                gl = gl.reshape(()) if gl.numel() == 1 else gl
                dv_i = dv_i - gl * gi.to(om)
                dg_i = (-(gl * vi.to(om))).to(gi.dtype)
        dv.append(dv_i.to(vi.dtype))
        dh.append((-dvo).to(hi.dtype))
        dg.append(dg_i if dg_i is not None else torch.zeros_like(gi))
    dnl = _reduce_to(next_lrs, n, dnext) if next_lrs else []
    return dv, dh, dg, [None] * nl, dnl, None, None


torch.library.register_autograd("pymaml::backward_step", _backward_step, setup_context=_setup_step)


def _setup_fd(ctx, inputs, output):
    a, b, eps, scale = inputs
    ctx.n, ctx.eps = len(a), eps
    ctx.save_for_backward(*a, *b, scale)


def _backward_perturb(ctx, g_plus, g_minus):
    n, eps = ctx.n, ctx.eps
    s = ctx.saved_tensors
    params, direction, scale = s[:n], s[n:2 * n], s[2 * n]
    g_plus, g_minus = _zero_if_none(g_plus, params), _zero_if_none(g_minus, params)
    dp, du, ds = [], [], []
    for p, u, gp, gm in zip(params, direction, g_plus, g_minus):
        om = _opm(p.dtype)
        step = eps * scale.to(om).reshape(())
        diff = gp.to(om) - gm.to(om)
        dp.append((gp.to(om) + gm.to(om)).to(p.dtype))
        du.append((step * diff).to(u.dtype))
        ds.append((eps * (u.to(om) * diff).sum()).to(scale.dtype))
    dscale = torch.stack(ds).sum().reshape(scale.shape) if ds else torch.zeros_like(scale)
    return dp, du, None, dscale


torch.library.register_autograd("pymaml::fd_perturb", _backward_perturb, setup_context=_setup_fd)


def _backward_quotient(ctx, g_out):
    n, eps = ctx.n, ctx.eps
    s = ctx.saved_tensors
    a, b, scale = s[:n], s[n:2 * n], s[2 * n]
    g_out = _zero_if_none(g_out, a)
    da, db, ds = [], [], []
    for ai, bi, go in zip(a, b, g_out):
        om = _opm(ai.dtype)
        sc = scale.to(om).reshape(())
        q = go.to(om) / (2 * eps * sc)
        da.append(q.to(ai.dtype))
        db.append((-q).to(bi.dtype))
        ds.append((-(q * (ai.to(om) - bi.to(om))).sum() / sc).to(scale.dtype))
    dscale = torch.stack(ds).sum().reshape(scale.shape) if ds else torch.zeros_like(scale)
    return da, db, None, dscale


torch.library.register_autograd("pymaml::fd_quotient", _backward_quotient, setup_context=_setup_fd)


def _setup_norm(ctx, inputs, output):
    (tensors,) = inputs
    ctx.n = len(tensors)
    ctx.save_for_backward(*tensors, output)


def _backward_norm(ctx, g):
    s = ctx.saved_tensors
    tensors, norm = s[:ctx.n], s[ctx.n]
    scale = g / norm
    return ([(t.to(scale.dtype) * scale.to(t.device)).to(t.dtype) for t in tensors],)


torch.library.register_autograd("pymaml::global_norm", _backward_norm, setup_context=_setup_norm)


# --------------------------------------------------------------------------- BatchNorm
def _like_x(x, dtype=None):
    """x-shaped outputs keep a channels-last layout (as ATen's batch norm and the fused kernel)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, dtype=dtype, memory_format=fmt)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("pymaml::batch_norm")
def _(x, weight, bias, eps):
    check_batch_norm("batch_norm", x, weight, bias)
    st, c = _opm(x.dtype), x.shape[1]
    return _like_x(x), x.new_empty((c,), dtype=st), x.new_empty((c,), dtype=st)


@torch.library.register_fake("pymaml::batch_norm_backward")
def _(grad_y, x, weight, mean, invstd, eps):
    check_batch_norm("batch_norm_backward", x, weight, grad_y=grad_y)
    wd, c = (weight.dtype if weight is not None else x.dtype), x.shape[1]
    return _like_x(x), x.new_empty((c,), dtype=wd), x.new_empty((c,), dtype=wd)


@torch.library.register_fake("pymaml::batch_norm_double_backward")
def _(grad_y, x, weight, mean, invstd, eps, gg_x, gg_weight, gg_bias):
    check_batch_norm("batch_norm_double_backward", x, weight, grad_y=grad_y, gg_x=gg_x)
    wd = weight.dtype if weight is not None else x.dtype
    return _like_x(x, grad_y.dtype), _like_x(x), x.new_empty((x.shape[1],), dtype=wd)


# The autograd of batch_norm and batch_norm_backward is in csrc/autograd.cpp (the chain of
# pymaml/reference/batchnorm.py without Python per node); the third derivative stays here.
torch.library.register_autograd("pymaml::batch_norm_double_backward", _bn.backward_double,
                                setup_context=_bn.setup_double)


# --------------------------------------------------------------------------- convolution
@torch.library.register_fake("pymaml::convolution")
def _(x, weight, bias, stride, padding, dilation, groups):
    return _conv_ref.convolution(x, weight, bias, stride, padding, dilation, groups)


@torch.library.register_fake("pymaml::convolution_backward")
def _(grad_y, x, weight, stride, padding, dilation, groups, mask):
    return _conv_ref.convolution_backward(grad_y, x, weight, stride, padding, dilation, groups, mask)


# --------------------------------------------------------------------------- linear head HVP
@torch.library.register_fake("pymaml::linear_head_hvp")
def _(x, weight, bias, target, v_weight, v_bias, loss):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "linear_head_hvp: x and weight must be 2-D")
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)), x.new_empty(x.shape)


@torch.library.register_vmap("pymaml::linear_head_hvp")
def _(info, in_dims, x, weight, bias, target, v_weight, v_bias, loss):
    # Tasks of one meta-batch: a loop over the vmapped dimension (each task's head is a few small
    # GEMMs, so batching them into one launch would buy little on the CPU).
    args = (x, weight, bias, target, v_weight, v_bias)
    outs = []
    for i in range(info.batch_size):
        one = [a if d is None or a is None else a.select(d, i) for a, d in zip(args, in_dims[:6])]
        outs.append(torch.ops.pymaml.linear_head_hvp(*one, loss))
    return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)
