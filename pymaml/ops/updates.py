"""The fused update (``sgd_update``, ``sgd_update_``) and the adjoint step (``backward_step``).

The common call (tensors on one device served by the compiled kernels, lists given as lists, a
float or same-device step size) goes straight to the kernel, whose C++ checks
(csrc/include/pymaml/ops.h) reject what :mod:`pymaml._checks` rejects. When the kernel raises,
the inputs are validated in Python so that an invalid call gets the reference's exact message; a
valid call's kernel error is raised as it is (the kernels check their inputs before writing, so an
in-place update is never applied twice). Everything else takes the full path: validation, device
grouping, then the kernel or the reference per device.

``found_inf`` (the non-finite flag, contract in :mod:`pymaml.reference.updates`) goes to the
kernels' ``found_inf`` overloads, which set it in the same pass. Those overloads mutate the flag and
so carry no autograd formula: when autograd must record the call, the default overload runs and the
flag is set from its outputs by a second pass on the device (still no host sync).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from .._checks import LrLike, as_list, check_found_inf, check_no_grad, check_number, check_step, check_update
from ..reference import updates as reference
from ._dispatch import (COMPILED, below_autograd, call, compiled, groups_of, lr_args, needs_grad, one_device, pick,
                        same_doc, scatter, split)

_SEQ = (list, tuple)
# The CPU kernels' availability is fixed at import (CUDA is decided on first use): one flag read.
_CPU_OK = COMPILED and _backend.compiled_available("sgd_update", "cpu")
if COMPILED:
    _K_UPDATE = torch.ops.pymaml.sgd_update.default
    _K_UPDATE_LRS = torch.ops.pymaml.sgd_update_lrs.default
    _K_UPDATE_ = torch.ops.pymaml.sgd_update_.default
    _K_UPDATE_LRS_ = torch.ops.pymaml.sgd_update_lrs_.default
    _K_STEP = torch.ops.pymaml.backward_step.default
    _K_UPDATE_F = torch.ops.pymaml.sgd_update.found_inf
    _K_UPDATE_LRS_F = torch.ops.pymaml.sgd_update_lrs.found_inf
    _K_STEP_F = torch.ops.pymaml.backward_step.found_inf


def _direct(op: str, tensors) -> bool:
    """Whether a call may go straight to the kernel: lists, non-empty, one device with kernels."""
    if type(tensors) not in _SEQ or not tensors:
        return False
    if tensors[0].is_cpu:
        if not _CPU_OK:
            return False
    elif not (COMPILED and _backend.compiled_available(op, tensors[0].device)):
        return False
    return one_device(tensors)


def _direct_lr(lr, params):
    """(float, None) | (None, lrs) in the kernel's form, or None when the full path must map it."""
    if type(lr) is float or (isinstance(lr, int) and not isinstance(lr, bool)):
        if lr - lr != 0:  # NaN or Inf: the full path raises
            return None
        return float(lr), None
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.device != params[0].device:
            return None
        return None, [lr]
    if isinstance(lr, _SEQ):
        if len(lr) != len(params):  # the kernels read a one-entry list as shared; the API does not
            return None
        return None, lr
    return None


def _direct_wd(wd) -> Optional[float]:
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd - wd != 0:
        return None  # the full path validates (and names) it
    return float(wd)


def _flag_from(found_inf: Optional[Tensor], *lists) -> None:
    """Sets ``found_inf`` from outputs already computed (the autograd case): tensor i is non-finite
    when entry i of any list is (a single tensor in ``lists`` counts for every i)."""
    if found_inf is None or not lists[0]:
        return
    ok = []
    with torch.no_grad():
        for i in range(len(lists[0])):
            vals = [x if isinstance(x, Tensor) else x[i] for x in lists if x is not None]
            ok.append(reference.finite(*vals))
    reference.raise_flag(found_inf, ok)


def _update_kernel(params, grads, flr, lrs, wd, found_inf):
    """The compiled update of one device's lists (lrs None: the float flr)."""
    grad = needs_grad(params, grads, lrs)
    if found_inf is None or grad:
        out = (call(_K_UPDATE, grad, params, grads, flr, wd) if lrs is None
               else call(_K_UPDATE_LRS, grad, params, grads, lrs, wd))
        _flag_from(found_inf, out)
        return out
    with below_autograd():
        if lrs is None:
            return _K_UPDATE_F(params, grads, flr, wd, found_inf=found_inf)
        return _K_UPDATE_LRS_F(params, grads, lrs, wd, found_inf=found_inf)


