"""Finite-difference helpers (``fd_perturb``, ``fd_quotient``) and norms (``global_norm``,
``clip_grad_norm_``): validation once (:mod:`pymaml._checks`), then the kernel or the reference per
device."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_clip, check_fd, check_norm
from ..reference import updates as reference
from ._dispatch import below_autograd, call, compiled, groups_of, needs_grad, one, pick, same_doc, scatter, split


def _eps_args(eps, device: torch.device):
    """Validated eps -> (eps float, eps_scale tensor on device), the schema's form."""
    if isinstance(eps, Tensor):
        return 1.0, (eps if eps.device == device else eps.to(device, non_blocking=True))
    return float(eps), one(device)


def _fd(op: str, names, ref, a, b, eps):
    a, b = check_fd(op, names, a, b, eps)
    parts = []
    for dev, idx in groups_of(a):
        x, y = pick(a, idx), pick(b, idx)
        if compiled(op, dev):
            e, s = _eps_args(eps, dev)
            out = call(getattr(torch.ops.pymaml, op).default, needs_grad(x, y, s), x, y, e, s)
        else:
            out = ref(x, y, eps)
        parts.append((idx, out))
    return parts, len(a)


@same_doc(reference.fd_perturb)
def fd_perturb(params: Sequence[Tensor], direction: Sequence[Tensor], eps) -> Tuple[List[Tensor], List[Tensor]]:
    parts, n = _fd("fd_perturb", ("params", "direction"), reference.fd_perturb_core, params, direction, eps)
    if len(parts) == 1 and parts[0][0] is None:
        pl, mi = parts[0][1]
        return list(pl), list(mi)
    return (scatter(n, [(idx, out[0]) for idx, out in parts]),
            scatter(n, [(idx, out[1]) for idx, out in parts]))


@same_doc(reference.fd_quotient)
def fd_quotient(grads_plus: Sequence[Tensor], grads_minus: Sequence[Tensor], eps) -> List[Tensor]:
    parts, n = _fd("fd_quotient", ("grads_plus", "grads_minus"), reference.fd_quotient_core,
                   grads_plus, grads_minus, eps)
    if len(parts) == 1 and parts[0][0] is None:
        return list(parts[0][1])
    return scatter(n, parts)


@same_doc(reference.global_norm)
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    op = "global_norm"
    tensors = check_norm(op, tensors)
    groups = split(tensors)
    if groups is None:
        if not compiled(op, tensors[0].device):
            return reference.global_norm_core(tensors)
        return call(torch.ops.pymaml.global_norm.default, needs_grad(tensors), tensors)
    # One norm per device, combined as the norm of the norms: the reference does exactly that
    # combination (accumulation dtype, result on the first group's device = tensors[0].device).
    norms = []
    for dev, idx in groups:
        sub = pick(tensors, idx)
        norms.append(call(torch.ops.pymaml.global_norm.default, needs_grad(sub), sub)
                     if compiled(op, dev) else reference.global_norm_core(sub))
    return reference.global_norm_core(norms)


@same_doc(reference.clip_grad_norm_)
def clip_grad_norm_(tensors: Sequence[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    op = "clip_grad_norm_"
    check_clip(op, max_norm, eps)
    tensors = check_norm(op, tensors)
    if split(tensors) is not None or not compiled(op, tensors[0].device):
        return reference.clip_grad_norm_core(tensors, max_norm, eps)  # several devices: one norm across all
    with below_autograd():
        return torch.ops.pymaml.clip_grad_norm_.default(tensors, float(max_norm), float(eps))
