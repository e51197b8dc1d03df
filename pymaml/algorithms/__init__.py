"""The MAML family on the shared engine, one small module each.

========  =====================================================================================
name      what it is
========  =====================================================================================
maml      exact second-order MAML (Finn et al. 2017)
fomaml    first-order MAML (Hessian terms dropped)
reptile   Reptile (Nichol et al. 2018): surrogate gradient θ − θ_K
anil      ANIL (Raghu et al. 2020): only the head adapts
metasgd   Meta-SGD (Li et al. 2017): learned per-element step sizes
mamlpp    MAML++ (Antoniou et al. 2019): per-step per-tensor step sizes, multi-step loss,
          derivative-order annealing
imaml     iMAML (Rajeswaran et al. 2019): proximal inner loop, implicit gradient by CG
========  =====================================================================================

``make(name, model, loss_fn, **settings)`` builds one by name; :class:`pymaml.MetaOptimizer` takes
the same names (``algorithm="maml"``).

Names
-----
The classes carry the algorithms' names from their papers (``MAML``, ``FOMAML``, ``iMAML``, ...) and
live only in this package. Two classes named ``MAML`` exist on purpose and are never confused by
an import of this package:

* ``pymaml.algorithms.MAML``: this algorithm (an :class:`Algorithm`: settings, meta-gradient,
  evaluation), used through :class:`pymaml.MetaOptimizer` or on its own;
* ``pymaml.MAML``: the learn2learn-style model wrapper (``clone()`` / ``adapt(loss)``), named after
  ``learn2learn.algorithms.MAML`` so that learn2learn scripts run by changing one import.

The top-level ``pymaml`` namespace exports the wrapper, never an algorithm class; reach the
algorithms as ``pymaml.algorithms.<Name>`` or by name.
"""
from .anil import ANIL
from .base import Algorithm, MetaStep, as_tasks, head_names
from .fomaml import FOMAML
from .imaml import iMAML
from .maml import MAML
from .mamlpp import MAMLpp
from .metasgd import MetaSGD
from .reptile import Reptile

ALGORITHMS = {"maml": MAML, "fomaml": FOMAML, "reptile": Reptile, "anil": ANIL, "metasgd": MetaSGD,
              "mamlpp": MAMLpp, "imaml": iMAML}


def make(name: str, model, loss_fn, **settings) -> Algorithm:
    """The algorithm called ``name`` (see ``ALGORITHMS``) for ``model``."""
    try:
        cls = ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"algorithms.make: unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}") from None
    return cls(model, loss_fn, **settings)


__all__ = ["Algorithm", "MetaStep", "ALGORITHMS", "make", "as_tasks", "head_names",
           "MAML", "FOMAML", "Reptile", "ANIL", "MetaSGD", "MAMLpp", "iMAML"]
