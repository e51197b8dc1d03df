"""The forward and adjoint sweeps of the meta-gradient, written once (the recursion of docs/design.md).

Forward: θ_0 = θ, θ_{i+1} = θ_i − α_i ⊙ (g_i + λθ_i) with g_i = ∇L_s(θ_i), keeping only θ_0 … θ_K;
the query loss gives v_K = w_K ∇L_q(θ_K) (and w_i ∇L_q(θ_i) for a multi-step loss). Backward:

    v_i = v_{i+1} − (H_i + λI)(α_i ⊙ v_{i+1}) + w_i ∇L_q(θ_i),   ∂L/∂α_i = −(g_i + λθ_i) ⊙ v_{i+1}

through the fused ``pymaml.ops.backward_step``. Inputs that the inner loop does not adapt (fixed
parameters φ, or a linear head's features) collect ∂L_q/∂(fixed) from every weighted query loss
minus the mixed second derivatives Σ_i ∇²_{fixed,θ} L_s(θ_i)(α_i ⊙ v_{i+1}).

What differs between engines is only where losses, gradients and HVPs come from: a :class:`Steps`
object supplies them. The HVP is pluggable: ``Steps.hvp`` (autograd on the model:
:class:`pymaml.functional.engines.ModelSteps`; closed form on a linear head:
:class:`pymaml.functional.head_path.HeadSteps`) or none at all (``second_order=False``: first order,
H := 0 and no mixed terms).

Non-finite values: with ``Setup.flags`` (a :class:`pymaml.functional.nonfinite.StepFlags`) the
update of inner step i and the adjoint step i set their own slot of it on the device, in the same
pass (``found_inf`` of the fused ops); the mixed terms of step i, which reach only the fixed inputs'
gradients and no fused op, are checked on the device where they are made
(:meth:`Steps.mixed_ok`, :meth:`~pymaml.functional.nonfinite.StepFlags.raise_fixed`). Nothing is
read here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..reference.updates import finite
from .inner import LrPlan, mul_lr

__all__ = ["Setup", "Steps", "Forward", "UnitResult", "forward_sweep", "adjoint_sweep"]


@dataclass
class Setup:
    """What every task unit of one meta-gradient computation shares."""
    names_ad: List[str]                 # adapted parameter names (θ)
    names_fx: List[str]                 # fixed parameter names (φ)
    theta0: List[Tensor]                # θ, in the layout the computation runs in
    phi0: List[Tensor]                  # φ
    plan: LrPlan                        # step sizes α_i
    steps: int                          # K
    weights: Optional[List[float]]      # MAML++ step weights w_1 … w_K (None: only L_q(θ_K))
    weight_decay: float                 # λ
    scale: float                        # 1 / number of tasks (the meta-loss is the mean)
    hvp: Optional[str] = None           # HVP method of the recompute engine
    keep_graph_bytes: float = 0.0       # recompute + double backward: graphs kept within this budget
    tape: object = None                 # the RngTape of the call
    bn: object = None                   # the BatchNormPolicy of the call (marks counted forward passes)
    flags: object = None                # StepFlags: where the fused ops met NaN or Inf (None: not recorded)

    def flag(self, row: int, i: int) -> Optional[Tensor]:
        """The ``found_inf`` of the fused op of row ``row`` (0 update, 1 adjoint step) at step i."""
        return None if self.flags is None else self.flags.slot(row, i)


class UnitResult(NamedTuple):
    """One unit's contribution (already scaled by ``Setup.scale``); losses are sums over its tasks."""
    theta_grads: List[Tensor]
    phi_grads: List[Tensor]
    lr_grads: List[Optional[Tensor]]
    query_loss: Tensor
    support_loss: Tensor
    meta_loss: Tensor
    outputs: List[Tensor]


class Steps:
    """Where the sweeps get their numbers from. Subclasses implement the methods below."""

    T: Optional[int] = None             # task-stack size (None: one task)
    needs_grads = False                 # hvp() does not return g_i: the forward sweep keeps them

    def start(self, theta0: Sequence[Tensor]) -> List[Tensor]:
        """θ_0 as the sweeps work on it (detached; stacked over tasks)."""
        raise NotImplementedError

    def fixed_zeros(self) -> List[Tensor]:
        """Zero accumulators for the gradients of the fixed inputs."""
        raise NotImplementedError

    def support_grad(self, i: int, theta: List[Tensor]):
        """(L_s(θ_i), ∇L_s(θ_i)) at inner step i."""
        raise NotImplementedError

    def support_loss(self, theta: List[Tensor]) -> Tensor:
        """L_s(θ) alone (reported when there are no inner steps)."""
        raise NotImplementedError

    def query_grad(self, theta: List[Tensor]):
        """(L_q(θ), outputs, ∇_θ L_q, [∂L_q/∂fixed or None per fixed input])."""
        raise NotImplementedError

    def hvp(self, i: int, theta: List[Tensor], u: List[Tensor], grad: Optional[List[Tensor]]):
        """(g_i or None, H_i u, [mixed term or None per fixed input]) at step i."""
        raise NotImplementedError

    def mixed_ok(self, mixed: Sequence[Optional[Tensor]]) -> List[Tensor]:
        """Whether each mixed term of :meth:`hvp` is finite (0-d bools on the device), one per fixed
        parameter (a single one counts for every fixed parameter)."""
        dev = next((m.device for m in mixed if m is not None), None)
        if dev is None:
            return []
        return [finite(m.detach()) if m is not None else torch.ones((), dtype=torch.bool, device=dev) for m in mixed]

    def forward_done(self) -> None:
        """Called after the last query loss of the forward sweep."""

    def adjoint_done(self) -> None:
        """Called after the adjoint sweep."""