# ----------------------------------------------------------------------------- fused update
def _update_group(params, grads, kind, lr, wd, device, found_inf=None):
    flr, lrs = lr_args(kind, lr, device)
    return _update_kernel(params, grads, flr, lrs, wd, found_inf)


@same_doc(reference.sgd_update)
def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
               weight_decay: float = 0.0, found_inf: Optional[Tensor] = None) -> List[Tensor]:
    op = "sgd_update"
    if _direct(op, params) and type(grads) in _SEQ and (found_inf is None or type(found_inf) is Tensor):
        lr_k, wd = _direct_lr(lr, params), _direct_wd(weight_decay)
        if lr_k is not None and wd is not None:
            flr, lrs = lr_k
            try:
                return _update_kernel(params, grads, flr, lrs, wd, found_inf)
            except Exception:
                check_update(op, params, grads, lr)  # an invalid call: the reference's message
                check_found_inf(op, "params", found_inf, params)
                raise
    params, grads, kind, lr = check_update(op, params, grads, lr)
    wd = check_number(op, "weight_decay", weight_decay)
    found_inf = check_found_inf(op, "params", found_inf, params)
    parts = []
    for dev, idx in groups_of(params):
        p, g = pick(params, idx), pick(grads, idx)
        sub = pick(lr, idx) if kind == "list" else lr
        out = (_update_group(p, g, kind, sub, wd, dev, found_inf) if compiled(op, dev)
               else reference.sgd_update_core(p, g, kind, sub, wd, found_inf))
        if idx is None:
            return list(out)
        parts.append((idx, out))
    return scatter(len(params), parts)


@same_doc(reference.sgd_update_)
def sgd_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                weight_decay: float = 0.0, found_inf: Optional[Tensor] = None) -> None:
    op = "sgd_update_"
    if _direct("sgd_update", params) and type(grads) in _SEQ and (found_inf is None or type(found_inf) is Tensor):
        lr_k, wd = _direct_lr(lr, params), _direct_wd(weight_decay)
        if lr_k is not None and wd is not None:
            check_no_grad(op, params)
            flr, lrs = lr_k
            try:
                flag = {} if found_inf is None else {"found_inf": found_inf}
                with below_autograd():
                    if lrs is None:
                        _K_UPDATE_(params, grads, flr, wd, **flag)
                    else:
                        _K_UPDATE_LRS_(params, grads, lrs, wd, **flag)
                return None
            except Exception:
                check_update(op, params, grads, lr)  # an invalid call: the reference's message
                check_found_inf(op, "params", found_inf, params)
                raise
    check_no_grad(op, as_list(op, "params", params))
    params, grads, kind, lr = check_update(op, params, grads, lr)
    wd = check_number(op, "weight_decay", weight_decay)
    found_inf = check_found_inf(op, "params", found_inf, params)
    for dev, idx in groups_of(params):
        p, g = pick(params, idx), pick(grads, idx)
        sub = pick(lr, idx) if kind == "list" else lr
        if not compiled(op, dev):
            reference.sgd_update_core_(p, g, kind, sub, wd, found_inf)
            continue
        flr, lrs = lr_args(kind, sub, dev)
        with below_autograd():
            if lrs is None:
                torch.ops.pymaml.sgd_update_.default(p, g, flr, wd, found_inf=found_inf)
            else:
                torch.ops.pymaml.sgd_update_lrs_.default(p, g, lrs, wd, found_inf=found_inf)


# ----------------------------------------------------------------------------- backward step
def _step_kernel(v, hvp, grads, lrs, next_lrs, next_f, has_next, found_inf):
    """The compiled adjoint step of one device's lists, in the schema's form."""
    grad = needs_grad(v, hvp, grads, next_lrs)
    if found_inf is None or grad:
        out = call(_K_STEP, grad, v, hvp, grads, lrs, next_lrs, next_f, has_next)
        lg = out[1]
        _flag_from(found_inf, out[0], out[2] or None,
                   None if not lg else (lg if len(lg) == len(v) else lg[0]))
        return out
    with below_autograd():
        return _K_STEP_F(v, hvp, grads, lrs, next_lrs, next_f, has_next, found_inf=found_inf)


