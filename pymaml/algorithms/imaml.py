"""iMAML (Rajeswaran et al. 2019): implicit gradients through a proximal inner loop.

Inner loop: φ ≈ argmin_φ L_s(φ) + λ/2 ‖φ − θ‖², by ``inner_steps`` SGD steps from φ = θ (the update
through the fused ``pymaml.ops.sgd_update``). Meta-gradient per task:

    (I + H/λ)⁻¹ ∇L_q(φ),   H = ∇²L_s(φ)

solved by ``cg_steps`` iterations of conjugate gradient, each one Hessian-vector product at φ from
:mod:`pymaml.functional.hessian` (``hvp=``: "auto" = double backward, "jvp", "finite_difference"). The
meta-gradient is exact when φ is the exact proximal minimiser and CG has converged; it does not
depend on the path the inner loop took, so memory is independent of ``inner_steps``.

Settings: ``engine="auto"`` (the implicit gradient) or ``"first_order"`` (∇L_q(φ), no CG: first-order
iMAML); the unrolled and recompute engines differentiate the inner loop's path, which iMAML by
design does not, so they raise. Tasks run one at a time (``task_batching="vmap"`` raises);
``memory_format`` and ``batch_norm`` are honoured as by the engines (the support passes of the
proximal loop and the query pass count for BatchNorm running statistics; HVP passes do not).

Non-finite values are recorded on the device (:class:`pymaml.functional.nonfinite.StepFlags`,
shared by the tasks) for :class:`pymaml.MetaOptimizer` to name: row 0, entry i, by the fused update
of proximal step i; row 1, entry 0, by the implicit meta-gradient, when the query gradient
∇L_q(φ), a Hessian-vector product of the conjugate-gradient solve or its solution holds NaN or Inf
(a non-finite product would otherwise end the solve as if the curvature were negative, and the
first-order answer would hide it).
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .._checks import check_loss_scale
from ..functional import Task, layout as _layout
from ..functional.batching import Unit
from ..functional.buffers import batch_norm_policy
from ..functional.engines import DEFAULT_HVP
from ..functional.hessian import hessian_vector_product, loss_and_grad
from ..functional.nonfinite import StepFlags
from ..reference.updates import finite, raise_flag
from .base import Algorithm, MetaStep, task_list


def _dot(a: List[Tensor], b: List[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


#: StepFlags rows of iMAML: its proximal inner loop, its implicit meta-gradient
ROWS = (("sgd_update", "proximal inner step {i}: φ_{j} = φ_{i} − α(∇L_s(φ_{i}) + λ(φ_{i} − θ)), the support "
                       "gradient at φ_{i} or φ_{i}"),
        ("conjugate_gradient", "the implicit meta-gradient (I + H/λ)⁻¹ ∇L_q(φ): the query gradient ∇L_q(φ), a "
                               "Hessian-vector product at φ or the solution"))


def _flag(found_inf: Optional[Tensor], tensors: List[Tensor]) -> None:
    """found_inf[j] ← 1 where tensors[j] holds NaN or Inf, on the device (no host sync)."""
    if found_inf is not None:
        raise_flag(found_inf, [finite(t.detach()) for t in tensors])


def conjugate_gradient(A, b: List[Tensor], steps: int, tol: float = 1e-12,
                       found_inf: Optional[Tensor] = None) -> List[Tensor]:
    """x ≈ A⁻¹ b for a symmetric operator A on lists of tensors, by conjugate gradient.

    Truncated where A shows non-positive or non-finite curvature along the search direction (I + H/λ
    is indefinite when the support loss is non-convex and λ is small), or the residual is not
    finite: the iterate so far is returned, or b itself (the first-order answer) if that happens at
    the first iteration.

    ``found_inf`` (optional, float32, one entry or one per tensor) is set on the device where b, a
    product A(p) or the result holds NaN or Inf. A non-finite product ends the solve with a finite
    iterate, so without the flag it would go unnoticed; ending there also keeps the flag to the
    tensors where the product first went wrong.
    """
    _flag(found_inf, b)
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    for k in range(steps):
        rs_h = float(rs)
        if rs_h <= tol:
            break
        if not math.isfinite(rs_h):
            x = [t.clone() for t in b] if k == 0 else x
            break
        Ap = A(p)
        _flag(found_inf, Ap)
        curv = _dot(p, Ap)
        if not 0 < float(curv) < math.inf:
            x = [t.clone() for t in b] if k == 0 else x
            break
        alpha = rs / curv
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, Ap)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    _flag(found_inf, x)
    return x


class iMAML(Algorithm):
    name = "imaml"
    second_order = True
    supported = {"engine": ("auto", "first_order"), "task_batching": ("auto", "loop")}

    def __init__(self, model, loss_fn, *, lam: float = 1.0, cg_steps: int = 5, **kw):
        super().__init__(model, loss_fn, **kw)
        if lam <= 0:
            raise ValueError(f"imaml: lam (the proximal strength λ) must be positive, got {lam}")
        self.lam, self.cg_steps = float(lam), int(cg_steps)

    def _why(self, key: str) -> str:
        if key == "engine":
            return "its meta-gradient is implicit (conjugate gradient at the adapted parameters), not a " \
                   "derivative through the inner loop"
        return "conjugate gradient runs one task at a time"

    def _unit(self, task: Task) -> Unit:
        return Unit(self.model, self.loss_fn, list(self.params()), [], task, batched=False)

    def _proximal(self, unit: Unit, theta: List[Tensor], steps: int, bn,
                  flags: Optional[StepFlags] = None) -> List[Tensor]:
        """φ_{i+1} = φ_i − α(∇L_s(φ_i) + λ(φ_i − θ)), from φ_0 = θ; each support pass counts for
        BatchNorm running statistics; ``flags`` (row 0) records non-finite updates."""
        phi = theta
        for i in range(steps):
            with bn.counted():
                _, _, g, _ = loss_and_grad(unit, phi, [], "s")
            g = [gi + self.lam * (p - t) for gi, p, t in zip(g, phi, theta)]
            with torch.no_grad():
                phi = ops.sgd_update(phi, g, self.inner_lr, self.weight_decay,
                                     found_inf=None if flags is None else flags.slot(0, i))
        return phi

    def adapt(self, support: Tuple[Tensor, Tensor], steps: Optional[int] = None,
              params: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
        """The proximal inner loop from ``params`` (default: the model's parameters)."""
        steps = self.eval_steps if steps is None else steps
        theta = params if params is not None else {n: p.detach() for n, p in self.params().items()}
        unit = Unit(self.model, self.loss_fn, list(theta), [], Task(support, support), batched=False)
        with batch_norm_policy(self.model, policy=self.batch_norm) as bn:
            phi = self._proximal(unit, list(theta.values()), steps, bn)
        return dict(zip(theta, phi))

    def meta_gradient(self, tasks, loss_scale: float = 1.0) -> MetaStep:
        loss_scale = check_loss_scale(f"{self.name}.meta_gradient", loss_scale)
        tasks = task_list(tasks)
        own = {n: p.detach() for n, p in self.params().items()}
        layout = _layout.resolve(self.name, self.memory_format, self.model, list(own.values()), False)
        theta = [_layout.to_layout(p, layout) for p in own.values()]
        method = DEFAULT_HVP if self.hvp == "auto" else self.hvp
        total = [torch.zeros_like(p) for p in theta]
        flags = StepFlags.new(list(own), theta, max(self.inner_steps, 1), rows=ROWS)
        solution = None if flags is None else flags.slot(1, 0)
        q_losses, s_losses, outputs = [], [], []
        with batch_norm_policy(self.model, policy=self.batch_norm) as bn:
            for t in tasks:
                unit = self._unit(t)
                unit.to_layout(layout)
                with torch.no_grad():
                    s_losses.append(unit.loss(theta, [], "s")[0])
                phi = self._proximal(unit, theta, self.inner_steps, bn, flags)
                unit.query_scale = loss_scale
                with bn.counted():
                    lq, out, gq, _ = loss_and_grad(unit, phi, [], "q")
                lq = lq / loss_scale
                if self.engine == "first_order":
                    x = gq
                    _flag(solution, x)
                else:
                    def A(v, phi=phi, unit=unit):
                        hv = hessian_vector_product(method, unit, phi, [], v)[1]
                        return [vi + hi / self.lam for vi, hi in zip(v, hv)]
                    x = conjugate_gradient(A, gq, self.cg_steps, found_inf=solution)
                total = [a + b for a, b in zip(total, x)]
                q_losses.append(lq)
                outputs.append(out)
        T = len(tasks)
        self.iteration += 1
        grads = {n: _layout.like(g / T, p) for (n, p), g in zip(own.items(), total)}
        return MetaStep(grads=grads, extra_grads={}, query_loss=torch.stack(q_losses).mean(), query_outputs=outputs,
                        support_loss=torch.stack(s_losses).mean(),
                        info={"engine": "implicit (CG)" if self.engine != "first_order" else "first_order",
                              "hvp": method if self.engine != "first_order" else None, "task_batching": "loop",
                              "memory_format": layout, "batch_norm": self.batch_norm}, nonfinite=flags)
