"""Pure-torch reference of the fused update, adjoint-step, finite-difference and norm ops.

Together with :mod:`.batchnorm` and :mod:`.heads` this is the reference of every pymaml op: the
fallback used when the compiled extension is missing (or ``PYMAML_BACKEND=torch``), and the oracle
the tests compare the compiled kernels against. ``pymaml.ops`` exposes the same names and
signatures; the docstrings here are the ops' contracts.

Contract shared by every op
---------------------------
* Tensor lists are Python lists/tuples; entries may mix dtypes (float16, bfloat16, float32, float64)
  and devices across indices, but index ``i`` of every list must agree in shape, dtype and device.
* Arithmetic for float16/bfloat16 is done in float32 and rounded once on the way out, which is
  what the fused kernels do. Reductions accumulate in float32 (float64 for float64 inputs).
* Step sizes ``lr`` come in four forms:
  - a Python float (fixed, not differentiable);
  - a 0-d (or one-element) Tensor shared by every parameter, never read on the host (no sync);
  - a list with one one-element Tensor per parameter (per-tensor, MAML++/LSLR);
  - a list with one Tensor of the parameter's shape per parameter (per-element, Meta-SGD).
  A list may mix the last two forms.
* Out-of-place ops are differentiable (any order) in every tensor argument. In-place ops (trailing
  underscore) are for no-grad use.
* ``found_inf`` (``sgd_update``, ``sgd_update_``, ``backward_step``): an optional float32 tensor on
  the tensors' device holding one number, or one per tensor (shape (n,)). The op writes 1 into it
  (into entry i for tensor i) when a value it computes per element is NaN or ±Inf: θ' for the update;
  v − Hu, −g ⊙ v (when α is a tensor) and u_next for ``backward_step``, in the opmath dtype before
  rounding. Every non-finite input reaches one of those values, so this is the non-finite check of
  what the op reads, done on the device in the same pass (no host sync; it works like the
  ``found_inf`` of ``torch.amp.GradScaler``). The flag is never cleared: zero it before a pass.
  Gradients never flow through it.

Each public function validates its inputs (:mod:`pymaml._checks`) and then runs its ``*_core``
twin, which ``pymaml.ops`` calls directly on inputs it has validated itself.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import (LOW_PRECISION, LrLike, as_list, check_clip, check_fd, check_found_inf, check_no_grad,
                       check_norm, check_number, check_step, check_update, opmath_dtype)

__all__ = [
    "sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient",
    "global_norm", "clip_grad_norm_",
]

def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t


def finite(*values: Tensor) -> Tensor:
    """A 0-d bool tensor: every element of ``values`` is finite (True for empty tensors)."""
    ok = torch.isfinite(values[0]).all()
    for x in values[1:]:
        ok = ok & torch.isfinite(x).all()
    return ok


def raise_flag(found_inf: Optional[Tensor], ok: List[Tensor]) -> None:
    """found_inf ← 1 where a tensor's values were not all finite (``ok``: one 0-d bool per tensor),
    with torch ops on the device: no host sync."""
    if found_inf is None or not ok:
        return
    bad = ~torch.stack(ok).to(found_inf.device)
    with torch.no_grad():
        found_inf.masked_fill_(bad if found_inf.dim() == 1 and found_inf.numel() == len(ok) and len(ok) > 1
                               else bad.any(), 1.0)


def _lr_for(kind, lr, i: int, like: Tensor):
    """The step size for parameter i, in the opmath dtype of ``like``, broadcastable to it."""
    if kind == "float":
        return lr
    a = lr if kind == "shared" else lr[i]
    a = a.to(device=like.device, dtype=opmath_dtype(like.dtype))
    return a.reshape(()) if a.numel() == 1 else a


def _reduce_lr_grad(kind, lr, per_param: List[Tensor]):
    """Turn per-parameter element-wise d/dα into the gradient of each α form."""
    if kind == "float":
        return None
    if kind == "shared":
        total = sum((g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
                     .to(lr.device) for g in per_param), torch.zeros((), device=lr.device, dtype=torch.float64 if lr.dtype == torch.float64 else torch.float32))
        return total.to(lr.dtype).reshape(lr.shape)
    out = []
    for a, g in zip(lr, per_param):
        if a.numel() == 1:
            out.append(g.sum().to(a.dtype).reshape(a.shape))
        else:
            out.append(g.to(a.dtype))
    return out


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
               weight_decay: float = 0.0, found_inf: Optional[Tensor] = None) -> List[Tensor]:
    """θ'_i = θ_i − α_i ⊙ (g_i + weight_decay · θ_i), a new list; differentiable in θ, g and α.
    ``found_inf`` (optional) is set when a θ' is NaN or ±Inf (see the module's contract)."""
    params, grads, kind, lr = check_update("sgd_update", params, grads, lr)
    weight_decay = check_number("sgd_update", "weight_decay", weight_decay)
    found_inf = check_found_inf("sgd_update", "params", found_inf, params)
    return sgd_update_core(params, grads, kind, lr, weight_decay, found_inf)


def sgd_update_core(params: List[Tensor], grads: List[Tensor], kind: str, lr, weight_decay: float,
                    found_inf: Optional[Tensor] = None) -> List[Tensor]:
    out, ok = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        p32, g32 = _opmath(p), _opmath(g)
        d = g32 + weight_decay * p32 if weight_decay else g32
        o = p32 - _lr_for(kind, lr, i, p) * d
        out.append(o.to(p.dtype))
        if found_inf is not None:
            ok.append(finite(o.detach()))
    raise_flag(found_inf, ok)
    return out


def sgd_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                weight_decay: float = 0.0, found_inf: Optional[Tensor] = None) -> None:
    """In-place θ_i ← θ_i − α_i ⊙ (g_i + weight_decay · θ_i). For no-grad use. ``found_inf`` as in
    :func:`sgd_update`."""
    op = "sgd_update_"
    check_no_grad(op, as_list(op, "params", params))
    params, grads, kind, lr = check_update(op, params, grads, lr)
    weight_decay = check_number(op, "weight_decay", weight_decay)
    found_inf = check_found_inf(op, "params", found_inf, params)
    sgd_update_core_(params, grads, kind, lr, weight_decay, found_inf)


def sgd_update_core_(params: List[Tensor], grads: List[Tensor], kind: str, lr, weight_decay: float,
                     found_inf: Optional[Tensor] = None) -> None:
    new = sgd_update_core(params, grads, kind, lr, weight_decay, found_inf)
    with torch.no_grad():
        for p, n in zip(params, new):
            p.copy_(n)


def backward_step(v: Sequence[Tensor], hvp: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                  next_lr: Optional[LrLike] = None, found_inf: Optional[Tensor] = None
                  ) -> Tuple[List[Tensor], Union[None, Tensor, List[Tensor]], Optional[List[Tensor]]]:
    """One step of the adjoint recursion of the exact meta-gradient, in one pass.

    Inputs at step i: ``v`` = v_{i+1}, ``hvp`` = H_i (α_i ⊙ v_{i+1}), ``grads`` = g_i (the inner
    gradient that step i applied), ``lr`` = α_i, ``next_lr`` = α_{i-1} (None at i = 0).
    Returns
      v_out   = v − hvp                                       (v_i)
      lr_grad = −g ⊙ v reduced to α_i's form: None for a float α, a 0-d Tensor (sum over all) for
                a shared Tensor α, per tensor a one-element sum or an element-wise tensor for a list
      u_next  = α_{i-1} ⊙ v_out, the direction of the next HVP (None when next_lr is None)
    ``found_inf`` (optional) is set when a v_out, −g ⊙ v (α a tensor) or u_next is NaN or ±Inf (see
    the module's contract): a non-finite HVP, adjoint or step size, found in the same pass.
    """
    v, hvp, grads, kind, lr, nkind, nlr = check_step("backward_step", v, hvp, grads, lr, next_lr)
    found_inf = check_found_inf("backward_step", "v", found_inf, v)
    return backward_step_core(v, hvp, grads, kind, lr, nkind, nlr, found_inf)


def backward_step_core(v: List[Tensor], hvp: List[Tensor], grads: List[Tensor], kind: str, lr,
                       nkind: Optional[str], nlr, found_inf: Optional[Tensor] = None):
    v_out, dlr, u_next, ok = [], [], [], []
    for i, (vi, hi, gi) in enumerate(zip(v, hvp, grads)):
        v32 = _opmath(vi)
        vo = v32 - _opmath(hi)
        v_out.append(vo.to(vi.dtype))
        checked = [vo]
        if kind != "float":
            dlr.append(-(_opmath(gi) * v32))
            checked.append(dlr[-1])
        if nkind is not None:
            un = _lr_for(nkind, nlr, i, vi) * vo
            u_next.append(un.to(vi.dtype))
            checked.append(un)
        if found_inf is not None:
            ok.append(finite(*(c.detach() for c in checked)))
    raise_flag(found_inf, ok)
    return v_out, _reduce_lr_grad(kind, lr, dlr), (u_next if nkind is not None else None)


def _eps_for(eps, like: Tensor):
    """eps (validated) as a number or a 0-d tensor in ``like``'s opmath dtype and device."""
    if isinstance(eps, Tensor):
        return eps.to(device=like.device, dtype=opmath_dtype(like.dtype)).reshape(())
    return float(eps)


def fd_perturb(params: Sequence[Tensor], direction: Sequence[Tensor], eps) -> Tuple[List[Tensor], List[Tensor]]:
    """(θ + ε u, θ − ε u) in one pass; ε a float or a one-element Tensor (kept on the device)."""
    params, direction = check_fd("fd_perturb", ("params", "direction"), params, direction, eps)
    return fd_perturb_core(params, direction, eps)


def fd_perturb_core(params: List[Tensor], direction: List[Tensor], eps) -> Tuple[List[Tensor], List[Tensor]]:
    plus, minus = [], []
    for p, u in zip(params, direction):
        e = _eps_for(eps, p)
        p32, step = _opmath(p), e * _opmath(u)
        plus.append((p32 + step).to(p.dtype))
        minus.append((p32 - step).to(p.dtype))
    return plus, minus


def fd_quotient(grads_plus: Sequence[Tensor], grads_minus: Sequence[Tensor], eps) -> List[Tensor]:
    """(g₊ − g₋) / 2ε, the central difference estimate of H u."""
    gp, gm = check_fd("fd_quotient", ("grads_plus", "grads_minus"), grads_plus, grads_minus, eps)
    return fd_quotient_core(gp, gm, eps)


def fd_quotient_core(gp: List[Tensor], gm: List[Tensor], eps) -> List[Tensor]:
    out = []
    for a, b in zip(gp, gm):
        e = _eps_for(eps, a)
        out.append(((_opmath(a) - _opmath(b)) / (2 * e)).to(a.dtype))
    return out


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor on the first tensor's device (float64 if any input is
    float64, else float32). Never synchronises with the host."""
    return global_norm_core(check_norm("global_norm", tensors))


def global_norm_core(tensors: List[Tensor]) -> Tensor:
    dev = tensors[0].device
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    sq = torch.zeros((), device=dev, dtype=acc)
    for t in tensors:
        sq = sq + _opmath(t).to(acc).square().sum().to(dev)
    return sq.sqrt()


def clip_grad_norm_(tensors: Sequence[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scales tensors in place by min(1, max_norm / (‖·‖ + eps)) without a host sync; returns the
    norm before clipping (as torch.nn.utils.clip_grad_norm_ does)."""
    op = "clip_grad_norm_"
    check_clip(op, max_norm, eps)
    return clip_grad_norm_core(check_norm(op, tensors), max_norm, eps)


def clip_grad_norm_core(tensors: List[Tensor], max_norm: float, eps: float) -> Tensor:
    norm = global_norm_core(tensors)
    scale = (max_norm / (norm + eps)).clamp(max=1.0)
    with torch.no_grad():
        for t in tensors:
            t.mul_(scale.to(device=t.device, dtype=opmath_dtype(t.dtype)))
    return norm
