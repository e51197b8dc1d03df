"""The ops library code calls: same names and signatures as ``pymaml.reference``.

Each call validates its inputs with ``pymaml._checks`` (so both backends raise the same errors),
groups lists that mix devices by device, and runs each group on the compiled kernels
(``torch.ops.pymaml.*``) when they serve that device type, on the pure-torch reference otherwise.
The backend is decided once at import (``pymaml._backend``); ``PYMAML_BACKEND=torch`` forces the
reference everywhere.

Calls that need no autograd (grad mode off, or no input requiring grad) go straight to the kernel,
below the autograd dispatch key, so they pay no Python autograd overhead.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _backend, reference
from ._checks import LrLike, as_list, check_floating, check_number, check_pairs, normalize_lr

__all__ = list(reference.__all__)

_COMPILED = _backend.backend() == "compiled"
_below_autograd = torch._C._AutoDispatchBelowAutograd
_grad_enabled = torch.is_grad_enabled
_ONES: Dict[torch.device, Tensor] = {}


def _needs_grad(*groups) -> bool:
    if not _grad_enabled():
        return False
    for g in groups:
        if isinstance(g, Tensor):
            if g.requires_grad:
                return True
        elif g is not None and not isinstance(g, float):
            for t in g:
                if t.requires_grad:
                    return True
    return False


def _call(op, grad: bool, *args):
    if grad:
        return op(*args)
    with _below_autograd():
        return op(*args)


def _split(tensors: List[Tensor]) -> Optional[List[Tuple[torch.device, List[int]]]]:
    """None when every tensor is on one device; else [(device, indices)] in first-seen order."""
    if not tensors:
        return None
    d0 = tensors[0].device
    for t in tensors:
        if t.device != d0:
            break
    else:
        return None
    groups: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return list(groups.items())


def _compiled(device: torch.device) -> bool:
    return _COMPILED and _backend.compiled_for(device.type)


def _pick(lst, idx):
    return [lst[i] for i in idx]


def _scatter(n: int, parts) -> list:
    out = [None] * n
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            out[i] = v
    return out


def _lr_args(kind, lr, device):
    """Maps a normalized lr onto the schema: (float lr or None, lrs list or None)."""
    if kind == "float":
        return lr, None
    if kind == "shared":
        return None, [lr if lr.device == device else lr.to(device, non_blocking=True)]
    return None, lr


def _one(device: torch.device) -> Tensor:
    t = _ONES.get(device)
    if t is None:
        t = _ONES[device] = torch.ones((), device=device)
    return t


# ----------------------------------------------------------------------------- fast paths
# The common call (one device served by the compiled kernels, lists given as lists) goes straight to
# the kernel, whose C++ checks (csrc/include/pymaml/ops.h) mirror pymaml._checks. Anything else, and
# any error, takes the full path, which validates in Python (so errors are exactly the reference's)
# and groups mixed devices.
class _Slow(Exception):
    pass


_SEQ = (list, tuple)
# The CPU kernels' availability is fixed at import (CUDA is probed on first use): one flag read.
_CPU_OK = _COMPILED and _backend.compiled_for("cpu")
if _COMPILED:
    _K_UPDATE = torch.ops.pymaml.sgd_update.default
    _K_UPDATE_LRS = torch.ops.pymaml.sgd_update_lrs.default
    _K_UPDATE_ = torch.ops.pymaml.sgd_update_.default
    _K_UPDATE_LRS_ = torch.ops.pymaml.sgd_update_lrs_.default
    _K_STEP = torch.ops.pymaml.backward_step.default


def _fast_lr(lr, params):
    """(float, None) | (None, lrs) for the kernel, or raise _Slow."""
    if isinstance(lr, float) or (isinstance(lr, int) and not isinstance(lr, bool)):
        if lr - lr != 0:  # NaN or Inf: the full path raises
            raise _Slow
        return float(lr), None
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.device != params[0].device:
            raise _Slow
        return None, [lr]
    if isinstance(lr, _SEQ):
        if len(lr) != len(params):  # the kernels read a one-entry list as shared; the API does not
            raise _Slow
        return None, lr
    raise _Slow


def _fast_update(params, grads, lr, wd, inplace):
    if type(params) not in _SEQ or type(grads) not in _SEQ or not params:
        raise _Slow
    if not (_CPU_OK and params[0].is_cpu) and not _compiled(params[0].device):
        raise _Slow
    if type(lr) is float:
        flr, lrs = lr, None
    else:
        flr, lrs = _fast_lr(lr, params)
    if type(wd) is not float:
        wd = float(weight_decay_check(wd))
    if (flr is not None and flr - flr != 0) or wd - wd != 0:  # NaN or Inf: the full path raises
        raise _Slow
    if inplace:
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            raise _Slow
        with _below_autograd():
            if lrs is None:
                _K_UPDATE_(params, grads, flr, wd)
            else:
                _K_UPDATE_LRS_(params, grads, lrs, wd)
        return None
    grad = _needs_grad(params, grads, lrs)
    if lrs is None:
        return _call(_K_UPDATE, grad, params, grads, flr, wd)
    return _call(_K_UPDATE_LRS, grad, params, grads, lrs, wd)


def weight_decay_check(wd):
    if isinstance(wd, bool) or not isinstance(wd, (int, float)):
        raise _Slow
    return wd


# ----------------------------------------------------------------------------- fused update
def _update_group(params, grads, kind, lr, wd, device):
    flr, lrs = _lr_args(kind, lr, device)
    grad = _needs_grad(params, grads, lrs)
    if lrs is None:
        return _call(torch.ops.pymaml.sgd_update.default, grad, params, grads, flr, wd)
    return _call(torch.ops.pymaml.sgd_update_lrs.default, grad, params, grads, lrs, wd)


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
               weight_decay: float = 0.0) -> List[Tensor]:
    """θ'_i = θ_i − α_i ⊙ (g_i + weight_decay · θ_i), a new list; differentiable in θ, g and α."""
    if _COMPILED:
        try:
            return _fast_update(params, grads, lr, weight_decay, False)
        except Exception:  # noqa: BLE001 - the full path below validates and raises the precise error
            pass
    op = "sgd_update"
    params = as_list(op, "params", params)
    grads = as_list(op, "grads", grads)
    check_pairs(op, ("params", "grads"), (params, grads))
    kind, lr = normalize_lr(op, lr, params)
    wd = check_number(op, "weight_decay", weight_decay)
    groups = _split(params)
    if groups is None:
        if not params or not _compiled(params[0].device):
            return reference.sgd_update(params, grads, lr, wd)
        return _update_group(params, grads, kind, lr, wd, params[0].device)
    parts = []
    for dev, idx in groups:
        p, g = _pick(params, idx), _pick(grads, idx)
        sub = _pick(lr, idx) if kind == "list" else lr
        parts.append((idx, _update_group(p, g, kind, sub, wd, dev) if _compiled(dev)
                      else reference.sgd_update(p, g, sub, wd)))
    return _scatter(len(params), parts)


