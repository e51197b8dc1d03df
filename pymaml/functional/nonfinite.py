"""Where the fused ops of one meta-gradient met NaN or Inf, recorded on the device.

The forward sweep's ``sgd_update`` of inner step i and the adjoint sweep's ``backward_step`` of
step i each get a view of one row of a small float32 tensor as their ``found_inf`` flag (one entry
per adapted tensor, see :mod:`pymaml.reference.updates`), which the kernels set in the same pass as
their work. Nothing is read during the sweeps; a caller that wants to know copies the whole record
to the host once and only then looks for the first step that went wrong (:meth:`StepFlags.first`).

Reptile records row 0 only (its inner loop); iMAML records its proximal inner loop in row 0 and
the check of its implicit meta-gradient (the conjugate-gradient solve, see
:mod:`pymaml.algorithms.imaml`) in row 1, with its own description (``rows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["StepFlags"]

#: (op, what its row covers), by row of :attr:`StepFlags.flags`
ROWS = (("sgd_update", "inner step {i}: θ_{j} = θ_{i} − α_{i} ⊙ g_{i}, the support gradient g_{i} or θ_{i}"),
        ("backward_step", "adjoint step {i}: v_{i} = v_{j} − H_{i}(α_{i} ⊙ v_{j}), the Hessian-vector product "
                          "of step {i}, the adjoint v_{j} or the step sizes"))


@dataclass
class StepFlags:
    """flags[0, i, j]: ``sgd_update`` of inner step i met a non-finite value for adapted tensor j;
    flags[1, i, j]: ``backward_step`` of adjoint step i did. ``names[j]`` names tensor j; ``rows``
    says, per row, the op and what it covers (a template formatted with i and j = i + 1)."""
    flags: Tensor
    names: List[str]
    rows: Tuple[Tuple[str, str], ...] = ROWS

    @staticmethod
    def new(names: Sequence[str], tensors: Sequence[Tensor], steps: int,
            rows: Tuple[Tuple[str, str], ...] = ROWS) -> Optional["StepFlags"]:
        """Zeroed flags for ``steps`` inner steps over ``tensors`` (None when there is nothing to
        flag, or the tensors span several devices: one flag tensor serves one device)."""
        if steps == 0 or not tensors or any(t.device != tensors[0].device for t in tensors):
            return None
        return StepFlags(torch.zeros(2, steps, len(tensors), dtype=torch.float32, device=tensors[0].device),
                         list(names), rows)

    def slot(self, row: int, i: int) -> Tensor:
        """The ``found_inf`` of one op call: one entry per adapted tensor."""
        return self.flags[row, i]

    def first(self, host: Tensor) -> Optional[str]:
        """From a host copy of :attr:`flags`, where a non-finite value first appeared, in the order
        the sweeps run (inner steps 0 … K−1, then adjoint steps K−1 … 0); None when nowhere."""
        K = host.shape[1]
        for row, order in ((0, range(K)), (1, reversed(range(K)))):
            for i in order:
                bad = [self.names[j] for j in host[row, i].nonzero().flatten().tolist()]
                if bad:
                    op, what = self.rows[row]
                    return f"{op} at {what.format(i=i, j=i + 1)}, in {bad}"
        return None
