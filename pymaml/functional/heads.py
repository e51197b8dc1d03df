"""Former location of :func:`pymaml.ops.linear_head_hvp`; kept so existing imports keep working."""
from __future__ import annotations

import torch

from .. import _backend
from ..ops import HeadHVP, linear_head_hvp

__all__ = ["HeadHVP", "linear_head_hvp", "compiled_available", "register_python_kernels"]


def compiled_available(device: torch.device) -> bool:
    """Whether the op runs compiled on ``device`` (``pymaml._backend.compiled_available``)."""
    return _backend.compiled_available("linear_head_hvp", device)


def register_python_kernels() -> bool:
    """Kept for old callers: the registrations now run once, when pymaml imports its extension
    (:mod:`pymaml._registration`). Returns whether they did."""
    return _backend.extension_loaded()
