"""Former name of :mod:`pymaml.functional.hessian`; kept so existing imports keep working."""
from .hessian import *  # noqa: F401,F403
from .hessian import __all__  # noqa: F401
