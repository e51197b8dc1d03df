"""Closed-form Hessian-vector products for linear heads (ANIL, head-only adaptation).

When only a linear head ``z = x Wᵀ + b`` adapts, the Hessian of its loss with respect to (W, b) is
known in closed form, so one HVP needs no autograd graph: :func:`linear_head_hvp` returns it in one
fused pass (compiled C++/CUDA op ``torch.ops.pymaml.linear_head_hvp`` when the extension is active,
the pure-torch twin :mod:`pymaml.reference_heads` otherwise), together with the mixed term
``∂/∂x ⟨∇_{W,b} L, (v_weight, v_bias)⟩``. The body's share of the meta-gradient then costs one
ordinary backward pass through the body: ``torch.autograd.backward(x, grad_x)``.

The formulas (shapes, losses, dtype rules) are in the docstring of :mod:`pymaml.reference_heads`.
The outputs carry no autograd history (the inputs are read as constants).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, reference_heads
from ..reference_heads import check_linear_head_hvp

__all__ = ["HeadHVP", "linear_head_hvp", "compiled_available", "register_python_kernels"]

_QUALNAME = "pymaml::linear_head_hvp"
_python_kernels_registered = False


class HeadHVP(NamedTuple):
    hvp_weight: Tensor            # H_WW V + H_Wb v_b, [C, F]
    hvp_bias: Optional[Tensor]    # H_bW V + H_bb v_b, [C]; None when the head has no bias
    grad_x: Tensor                # ∂/∂x ⟨∇_{W,b} L, (V, v_b)⟩, [N, F]


def _op_exists() -> bool:
    try:
        return hasattr(torch.ops.pymaml, "linear_head_hvp")
    except (AttributeError, RuntimeError):
        return False


def register_python_kernels() -> bool:
    """Registers the op's fake (meta) kernel and its vmap rule once the schema is loaded; idempotent.

    Called on import and again lazily on first use, so it works whichever of ``pymaml._C`` and this
    module is imported first. Returns whether the kernels are registered.
    """
    global _python_kernels_registered
    if _python_kernels_registered:
        return True
    if not _op_exists():
        return False

    def _fake(x, weight, bias, target, v_weight, v_bias, loss):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "linear_head_hvp: x and weight must be 2-D")
        return (weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)), x.new_empty(x.shape))

    def _vmap(info, in_dims, x, weight, bias, target, v_weight, v_bias, loss):
        # Tasks of one meta-batch: a loop over the vmapped dimension (each task's head is a few
        # small GEMMs, so batching them into one launch would buy little on the CPU).
        args = (x, weight, bias, target, v_weight, v_bias)
        outs = []
        for i in range(info.batch_size):
            one = [a if d is None or a is None else a.select(d, i) for a, d in zip(args, in_dims[:6])]
            outs.append(torch.ops.pymaml.linear_head_hvp(*one, loss))
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)

    for register, fn in ((torch.library.register_fake, _fake), (torch.library.register_vmap, _vmap)):
        try:
            register(_QUALNAME, fn)
        except RuntimeError as e:  # pymaml._registration (or an earlier import) got there first
            if "already" not in str(e):
                raise
    _python_kernels_registered = True
    return True


_has_kernel = {}  # device type -> True once seen (a loaded kernel never goes away)


def compiled_available(device: torch.device) -> bool:
    """Whether ``device`` tensors go to the compiled op: the package's backend decision
    (``pymaml._backend.compiled_for``, made once) says compiled for this device type, the loaded
    ``pymaml._C`` has this op for it, and ``PYMAML_BACKEND=torch`` is not set now."""
    if os.environ.get("PYMAML_BACKEND", "").strip().lower() == "torch":
        return False
    typ = device.type if isinstance(device, torch.device) else torch.device(device).type
    if _has_kernel.get(typ):
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(typ)
    ok = (key is not None and _backend.compiled_for(typ) and _op_exists()
          and torch._C._dispatch_has_kernel_for_dispatch_key(_QUALNAME, key))
    if ok:
        _has_kernel[typ] = True
    return ok


def linear_head_hvp(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                    v_weight: Tensor, v_bias: Optional[Tensor], loss: str = "cross_entropy") -> HeadHVP:
    """(H·(v_weight, v_bias), ∂/∂x ⟨∇_{W,b} L, (v_weight, v_bias)⟩) of a linear head, in closed form.

    Args:
        x: features [N, F] (floating point).
        weight, bias: the head, ``nn.Linear`` convention: [C, F] and [C] or None.
        target: int64 class indices [N] for ``"cross_entropy"``; values [N, C] (x's dtype) for
            ``"mse"``. Both losses are means (``F.cross_entropy`` / ``F.mse_loss`` defaults; no
            ``ignore_index``, class weights or label smoothing).
        v_weight, v_bias: the direction, shaped like weight and bias. ``v_bias=None`` with a bias
            means a zero bias direction; a ``v_bias`` without a bias is an error.
        loss: ``"cross_entropy"`` or ``"mse"``.

    Returns:
        :class:`HeadHVP` ``(hvp_weight, hvp_bias, grad_x)``: hvp_bias is None when bias is None.
        No autograd history; float16/bfloat16 computed in float32; deterministic.
    """
    check_linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    if compiled_available(x.device):
        if not _python_kernels_registered:
            register_python_kernels()
        # its Autograd kernel reads the inputs as constants: the outputs never require grad
        hw, hb, gx = torch.ops.pymaml.linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    else:
        hw, hb, gx = reference_heads.linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    return HeadHVP(hw, hb if bias is not None else None, gx)


register_python_kernels()
