"""pymaml: fast gradient-based meta-learning for PyTorch."""
from . import reference
from . import reference as ops  # replaced by the dispatching ops module once the extension lands

__version__ = "0.1.0"
