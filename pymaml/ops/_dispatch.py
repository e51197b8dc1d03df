"""What every op wrapper of :mod:`pymaml.ops` shares: which path serves a device, device grouping,
calls below the autograd key.

The compiled path serves a device type when :func:`pymaml._backend.compiled_available` says so
(decided once per op and device type). When the package runs compiled and a call still has to take
the pure-torch path (a device type without kernels), :func:`compiled` records it
(:func:`pymaml._backend.note_fallback`: a counter shown by ``python -m pymaml.info`` and a warning
the first time). Nothing else falls back: an error raised by a kernel reaches the caller.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend

COMPILED = _backend.backend() == "compiled"
below_autograd = torch._C._AutoDispatchBelowAutograd
_grad_enabled = torch.is_grad_enabled
_ONES: Dict[torch.device, Tensor] = {}


def compiled(op: str, device: torch.device) -> bool:
    """Whether ``op`` runs compiled for ``device``; counts the call as a fallback when the package
    runs compiled but this device type has no kernel."""
    if not COMPILED:
        return False
    if _backend.compiled_available(op, device):
        return True
    _backend.note_fallback(op, device.type)
    return False


def needs_grad(*groups) -> bool:
    """Whether autograd must see the call: grad mode on and some tensor requires grad."""
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


def call(op, grad: bool, *args):
    """``op(*args)``, below the autograd dispatch key when no autograd is needed (no Python
    autograd overhead)."""
    if grad:
        return op(*args)
    with below_autograd():
        return op(*args)


def split(tensors: List[Tensor]) -> Optional[List[Tuple[torch.device, List[int]]]]:
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


def groups_of(tensors: List[Tensor]) -> List[Tuple[torch.device, Optional[List[int]]]]:
    """[(device, indices or None for all)]: one group per device, [] for an empty list."""
    return split(tensors) or ([(tensors[0].device, None)] if tensors else [])


def pick(lst, idx):
    return lst if idx is None else [lst[i] for i in idx]


def scatter(n: int, parts) -> list:
    out = [None] * n
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            out[i] = v
    return out


def lr_args(kind, lr, device):
    """Maps a normalized lr onto the schema: (float lr or None, lrs list or None)."""
    if kind == "float":
        return lr, None
    if kind == "shared":
        return None, [lr if lr.device == device else lr.to(device, non_blocking=True)]
    return None, lr


def one(device: torch.device) -> Tensor:
    t = _ONES.get(device)
    if t is None:
        t = _ONES[device] = torch.ones((), device=device)
    return t


def one_device(tensors) -> bool:
    """Whether a non-empty list lies on one device (CPU checked the cheap way)."""
    if tensors[0].is_cpu:
        return all(t.is_cpu for t in tensors)
    d0 = tensors[0].device
    return all(t.device == d0 for t in tensors)


def same_doc(reference_fn):
    """Gives the wrapper the reference's docstring: the contract is written once, in pymaml.reference."""
    def deco(fn):
        fn.__doc__ = reference_fn.__doc__
        return fn
    return deco
