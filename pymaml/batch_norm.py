"""Former location of :func:`pymaml.ops.batch_norm`; kept so existing imports keep working."""
from __future__ import annotations

import torch

from . import _backend
from .ops import batch_norm

__all__ = ["batch_norm", "compiled_available", "register_python_kernels"]


def compiled_available(device: torch.device) -> bool:
    """Whether BatchNorm on ``device`` runs on the compiled ops (``pymaml._backend.compiled_available``)."""
    return _backend.compiled_available("batch_norm_double_backward", device)


def register_python_kernels() -> bool:
    """Kept for old callers: the registrations now run once, when pymaml imports its extension
    (:mod:`pymaml._registration`). Returns whether they did."""
    return _backend.extension_loaded()
