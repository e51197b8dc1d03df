"""ANIL (Raghu et al. 2020): only the head adapts in the inner loop; the body is meta-learned.

The engine receives ``adapt=<head names>``; the body's share of the meta-gradient is the mixed
second-derivative term (exact, second order), or dropped with ``first_order=True``. ``head`` names
default to the model's ``head.*`` parameters (or its last ``nn.Linear``).
"""
from typing import List, Optional, Sequence

from .base import Algorithm, head_names


class ANIL(Algorithm):
    name = "anil"

    def __init__(self, model, loss_fn, *, head: Optional[Sequence[str]] = None, first_order: bool = False, **kw):
        self.second_order = not first_order  # read by the base class's checks and engine settings
        super().__init__(model, loss_fn, **kw)
        self.head = list(head) if head is not None else head_names(model)

    @property
    def first_order(self) -> bool:
        return not self.second_order

    def adapted_names(self) -> List[str]:
        return self.head
