"""Pure-torch reference of the closed-form linear-head HVP op (``pymaml::linear_head_hvp``).

It is the fallback when the compiled extension is missing and the oracle the compiled kernels are
tested against; it computes exactly what ``csrc/cpu/head_hvp.cpp`` and ``csrc/cuda/head_hvp.cu`` do,
with the same GEMMs and the same row-wise softmax-Jacobian pass (here as whole-tensor ops).

The maths
---------
Head: logits ``Z = X Wᵀ + b`` (nn.Linear convention, X [N, F], W [C, F], b [C]). With the loss's
gradient with respect to the logits written ``G = ∂L/∂Z`` [N, C] and a direction ``(V, v_b)`` in
head-parameter space, ``Z_v = X Vᵀ + v_b`` is the change of the logits along that direction and

    R       = ∂G/∂Z [Z_v]                  (the loss's logit Hessian applied row by row)
    H·(V, v_b) = (Rᵀ X, Σ_n R_n)            (the head Hessian-vector product)
    grad_x  = ∂/∂X ⟨∇_{W,b} L, (V, v_b)⟩ = G V + R W

``grad_x`` is the mixed second derivative: ⟨∇_W L, V⟩ + ⟨∇_b L, v_b⟩ = ⟨G, Z_v⟩, whose derivative
in X has an explicit part G V (through Z_v) and a part through G (through Z = X Wᵀ + b), R W.

* ``"cross_entropy"`` (mean over N, integer class targets y): P = softmax(Z), G = (P − onehot(y))/N,
  R_n = (p_n ⊙ z_v,n − p_n ⟨p_n, z_v,n⟩) / N  (that is (diag(p) − p pᵀ) z_v / N per row).
* ``"mse"`` (F.mse_loss's mean over all N·C elements, target T [N, C]): G = 2 (Z − T)/(N C),
  R = 2 Z_v/(N C).

Every output carries no autograd history: the inputs are read as constants (the op gives one
Hessian-vector product; it is not itself differentiated).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import opmath_dtype

__all__ = ["LOSSES", "check_linear_head_hvp", "linear_head_hvp"]

LOSSES = ("cross_entropy", "mse")
_OP = "linear_head_hvp"


def _shape(t: Optional[Tensor]):
    return None if t is None else list(t.shape)


def check_linear_head_hvp(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                          v_weight: Tensor, v_bias: Optional[Tensor], loss: str) -> None:
    """Validates the inputs exactly as the compiled op does; errors name the op and the shapes."""
    if loss not in LOSSES:
        raise ValueError(f"{_OP}: loss must be one of {LOSSES}, got {loss!r}")
    for name, t in (("x", x), ("weight", weight), ("target", target), ("v_weight", v_weight),
                    ("bias", bias), ("v_bias", v_bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be 2-D [N, F], got shape {_shape(x)}")
    n, f = x.shape
    if not x.dtype.is_floating_point:
        raise TypeError(f"{_OP}: x has dtype {x.dtype}; only floating-point features are supported")
    if weight.dim() != 2 or weight.shape[1] != f:
        raise ValueError(f"{_OP}: weight must be [C, F] with F = {f} (from x {_shape(x)}), "
                         f"got shape {_shape(weight)}")
    c = weight.shape[0]
    if v_weight.shape != weight.shape:
        raise ValueError(f"{_OP}: v_weight must have weight's shape {_shape(weight)}, got {_shape(v_weight)}")
    if bias is None and v_bias is not None:
        raise ValueError(f"{_OP}: v_bias is given (shape {_shape(v_bias)}) but bias is None")
    for name, t in (("bias", bias), ("v_bias", v_bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{_OP}: {name} must be [C] with C = {c} (from weight {_shape(weight)}), "
                             f"got shape {_shape(t)}")
    for name, t in (("weight", weight), ("v_weight", v_weight), ("bias", bias), ("v_bias", v_bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")
    if target.device != x.device:
        raise ValueError(f"{_OP}: target is on {target.device} but x is on {x.device}")
    if loss == "cross_entropy":
        if target.dtype != torch.long or tuple(target.shape) != (n,):
            raise ValueError(f"{_OP}: cross_entropy needs target as int64 class indices of shape [N] = "
                             f"[{n}], got shape {_shape(target)} with dtype {target.dtype}")
        if c == 0:
            raise ValueError(f"{_OP}: cross_entropy needs at least one class, weight has shape {_shape(weight)}")
    else:
        if tuple(target.shape) != (n, c) or target.dtype != x.dtype:
            raise ValueError(f"{_OP}: mse needs target of shape [N, C] = [{n}, {c}] and x's dtype {x.dtype}, "
                             f"got shape {_shape(target)} with dtype {target.dtype}")


def _is_batched(t: Tensor) -> bool:
    return torch._C._functorch.is_batchedtensor(t)


def _logit_terms(z: Tensor, zv: Tensor, target: Tensor, loss: str) -> Tuple[Tensor, Tensor]:
    """G = ∂L/∂Z and R = ∂G/∂Z [Z_v], in the opmath dtype (float32 for half types)."""
    n, c = z.shape
    if loss == "cross_entropy":
        p = torch.softmax(z, dim=1)
        # (diag(p) − p pᵀ) z_v = p ⊙ (z_v − ⟨p, z_v⟩), per row
        r = p * (zv - (p * zv).sum(dim=1, keepdim=True)) * (1.0 / n) if n else p
        if n == 0:
            return p, r
        if z.device.type == "cpu" and not _is_batched(target):
            # On CUDA an out-of-range class trips the device-side assert of the scatter instead
            # (as in F.cross_entropy), as it does under vmap (no .item() there): checking would
            # synchronise with the host.
            lo, hi = torch.aminmax(target)
            if lo.item() < 0 or hi.item() >= c:
                bad = target[(target < 0) | (target >= c)][0].item()
                raise IndexError(f"{_OP}: target holds class {bad} outside [0, {c})")
        g = p.scatter_add(1, target.unsqueeze(1), p.new_full((1, 1), -1.0).expand(n, 1)).mul_(1.0 / n)
    else:
        scale = 2.0 / (n * c) if n * c else 0.0
        g = (z - target.to(z.dtype)) * scale
        r = zv * scale
    return g, r


def linear_head_hvp(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                    v_weight: Tensor, v_bias: Optional[Tensor], loss: str = "cross_entropy"
                    ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Closed-form (H·(v_weight, v_bias), ∂/∂x ⟨∇_{W,b} L, (v_weight, v_bias)⟩) of a linear head.

    Shapes: x [N, F], weight/v_weight [C, F], bias/v_bias [C] or None (v_bias None with a bias
    means a zero bias direction; v_bias without a bias is an error), target [N] int64 class
    indices for ``"cross_entropy"`` or [N, C] values for ``"mse"``. Returns
    ``(hvp_weight [C, F], hvp_bias [C] or None when bias is None, grad_x [N, F])`` in x's dtype;
    float16/bfloat16 inputs are computed in float32 and rounded once. Deterministic.
    """
    check_linear_head_hvp(x, weight, bias, target, v_weight, v_bias, loss)
    dt = x.dtype
    op_dt = opmath_dtype(dt)
    c = weight.shape[0]
    with torch.no_grad():
        xo = x.detach().to(op_dt)
        # M = [V; W]: x Mᵀ = (Z_v | Z) and (G | R) M = G V + R W, one GEMM each way (as the kernels)
        m = torch.cat([v_weight.detach(), weight.detach()]).to(op_dt)
        if bias is not None:
            vb = v_bias.detach() if v_bias is not None else torch.zeros_like(bias)
            zz = torch.addmm(torch.cat([vb, bias.detach()]).to(op_dt), xo, m.t())
        else:
            zz = xo @ m.t()
        tgt = target.detach() if loss == "cross_entropy" else target.detach().to(op_dt)
        g, r = _logit_terms(zz[:, c:], zz[:, :c], tgt, loss)
        hvp_weight = (r.t() @ xo).to(dt)
        hvp_bias = r.sum(dim=0).to(dt) if bias is not None else None
        grad_x = (torch.cat([g, r], dim=1) @ m).to(dt)
    return hvp_weight, hvp_bias, grad_x
