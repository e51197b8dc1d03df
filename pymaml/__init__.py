"""pymaml: fast gradient-based meta-learning for PyTorch."""
from . import reference
from . import ops
from ._backend import backend, backend_reason

__version__ = "0.1.0"

from . import algorithms
from .optim import MetaOptimizer
from .wrapper import MAML, MetaSGD
from .module_utils import clone_module, detach_module, update_module
