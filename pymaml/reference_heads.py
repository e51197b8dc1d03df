"""Former location of :mod:`pymaml.reference.heads`; kept so existing imports keep working."""
from .reference.heads import *  # noqa: F401,F403
from .reference.heads import __all__  # noqa: F401