def sgd_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                weight_decay: float = 0.0) -> None:
    """In-place θ_i ← θ_i − α_i ⊙ (g_i + weight_decay · θ_i). For no-grad use."""
    if _COMPILED:
        try:
            return _fast_update(params, grads, lr, weight_decay, True)
        except Exception:  # noqa: BLE001 - kernels check everything before writing
            pass
    op = "sgd_update_"
    params = as_list(op, "params", params)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{op}: params require grad; the in-place update is for no-grad use. "
                           f"Wrap the call in torch.no_grad() or use sgd_update (out of place).")
    grads = as_list(op, "grads", grads)
    check_pairs(op, ("params", "grads"), (params, grads))
    kind, lr = normalize_lr(op, lr, params)
    wd = check_number(op, "weight_decay", weight_decay)
    groups = _split(params)
    if groups is None:
        groups = [(params[0].device, None)] if params else []
    for dev, idx in groups:
        p = params if idx is None else _pick(params, idx)
        g = grads if idx is None else _pick(grads, idx)
        sub = _pick(lr, idx) if (kind == "list" and idx is not None) else lr
        if not _compiled(dev):
            reference.sgd_update_(p, g, sub, wd)
            continue
        flr, lrs = _lr_args(kind, sub, dev)
        with _below_autograd():
            if lrs is None:
                torch.ops.pymaml.sgd_update_.default(p, g, flr, wd)
            else:
                torch.ops.pymaml.sgd_update_lrs_.default(p, g, lrs, wd)


# ----------------------------------------------------------------------------- backward step
def _step_group(v, hvp, grads, kind, lr, nkind, nlr, device):
    _, lrs = _lr_args(kind, lr, device) if kind != "float" else (None, [])
    if nkind is None:
        next_lrs, next_f, has_next = [], 0.0, False
    else:
        next_f, next_lrs = _lr_args(nkind, nlr, device)
        next_lrs, next_f, has_next = (next_lrs or []), (0.0 if next_f is None else next_f), True  # keeps -0.0
    grad = _needs_grad(v, hvp, grads, next_lrs)
    return _call(torch.ops.pymaml.backward_step.default, grad, v, hvp, grads, lrs, next_lrs, next_f, has_next)


