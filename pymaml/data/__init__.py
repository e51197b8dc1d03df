"""Task samplers: sinusoid regression and Omniglot few-shot classification."""
from .sinusoid import SinusoidTasks
from .omniglot import Omniglot, OmniglotTasks, load_images

__all__ = ["SinusoidTasks", "Omniglot", "OmniglotTasks", "load_images"]
