"""Input validation and dtype rules shared by ``pymaml.ops`` and the pure-torch ``pymaml.reference``.

Every error names the op and the offending values, e.g.
``sgd_update: params and grads differ in length: 12 vs 11``.
Each public op validates its inputs once, here, whichever backend then runs it.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

LrLike = Union[float, Tensor, Sequence[Tensor]]

#: dtypes whose arithmetic runs in float32 and is rounded once on the way out
LOW_PRECISION = (torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for inputs of ``dtype`` (float32 for half types)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def as_list(op: str, name: str, tensors) -> list:
    if isinstance(tensors, Tensor):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got a single Tensor")
    try:
        out = list(tensors)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(tensors).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return out


def check_floating(op: str, name: str, tensors: Sequence[Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; only floating-point tensors are supported")


def check_pairs(op: str, names: Sequence[str], lists: Sequence[Sequence[Tensor]]) -> None:
    """Same length, and per index the same shape, dtype and device as the first list."""
    ref_name, ref = names[0], lists[0]
    for name, other in zip(names[1:], lists[1:]):
        if len(other) != len(ref):
            raise ValueError(f"{op}: {ref_name} and {name} differ in length: {len(ref)} vs {len(other)}")
    check_floating(op, ref_name, ref)
    for name, other in zip(names[1:], lists[1:]):
        for i, (a, b) in enumerate(zip(ref, other)):
            if a.shape != b.shape:
                raise ValueError(
                    f"{op}: {ref_name}[{i}] and {name}[{i}] differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
            if a.device != b.device:
                raise ValueError(f"{op}: {ref_name}[{i}] is on {a.device} but {name}[{i}] is on {b.device}")
            if a.dtype != b.dtype:
                raise TypeError(f"{op}: {ref_name}[{i}] has dtype {a.dtype} but {name}[{i}] has dtype {b.dtype}")


def check_number(op: str, name: str, x) -> float:
    """A finite real Python number (a NaN or Inf step size, weight decay or ε would silently turn
    every parameter into NaN), as a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(x).__name__} {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"{op}: {name} must be finite, got {x}")
    return float(x)


def normalize_lr(op: str, lr: LrLike, params: Sequence[Tensor], name: str = "lr"):
    """Returns ("float", float) | ("shared", 0-d Tensor) | ("list", list[Tensor]).

    A list entry is either one number for its tensor (numel 1) or one per element (the param's shape).
    """
    if isinstance(lr, (bool, str, bytes)) or lr is None:
        raise TypeError(f"{op}: {name} must be a float, a 0-d Tensor or a list of Tensors, got {type(lr).__name__}")
    if isinstance(lr, (int, float)):
        return "float", check_number(op, name, lr)
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{op}: a single Tensor {name} must hold one number, got shape {tuple(lr.shape)}; "
                             f"pass a list for per-tensor or per-element step sizes")
        if not lr.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} has dtype {lr.dtype}; only floating-point step sizes are supported")
        if params and lr.device != params[0].device and lr.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {lr.device} but params[0] is on {params[0].device}")
        return "shared", lr
    lrs = as_list(op, name, lr)
    if len(lrs) != len(params):
        raise ValueError(f"{op}: {name} has {len(lrs)} entries but there are {len(params)} params")
    check_floating(op, name, lrs)
    for i, (a, p) in enumerate(zip(lrs, params)):
        if a.numel() != 1 and a.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(a.shape)}; expected one number or the "
                             f"shape of params[{i}], {tuple(p.shape)}")
        if a.device != p.device:
            raise ValueError(f"{op}: {name}[{i}] is on {a.device} but params[{i}] is on {p.device}")
    return "list", lrs


def check_update(op: str, params, grads, lr: LrLike):
    """``sgd_update``/``sgd_update_`` inputs -> (params, grads, lr kind, normalized lr)."""
    params = as_list(op, "params", params)
    grads = as_list(op, "grads", grads)
    check_pairs(op, ("params", "grads"), (params, grads))
    kind, lr = normalize_lr(op, lr, params)
    return params, grads, kind, lr


def check_no_grad(op: str, params: Sequence[Tensor]) -> None:
    """In-place ops are for no-grad use."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{op}: params require grad; the in-place update is for no-grad use. "
                           f"Wrap the call in torch.no_grad() or use sgd_update (out of place).")


def check_step(op: str, v, hvp, grads, lr: LrLike, next_lr):
    """``backward_step`` inputs -> (v, hvp, grads, kind, lr, next kind or None, next lr or None)."""
    v = as_list(op, "v", v)
    hvp = as_list(op, "hvp", hvp)
    grads = as_list(op, "grads", grads)
    check_pairs(op, ("v", "hvp", "grads"), (v, hvp, grads))
    kind, lr = normalize_lr(op, lr, v)
    nkind, nlr = (None, None) if next_lr is None else normalize_lr(op, next_lr, v, "next_lr")
    return v, hvp, grads, kind, lr, nkind, nlr


def check_found_inf(op: str, name: str, found_inf, tensors: Sequence[Tensor]):
    """The optional non-finite flag of the fused ops: None, or a float32 tensor on the device of
    ``tensors`` holding one number or one per tensor (shape (n,)). Returns it."""
    if found_inf is None:
        return None
    if not isinstance(found_inf, Tensor):
        raise TypeError(f"{op}: found_inf must be a Tensor or None, got {type(found_inf).__name__}")
    if found_inf.dtype != torch.float32:
        raise TypeError(f"{op}: found_inf has dtype {found_inf.dtype}; it must be torch.float32")
    n = len(tensors)
    if found_inf.numel() != 1 and not (found_inf.dim() == 1 and found_inf.numel() == n):
        raise ValueError(f"{op}: found_inf has shape {tuple(found_inf.shape)}; it must hold one number, "
                         f"or one per tensor of {name} (shape ({n},))")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: found_inf needs every tensor of {name} on one device, got "
                         f"{sorted(map(str, devices))}")
    if n and found_inf.device != tensors[0].device:
        raise ValueError(f"{op}: found_inf is on {found_inf.device} but {name}[0] is on {tensors[0].device}")
    return found_inf


def check_eps(op: str, eps) -> None:
    """A non-zero float or a one-element Tensor."""
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise ValueError(f"{op}: eps must hold one number, got shape {tuple(eps.shape)}")
        return
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"{op}: eps must be a float or a one-element Tensor, got {type(eps).__name__}")
    if eps == 0:
        raise ValueError(f"{op}: eps must be non-zero, got {eps}")
    if not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be finite, got {eps}")


def check_fd(op: str, names: Sequence[str], a, b, eps):
    """``fd_perturb``/``fd_quotient`` inputs -> (a, b) as lists."""
    a = as_list(op, names[0], a)
    b = as_list(op, names[1], b)
    check_pairs(op, names, (a, b))
    check_eps(op, eps)
    return a, b


def check_loss_scale(op: str, scale) -> float:
    """A finite number > 0 (a loss scale; a GradScaler's ``get_scale()``)."""
    scale = check_number(op, "loss_scale", scale)
    if not scale > 0:
        raise ValueError(f"{op}: loss_scale must be > 0, got {scale}")
    return scale


def check_clip(op: str, max_norm, eps) -> None:
    if not max_norm > 0:
        raise ValueError(f"{op}: max_norm must be positive, got {max_norm}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_norm(op: str, tensors) -> list:
    tensors = as_list(op, "tensors", tensors)
    check_floating(op, "tensors", tensors)
    if not tensors:
        raise ValueError(f"{op}: tensors is empty")
    return tensors