def backward_step(v: Sequence[Tensor], hvp: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                  next_lr: Optional[LrLike] = None
                  ) -> Tuple[List[Tensor], Union[None, Tensor, List[Tensor]], Optional[List[Tensor]]]:
    """One step of the adjoint recursion, in one pass; see ``pymaml.reference.backward_step``."""
    if _COMPILED:
        try:
            return _fast_step(v, hvp, grads, lr, next_lr)
        except Exception:  # noqa: BLE001 - the full path below validates and raises the precise error
            pass
    op = "backward_step"
    v = as_list(op, "v", v)
    hvp = as_list(op, "hvp", hvp)
    grads = as_list(op, "grads", grads)
    check_pairs(op, ("v", "hvp", "grads"), (v, hvp, grads))
    kind, lr = normalize_lr(op, lr, v)
    nkind, nlr = (None, None) if next_lr is None else normalize_lr(op, next_lr, v, "next_lr")
    groups = _split(v)
    if groups is None:
        if not v or not _compiled(v[0].device):
            return reference.backward_step(v, hvp, grads, lr, nlr if nkind else None)
        v_out, lr_grad, u_next = _step_group(v, hvp, grads, kind, lr, nkind, nlr, v[0].device)
        return v_out, _lr_grad_form(kind, lr, lr_grad), (u_next if nkind is not None else None)
    vo_parts, lg_parts, u_parts, shared_total = [], [], [], None
    for dev, idx in groups:
        sv, sh, sg = _pick(v, idx), _pick(hvp, idx), _pick(grads, idx)
        sub = _pick(lr, idx) if kind == "list" else lr
        nsub = _pick(nlr, idx) if nkind == "list" else nlr
        if _compiled(dev):
            vo, lg, un = _step_group(sv, sh, sg, kind, sub, nkind, nsub, dev)
            lg = _lr_grad_form(kind, sub, lg)
        else:
            vo, lg, un = reference.backward_step(sv, sh, sg, sub, nsub if nkind else None)
        vo_parts.append((idx, vo))
        if nkind is not None:
            u_parts.append((idx, un))
        if kind == "list":
            lg_parts.append((idx, lg))
        elif kind == "shared":
            lg = lg.to(lr.device)
            shared_total = lg if shared_total is None else shared_total + lg
    n = len(v)
    lr_grad = None if kind == "float" else (shared_total if kind == "shared" else _scatter(n, lg_parts))
    return _scatter(n, vo_parts), lr_grad, (_scatter(n, u_parts) if nkind is not None else None)


def _fast_step(v, hvp, grads, lr, next_lr):
    if type(v) not in _SEQ or type(hvp) not in _SEQ or type(grads) not in _SEQ or not v:
        raise _Slow
    if not (_CPU_OK and v[0].is_cpu) and not _compiled(v[0].device):
        raise _Slow
    flr, lrs = _fast_lr(lr, v)
    if next_lr is None:
        next_f, next_lrs, has_next = 0.0, [], False
    else:
        next_f, next_lrs = _fast_lr(next_lr, v)
        next_f, next_lrs, has_next = (0.0 if next_f is None else next_f), (next_lrs or []), True  # keeps -0.0
    grad = _needs_grad(v, hvp, grads, next_lrs)
    v_out, lr_grad, u_next = _call(_K_STEP, grad, v, hvp, grads, lrs or [], next_lrs, next_f, has_next)
    if lrs is None:
        lr_grad = None
    elif isinstance(lr, Tensor):
        lr_grad = lr_grad[0]
    return v_out, lr_grad, (u_next if has_next else None)


def _lr_grad_form(kind, lr, lr_grad):
    if kind == "float":
        return None
    if kind == "shared":
        g = lr_grad[0]
        return g if g.device == lr.device else g.to(lr.device)
    return list(lr_grad)


# ----------------------------------------------------------------------------- finite differences
def _eps_args(op: str, eps, device: torch.device):
    """eps -> (eps float, eps_scale tensor on device), with the reference's checks and messages."""
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise ValueError(f"{op}: eps must hold one number, got shape {tuple(eps.shape)}")
        return 1.0, (eps if eps.device == device else eps.to(device, non_blocking=True))
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"{op}: eps must be a float or a one-element Tensor, got {type(eps).__name__}")
    if eps == 0:
        raise ValueError(f"{op}: eps must be non-zero, got {eps}")
    if eps - eps != 0:
        raise ValueError(f"{op}: eps must be finite, got {eps}")
    return float(eps), _one(device)


