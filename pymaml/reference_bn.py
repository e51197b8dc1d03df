"""Former location of :mod:`pymaml.reference.batchnorm`; kept so existing imports keep working."""
from .reference.batchnorm import *  # noqa: F401,F403
from .reference.batchnorm import __all__  # noqa: F401
