"""Former location of :func:`pymaml.ops.linear_head_hvp`; kept so existing imports keep working."""
from __future__ import annotations

import torch

from .. import _backend
from ..ops import HeadHVP, linear_head_hvp

__all__ = ["HeadHVP", "linear_head_hvp", "compiled_available"]


def compiled_available(device: torch.device) -> bool:
    """Whether the op runs compiled on ``device`` (``pymaml._backend.compiled_available``)."""
    return _backend.compiled_available("linear_head_hvp", device)
