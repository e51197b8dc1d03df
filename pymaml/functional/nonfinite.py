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

from ..reference.updates import raise_flag

__all__ = ["StepFlags"]

#: (op, what its row covers), by row of :attr:`StepFlags.flags`
ROWS = (("sgd_update", "inner step {i}: θ_{j} = θ_{i} − α_{i} ⊙ g_{i}, the support gradient g_{i} or θ_{i}"),
        ("backward_step", "adjoint step {i}: v_{i} = v_{j} − H_{i}(α_{i} ⊙ v_{j}), the Hessian-vector product "
                          "of step {i}, the adjoint v_{j} or the step sizes"))
#: what the fixed inputs' columns of row 1 cover
MIXED = ("hvp", "adjoint step {i}: the mixed second derivative ∇²_{{φθ}} L_s(θ_{i})(α_{i} ⊙ v_{j}) passed to the "
                "inputs the inner loop does not adapt")


@dataclass
class StepFlags:
    """flags[0, i, j]: ``sgd_update`` of inner step i met a non-finite value for adapted tensor j;
    flags[1, i, j]: ``backward_step`` of adjoint step i did. ``names[j]`` names tensor j; ``rows``
    says, per row, the op and what it covers (a template formatted with i and j = i + 1).

    The last ``fixed`` columns stand for the parameters the inner loop does not adapt: row 1 of
    those records a non-finite mixed second derivative of adjoint step i, which reaches only their
    meta-gradient and so no fused op (:meth:`raise_fixed`)."""
    flags: Tensor
    names: List[str]
    rows: Tuple[Tuple[str, str], ...] = ROWS
    fixed: int = 0

    @staticmethod
    def new(names: Sequence[str], tensors: Sequence[Tensor], steps: int,
            rows: Tuple[Tuple[str, str], ...] = ROWS, fixed_names: Sequence[str] = (),
            fixed: Sequence[Tensor] = ()) -> Optional["StepFlags"]:
        """Zeroed flags for ``steps`` inner steps over ``tensors`` and the ``fixed`` inputs (None when
        there is nothing to flag, or the tensors span several devices: one flag tensor serves one
        device; fixed inputs on another device than ``tensors`` get no columns)."""
        if steps == 0 or not tensors or any(t.device != tensors[0].device for t in tensors):
            return None
        if any(t.device != tensors[0].device for t in fixed):
            fixed_names, fixed = (), ()
        return StepFlags(torch.zeros(2, steps, len(tensors) + len(fixed), dtype=torch.float32,
                                     device=tensors[0].device),
                         list(names) + list(fixed_names), rows, len(fixed))

    def slot(self, row: int, i: int) -> Tensor:
        """The ``found_inf`` of one op call: one entry per adapted tensor."""
        return self.flags[row, i, :self.flags.shape[2] - self.fixed]

    def raise_fixed(self, i: int, ok: List[Tensor]) -> None:
        """Records, on the device, which fixed inputs' mixed terms of adjoint step i were not finite
        (``ok``: one 0-d bool per fixed input, or a single one for all of them)."""
        if self.fixed and ok:
            raise_flag(self.flags[1, i, self.flags.shape[2] - self.fixed:], ok)

    def first(self, host: Tensor) -> Optional[str]:
        """From a host copy of :attr:`flags`, where a non-finite value first appeared, in the order
        the sweeps run (inner steps 0 … K−1, then adjoint steps K−1 … 0); None when nowhere."""
        K, n = host.shape[1], host.shape[2] - self.fixed
        for row, order in ((0, range(K)), (1, reversed(range(K)))):
            for i in order:
                bad = host[row, i].nonzero().flatten().tolist()
                found = []
                for (op, what), cols in ((self.rows[row], [j for j in bad if j < n]),
                                         (MIXED, [j for j in bad if j >= n])):
                    if cols:
                        found.append(f"{op} at {what.format(i=i, j=i + 1)}, in {[self.names[j] for j in cols]}")
                if found:
                    return "; and ".join(found)
        return None
