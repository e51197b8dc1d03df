"""Layer-level ops: batch-statistics BatchNorm with a fused double backward (``batch_norm``) and the
closed-form linear-head Hessian-vector product (``linear_head_hvp``).

``batch_norm`` normalises with the statistics of the batch (what a BatchNorm layer does in training
mode) and gives the same numbers as ``F.batch_norm(x, None, None, w, b, True, 0, eps)`` and its
gradients; what differs is the derivative of its backward pass. torch differentiates
``native_batch_norm_backward`` with a composite of some thirty whole-tensor ops per layer; here it
is the op ``pymaml::batch_norm_double_backward`` (a fused two-pass CPU kernel; on CUDA a short ATen
composite), so an exact Hessian-vector product through a BatchNorm conv net costs less. The maths
is in :mod:`pymaml.reference.batchnorm`; derivatives of every order are available (the third goes
through autograd of the pure-torch formulas). Without compiled kernels for the device the pure-torch
:class:`pymaml.reference.BatchNormFn` runs, with the same derivative chain.

``linear_head_hvp``: when only a linear head ``z = x Wᵀ + b`` adapts, the Hessian of its loss with
respect to (W, b) is known in closed form; one call returns the HVP and the mixed term
``∂/∂x ⟨∇_{W,b} L, (v_weight, v_bias)⟩``, so the body's share of the meta-gradient costs one
ordinary backward pass through the body. The formulas are in :mod:`pymaml.reference.heads`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..reference import batchnorm as _bn_ref, heads as _head_ref
from ._dispatch import compiled

__all__ = ["batch_norm", "linear_head_hvp", "HeadHVP"]


def batch_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """BatchNorm over dim 1 of ``x`` [N, C, *] with the batch's statistics (no running statistics).

    Equal to ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` in value and
    gradients of every order; its second derivatives run through the fused
    ``pymaml::batch_norm_double_backward``. Errors name the op and the shapes."""
    _bn_ref.check_batch_norm("batch_norm", x, weight, bias)
    if compiled("batch_norm", x.device):
        return torch.ops.pymaml.batch_norm(x, weight, bias, float(eps))[0]
    return _bn_ref.BatchNormFn.apply(x, weight, bias, float(eps))[0]


class HeadHVP(NamedTuple):
    hvp_weight: Tensor            # H_WW V + H_Wb v_b, [C, F]
    hvp_bias: Optional[Tensor]    # H_bW V + H_bb v_b, [C]; None when the head has no bias
    grad_x: Tensor                # ∂/∂x ⟨∇_{W,b} L, (V, v_b)⟩, [N, F]


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
    _head_ref.check_linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    if compiled("linear_head_hvp", x.device):
        # its Autograd kernel reads the inputs as constants: the outputs never require grad
        hw, hb, gx = torch.ops.pymaml.linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    else:
        hw, hb, gx = _head_ref.linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    return HeadHVP(hw, hb if bias is not None else None, gx)