@dataclass
class Forward:
    """What the forward sweep keeps for the adjoint sweep."""
    thetas: List[List[Tensor]]                    # θ_0 … θ_K
    grads: List[List[Tensor]]                     # g_0 … g_{K−1} when kept, else []
    query_grads: Dict[int, List[Tensor]]          # i < K -> w_i · scale · ∇_θ L_q(θ_i)
    v: List[Tensor]                               # v_K = w_K · scale · ∇_θ L_q(θ_K)
    fixed: List[Tensor]                           # Σ_i w_i · scale · ∂L_q(θ_i)/∂fixed
    query_loss: Tensor
    support_loss: Tensor
    meta_loss: Tensor
    query_out: Tensor


def _add(acc: List[Tensor], grads: Sequence[Optional[Tensor]], w: Optional[float] = None) -> List[Tensor]:
    """acc + w · grads (None entries skipped; w None means 1)."""
    return [a if g is None else a + (g if w is None else w * g) for a, g in zip(acc, grads)]


def forward_sweep(steps: Steps, setup: Setup, keep_grads: bool) -> Forward:
    plan, K, weights, scale, T = setup.plan, setup.steps, setup.weights, setup.scale, steps.T
    theta = steps.start(setup.theta0)
    thetas, gs, qg = [theta], [], {}
    fixed = steps.fixed_zeros()
    s_loss = None
    meta = 0.0
    for i in range(K):
        loss, g = steps.support_grad(i, theta)
        if s_loss is None:
            s_loss = loss
        if keep_grads:
            gs.append(g)
        with torch.no_grad():
            theta = ops.sgd_update(theta, g, plan.step_lr(i, T), setup.weight_decay, found_inf=setup.flag(0, i))
        thetas.append(theta)
        if weights is not None and i + 1 < K:
            lq, _, gq, gf = steps.query_grad(theta)
            w = weights[i] * scale
            qg[i + 1] = [w * t for t in gq]
            fixed = _add(fixed, gf, w)
            meta = meta + weights[i] * lq
    lq, out, gq, gf = steps.query_grad(theta)
    steps.forward_done()
    w = weights[-1] if weights is not None else 1.0
    meta = meta + w * lq
    f = w * scale
    one = isinstance(f, float) and f == 1.0
    v = gq if one else [f * t for t in gq]
    fixed = _add(fixed, gf, None if one else f)
    if s_loss is None:
        s_loss = steps.support_loss(theta)
    return Forward(thetas=thetas, grads=gs, query_grads=qg, v=v, fixed=fixed, query_loss=lq, support_loss=s_loss,
                   meta_loss=meta, query_out=out)


def adjoint_sweep(steps: Steps, fwd: Forward, setup: Setup, second_order: bool = True,
                  lr_acc: Optional[List[Optional[Tensor]]] = None):
    """(v_0, fixed-input gradients, per-leaf ∂L/∂α) from the forward sweep's record; ∂L/∂α is added
    into ``lr_acc`` when given (in place)."""
    plan, K, wd, T = setup.plan, setup.steps, setup.weight_decay, steps.T
    v, fixed = fwd.v, fwd.fixed
    if lr_acc is None:
        lr_acc = plan.zero_grads()
    need_lr = plan.any_tensor
    u = mul_lr(plan.step_lr(K - 1, T), v) if (second_order and K > 0) else None
    for i in reversed(range(K)):
        q = fwd.query_grads.get(i)
        if not second_order and not need_lr:
            if q is not None:  # v_i = v_{i+1} + w_i ∇L_q(θ_i): nothing else to compute
                v = [a + b for a, b in zip(v, q)]
            continue
        if second_order:
            g, hu, mu = steps.hvp(i, fwd.thetas[i], u, fwd.grads[i] if fwd.grads else None)
            if g is None:
                g = fwd.grads[i]
            fixed = [a if m is None else a - m for a, m in zip(fixed, mu)]
            if setup.flags is not None and setup.flags.fixed:
                setup.flags.raise_fixed(i, steps.mixed_ok(mu))
            if wd:
                hu = [h + wd * x for h, x in zip(hu, u)]
        else:
            g, hu = fwd.grads[i], None
        if wd:
            g = [gi + wd * t for gi, t in zip(g, fwd.thetas[i])]
        if q is not None:
            hu = [-t for t in q] if hu is None else [h - t for h, t in zip(hu, q)]
        elif hu is None:
            hu = [torch.zeros_like(t) for t in v]
        nxt = plan.step_lr(i - 1, T) if (second_order and i > 0) else None
        v, lr_grad, u = ops.backward_step(v, hu, g, plan.step_lr(i, T), nxt, found_inf=setup.flag(1, i))
        plan.accumulate(lr_acc, i, lr_grad, T)
    steps.adjoint_done()
    return v, fixed, lr_acc
