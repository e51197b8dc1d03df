"""Batch-statistics BatchNorm with a fused double backward, for second-order meta-gradients.

:func:`batch_norm` normalises with the statistics of the batch (what a BatchNorm layer does in the
inner loop of MAML) and gives the same numbers as ``F.batch_norm(x, None, None, w, b, True, 0, eps)``
and its gradients; what differs is the derivative of its backward pass. torch differentiates
``native_batch_norm_backward`` with a composite of some thirty whole-tensor ops per layer; here it is
the op ``pymaml::batch_norm_double_backward`` (a fused two-pass CPU kernel; on CUDA a short ATen
composite), so an exact Hessian-vector product through a BatchNorm conv net costs less. The maths
is in :mod:`pymaml.reference_bn`. Derivatives of every order are available (the third goes through
autograd of the pure-torch formulas).

The compiled ops serve CPU and CUDA tensors when the extension is active; otherwise (or with
``PYMAML_BACKEND=torch``) the pure-torch twin :class:`pymaml.reference_bn.BatchNormFn` runs, with the
same derivative chain. The meta-gradient engines use this function for every BatchNorm layer
(:mod:`pymaml.functional.buffers`) except under ``torch.func`` transforms (vmap, jvp), which the
Python-registered autograd of these ops does not support.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference_bn
from .reference_bn import check_batch_norm

__all__ = ["batch_norm", "compiled_available"]

_OPS = ("batch_norm", "batch_norm_backward", "batch_norm_double_backward")
_registered = False
_has_kernel = {}


def _op_exists() -> bool:
    try:
        return hasattr(torch.ops.pymaml, "batch_norm_double_backward")
    except (AttributeError, RuntimeError):
        return False


def compiled_available(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the compiled ops (backend decision made at import, the op
    loaded for this device type, and ``PYMAML_BACKEND=torch`` not set now)."""
    if os.environ.get("PYMAML_BACKEND", "").strip().lower() == "torch":
        return False
    typ = device.type
    if _has_kernel.get(typ):
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(typ)
    ok = (key is not None and _backend.compiled_for(typ) and _op_exists()
          and torch._C._dispatch_has_kernel_for_dispatch_key("pymaml::batch_norm_double_backward", key))
    if ok:
        _has_kernel[typ] = True
    return ok


def register_python_kernels() -> bool:
    """Fake kernels and autograd of the three ops, once the schemas are loaded; idempotent."""
    global _registered
    if _registered:
        return True
    if not _op_exists():
        return False
    lib = "pymaml::"

    def like_x(x, dtype=None):
        """x-shaped outputs keep a channels-last layout (as ATen's batch norm and the fused kernel)."""
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return torch.empty_like(x, dtype=dtype, memory_format=fmt)
        return x.new_empty(x.shape, dtype=dtype)

    def fake_bn(x, weight, bias, eps):
        check_batch_norm("batch_norm", x, weight, bias)
        st = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        c = x.shape[1]
        return like_x(x), x.new_empty((c,), dtype=st), x.new_empty((c,), dtype=st)

    def fake_bwd(grad_y, x, weight, mean, invstd, eps):
        check_batch_norm("batch_norm_backward", x, weight, grad_y=grad_y)
        wd = weight.dtype if weight is not None else x.dtype
        c = x.shape[1]
        return like_x(x), x.new_empty((c,), dtype=wd), x.new_empty((c,), dtype=wd)

    def fake_dbl(grad_y, x, weight, mean, invstd, eps, gg_x, gg_weight, gg_bias):
        check_batch_norm("batch_norm_double_backward", x, weight, grad_y=grad_y, gg_x=gg_x)
        wd = weight.dtype if weight is not None else x.dtype
        return like_x(x, grad_y.dtype), like_x(x), x.new_empty((x.shape[1],), dtype=wd)

    # The derivative chain of reference_bn, with the compiled ops as its links.
    ops, ref = torch.ops.pymaml, reference_bn

    def backward_bn(ctx, gy, _g_mean, _g_invstd):
        return ref.backward_bn(ctx, gy, ops.batch_norm_backward)

    def backward_bwd(ctx, g_x, g_w, g_b):
        return ref.backward_backward(ctx, g_x, g_w, g_b, ops.batch_norm_double_backward)

    chain = (("batch_norm", fake_bn, ref.setup_bn, backward_bn),
             ("batch_norm_backward", fake_bwd, ref.setup_backward, backward_bwd),
             ("batch_norm_double_backward", fake_dbl, ref.setup_double, ref.backward_double))
    for name, fake, setup, bwd in chain:
        for register, args in ((torch.library.register_fake, (fake,)),
                               (torch.library.register_autograd, (bwd,))):
            kw = {"setup_context": setup} if register is torch.library.register_autograd else {}
            try:
                register(lib + name, *args, **kw)
            except RuntimeError as e:  # registered by an earlier import
                if "already" not in str(e):
                    raise
    _registered = True
    return True


def batch_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """BatchNorm over dim 1 of ``x`` [N, C, *] with the batch's statistics (no running statistics).

    Equal to ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` in value and
    gradients of every order; its second derivatives run through the fused
    ``pymaml::batch_norm_double_backward``. Errors name the op and the shapes."""
    check_batch_norm("batch_norm", x, weight, bias)
    if compiled_available(x.device):
        if not _registered:
            register_python_kernels()
        return torch.ops.pymaml.batch_norm(x, weight, bias, float(eps))[0]
    return reference_bn.BatchNormFn.apply(x, weight, bias, float(eps))[0]


register_python_kernels()
