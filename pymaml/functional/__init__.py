"""Functional core of pymaml: the inner loop, HVP strategies and the meta-gradient engines.

    from pymaml.functional import Task, meta_gradient, inner_loop, MetaGradient

See :func:`meta_gradient` (engines ``unrolled``/``recompute``/``first_order``; the sweeps they share
are in :mod:`.sweep`), :func:`inner_loop` (the inner loop alone; ``adapt`` is its former name),
:mod:`.buffers` (the BatchNorm/dropout policy), :mod:`.batching` (vmap vs loop) and :mod:`.hessian`
(Hessian-vector products; the ``hvp=`` option of :func:`meta_gradient` picks one of its methods).
"""
from .engines import ENGINES, MetaGradient, meta_gradient
from .hessian import HVP_METHODS
from .inner import Task, adapt, inner_loop
from .layout import MEMORY_FORMATS

__all__ = ["Task", "meta_gradient", "inner_loop", "adapt", "MetaGradient", "ENGINES", "HVP_METHODS",
           "MEMORY_FORMATS"]
