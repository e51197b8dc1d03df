"""Functional core of pymaml: the inner loop, HVP strategies and the meta-gradient engines.

    from pymaml.functional import Task, meta_gradient, adapt, MetaGradient

See :func:`meta_gradient` (engines ``unrolled``/``recompute``/``first_order``),
:func:`adapt` (the inner loop alone), :mod:`.buffers` (the BatchNorm/dropout policy) and
:mod:`.batching` (vmap vs loop).
"""
from .engines import ENGINES, MetaGradient, meta_gradient
from .hvp import HVP_METHODS
from .inner import Task, adapt

__all__ = ["Task", "meta_gradient", "adapt", "MetaGradient", "ENGINES", "HVP_METHODS"]
