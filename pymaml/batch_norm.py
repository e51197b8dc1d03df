"""Former location of :func:`pymaml.ops.batch_norm`; kept so existing imports keep working."""
from __future__ import annotations

import torch

from . import _backend
from .ops import batch_norm

__all__ = ["batch_norm", "compiled_available"]


def compiled_available(device: torch.device) -> bool:
    """Whether BatchNorm on ``device`` runs on the compiled ops (``pymaml._backend.compiled_available``)."""
    return _backend.compiled_available("batch_norm_double_backward", device)