def _check_eps(op: str, eps) -> None:
    _eps_args(op, eps, torch.device("cpu")) if not isinstance(eps, Tensor) else _eps_args(op, eps, eps.device)


def fd_perturb(params: Sequence[Tensor], direction: Sequence[Tensor], eps) -> Tuple[List[Tensor], List[Tensor]]:
    """(θ + ε u, θ − ε u) in one pass; ε a float or a one-element Tensor (kept on the device)."""
    op = "fd_perturb"
    params = as_list(op, "params", params)
    direction = as_list(op, "direction", direction)
    check_pairs(op, ("params", "direction"), (params, direction))
    _check_eps(op, eps)
    groups = _split(params) or ([(params[0].device, None)] if params else [])
    plus_parts, minus_parts = [], []
    for dev, idx in groups:
        p = params if idx is None else _pick(params, idx)
        u = direction if idx is None else _pick(direction, idx)
        if _compiled(dev):
            e, s = _eps_args(op, eps, dev)
            pl, mi = _call(torch.ops.pymaml.fd_perturb.default, _needs_grad(p, u, s), p, u, e, s)
        else:
            pl, mi = reference.fd_perturb(p, u, eps)
        if idx is None:
            return list(pl), list(mi)
        plus_parts.append((idx, pl))
        minus_parts.append((idx, mi))
    n = len(params)
    return _scatter(n, plus_parts), _scatter(n, minus_parts)


def fd_quotient(grads_plus: Sequence[Tensor], grads_minus: Sequence[Tensor], eps) -> List[Tensor]:
    """(g₊ − g₋) / 2ε, the central difference estimate of H u."""
    op = "fd_quotient"
    gp = as_list(op, "grads_plus", grads_plus)
    gm = as_list(op, "grads_minus", grads_minus)
    check_pairs(op, ("grads_plus", "grads_minus"), (gp, gm))
    _check_eps(op, eps)
    groups = _split(gp) or ([(gp[0].device, None)] if gp else [])
    parts = []
    for dev, idx in groups:
        a = gp if idx is None else _pick(gp, idx)
        b = gm if idx is None else _pick(gm, idx)
        if _compiled(dev):
            e, s = _eps_args(op, eps, dev)
            out = _call(torch.ops.pymaml.fd_quotient.default, _needs_grad(a, b, s), a, b, e, s)
        else:
            out = reference.fd_quotient(a, b, eps)
        if idx is None:
            return list(out)
        parts.append((idx, out))
    return _scatter(len(gp), parts)


# ----------------------------------------------------------------------------- norms
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor on the first tensor's device (float64 if any input is
    float64, else float32). Never synchronises with the host."""
    op = "global_norm"
    tensors = as_list(op, "tensors", tensors)
    check_floating(op, "tensors", tensors)
    if not tensors:
        raise ValueError(f"{op}: tensors is empty")
    groups = _split(tensors)
    if groups is None:
        if not _compiled(tensors[0].device):
            return reference.global_norm(tensors)
        return _call(torch.ops.pymaml.global_norm.default, _needs_grad(tensors), tensors)
    # One norm per device, combined as the norm of the norms: the reference does exactly that
    # combination (accumulation dtype, result on the first group's device = tensors[0].device).
    norms = []
    for dev, idx in groups:
        sub = _pick(tensors, idx)
        norms.append(_call(torch.ops.pymaml.global_norm.default, _needs_grad(sub), sub)
                     if _compiled(dev) else reference.global_norm(sub))
    return reference.global_norm(norms)


def clip_grad_norm_(tensors: Sequence[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scales tensors in place by min(1, max_norm / (‖·‖ + eps)) without a host sync; returns the
    norm before clipping (as torch.nn.utils.clip_grad_norm_ does)."""
    op = "clip_grad_norm_"
    if not max_norm > 0:
        raise ValueError(f"{op}: max_norm must be positive, got {max_norm}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps - eps == 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    tensors = as_list(op, "tensors", tensors)
    check_floating(op, "tensors", tensors)
    if not tensors:
        raise ValueError(f"{op}: tensors is empty")
    if _split(tensors) is not None or not _compiled(tensors[0].device):
        return reference.clip_grad_norm_(tensors, max_norm, eps)  # several devices: one norm across all
    with _below_autograd():
        return torch.ops.pymaml.clip_grad_norm_.default(tensors, float(max_norm), float(eps))