def _step_group(v, hvp, grads, kind, lr, nkind, nlr, device, found_inf=None):
    _, lrs = lr_args(kind, lr, device) if kind != "float" else (None, [])
    if nkind is None:
        next_lrs, next_f, has_next = [], 0.0, False
    else:
        next_f, next_lrs = lr_args(nkind, nlr, device)
        next_lrs, next_f, has_next = (next_lrs or []), (0.0 if next_f is None else next_f), True
    return _step_kernel(v, hvp, grads, lrs, next_lrs, next_f, has_next, found_inf)


def _lr_grad_form(kind, lr, lr_grad):
    if kind == "float":
        return None
    if kind == "shared":
        g = lr_grad[0]
        return g if g.device == lr.device else g.to(lr.device)
    return list(lr_grad)


def _direct_step(v, hvp, grads, lr, next_lr, found_inf):
    """The kernel's result for a call that may go straight to it, else None."""
    if not (_direct("backward_step", v) and type(hvp) in _SEQ and type(grads) in _SEQ
            and (found_inf is None or type(found_inf) is Tensor)):
        return None
    lr_k = _direct_lr(lr, v)
    nxt = (0.0, None) if next_lr is None else _direct_lr(next_lr, v)
    if lr_k is None or nxt is None:
        return None
    lrs, (next_f, next_lrs) = lr_k[1], nxt
    has_next = next_lr is not None
    next_f, next_lrs = (0.0 if next_f is None else next_f), (next_lrs or [])
    try:
        v_out, lr_grad, u_next = _step_kernel(v, hvp, grads, lrs or [], next_lrs, next_f, has_next, found_inf)
    except Exception:
        check_step("backward_step", v, hvp, grads, lr, next_lr)  # an invalid call: the reference's message
        check_found_inf("backward_step", "v", found_inf, v)
        raise
    if lrs is None:
        lr_grad = None
    elif isinstance(lr, Tensor):
        lr_grad = lr_grad[0]
    return v_out, lr_grad, (u_next if has_next else None)


@same_doc(reference.backward_step)
def backward_step(v: Sequence[Tensor], hvp: Sequence[Tensor], grads: Sequence[Tensor], lr: LrLike,
                  next_lr: Optional[LrLike] = None, found_inf: Optional[Tensor] = None
                  ) -> Tuple[List[Tensor], Union[None, Tensor, List[Tensor]], Optional[List[Tensor]]]:
    out = _direct_step(v, hvp, grads, lr, next_lr, found_inf)
    if out is not None:
        return out
    op = "backward_step"
    v, hvp, grads, kind, lr, nkind, nlr = check_step(op, v, hvp, grads, lr, next_lr)
    found_inf = check_found_inf(op, "v", found_inf, v)
    groups = split(v)
    if groups is None:
        if not v or not compiled(op, v[0].device):
            return reference.backward_step_core(v, hvp, grads, kind, lr, nkind, nlr, found_inf)
        v_out, lr_grad, u_next = _step_group(v, hvp, grads, kind, lr, nkind, nlr, v[0].device, found_inf)
        return v_out, _lr_grad_form(kind, lr, lr_grad), (u_next if nkind is not None else None)
    vo_parts, lg_parts, u_parts, shared_total = [], [], [], None
    for dev, idx in groups:
        sv, sh, sg = pick(v, idx), pick(hvp, idx), pick(grads, idx)
        sub = pick(lr, idx) if kind == "list" else lr
        nsub = pick(nlr, idx) if nkind == "list" else nlr
        if compiled(op, dev):
            vo, lg, un = _step_group(sv, sh, sg, kind, sub, nkind, nsub, dev)
            lg = _lr_grad_form(kind, sub, lg)
        else:
            vo, lg, un = reference.backward_step_core(sv, sh, sg, kind, sub, nkind, nsub)
        vo_parts.append((idx, vo))
        if nkind is not None:
            u_parts.append((idx, un))
        if kind == "list":
            lg_parts.append((idx, lg))
        elif kind == "shared":
            lg = lg.to(lr.device)
            shared_total = lg if shared_total is None else shared_total + lg
    n = len(v)
    lr_grad = None if kind == "float" else (shared_total if kind == "shared" else scatter(n, lg_parts))
    return scatter(n, vo_parts), lr_grad, (scatter(n, u_parts) if nkind is not None else None)
