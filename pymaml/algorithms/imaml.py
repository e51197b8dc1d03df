"""iMAML (Rajeswaran et al. 2019): implicit gradients through a proximal inner loop.

Inner loop: φ ≈ argmin_φ L_s(φ) + λ/2 ‖φ − θ‖², by ``inner_steps`` SGD steps from φ = θ (the update
through the fused ``pymaml.ops.sgd_update``). Meta-gradient per task:

    (I + H/λ)⁻¹ ∇L_q(φ),   H = ∇²L_s(φ)

solved by ``cg_steps`` iterations of conjugate gradient, each one HVP at φ (double backward). The
meta-gradient is exact when φ is the exact proximal minimiser and CG has converged; it does not
depend on the path the inner loop took, so memory is independent of ``inner_steps``.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..functional.buffers import batch_norm_policy
from .base import Algorithm, MetaStep, task_list


def _dot(a: List[Tensor], b: List[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def conjugate_gradient(A, b: List[Tensor], steps: int, tol: float = 1e-12) -> List[Tensor]:
    """x ≈ A⁻¹ b for a symmetric operator A on lists of tensors, by conjugate gradient.

    Truncated where A shows non-positive curvature along the search direction (I + H/λ is
    indefinite when the support loss is non-convex and λ is small): the iterate so far is returned,
    or b itself (the first-order answer) if that happens at the first iteration.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    for k in range(steps):
        if float(rs) <= tol:
            break
        Ap = A(p)
        curv = _dot(p, Ap)
        if not float(curv) > 0:
            return [t.clone() for t in b] if k == 0 else x
        alpha = rs / curv
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, Ap)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


class iMAML(Algorithm):
    name = "imaml"
    second_order = True

    def __init__(self, model, loss_fn, *, lam: float = 1.0, cg_steps: int = 5, **kw):
        super().__init__(model, loss_fn, **kw)
        if lam <= 0:
            raise ValueError(f"imaml: lam (the proximal strength λ) must be positive, got {lam}")
        self.lam, self.cg_steps = float(lam), int(cg_steps)

    def _call(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, params, (x,))

    def adapt(self, support: Tuple[Tensor, Tensor], steps: Optional[int] = None) -> Dict[str, Tensor]:
        """The proximal inner loop: φ_{i+1} = φ_i − α(∇L_s(φ_i) + λ(φ_i − θ))."""
        steps = self.eval_steps if steps is None else steps
        theta = {n: p.detach() for n, p in self.params().items()}
        names = list(theta)
        phi = [theta[n] for n in names]
        x, y = support
        with batch_norm_policy(self.model), torch.enable_grad():
            for _ in range(steps):
                leaves = [t.detach().requires_grad_() for t in phi]
                loss = self.loss_fn(self._call(dict(zip(names, leaves)), x), y)
                g = torch.autograd.grad(loss, leaves, allow_unused=True)
                g = [(torch.zeros_like(t) if gi is None else gi) + self.lam * (t.detach() - theta[n])
                     for gi, t, n in zip(g, leaves, names)]
                with torch.no_grad():
                    phi = ops.sgd_update([t.detach() for t in leaves], g, self.inner_lr, self.weight_decay)
        return dict(zip(names, phi))

    def _hvp(self, names, phi: List[Tensor], support, u: List[Tensor]) -> List[Tensor]:
        leaves = [t.detach().requires_grad_() for t in phi]
        with torch.enable_grad():
            loss = self.loss_fn(self._call(dict(zip(names, leaves)), support[0]), support[1])
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            dot = sum((gi * ui).sum() for gi, ui in zip(g, u) if gi is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                return [torch.zeros_like(t) for t in phi]
            h = torch.autograd.grad(dot, leaves, allow_unused=True)
        return [torch.zeros_like(t) if hi is None else hi for hi, t in zip(h, phi)]

    def meta_gradient(self, tasks) -> MetaStep:
        tasks = task_list(tasks)
        names = list(self.params())
        total = [torch.zeros_like(p) for p in self.params().values()]
        q_losses, s_losses, outputs = [], [], []
        with batch_norm_policy(self.model):
            for t in tasks:
                with torch.no_grad():
                    s_losses.append(self.loss_fn(self._call({n: p.detach() for n, p in self.params().items()},
                                                            t.support[0]), t.support[1]))
                fast = self.adapt(t.support, self.inner_steps)
                phi = [fast[n] for n in names]
                leaves = [p.detach().requires_grad_() for p in phi]
                with torch.enable_grad():
                    out = self._call(dict(zip(names, leaves)), t.query[0])
                    lq = self.loss_fn(out, t.query[1])
                    gq = torch.autograd.grad(lq, leaves, allow_unused=True)
                gq = [torch.zeros_like(p) if g is None else g for g, p in zip(gq, phi)]
                A = lambda v, phi=phi, s=t.support: [vi + hi / self.lam
                                                    for vi, hi in zip(v, self._hvp(names, phi, s, v))]
                x = conjugate_gradient(A, gq, self.cg_steps)
                total = [a + b for a, b in zip(total, x)]
                q_losses.append(lq.detach())
                outputs.append(out.detach())
        T = len(tasks)
        self.iteration += 1
        return MetaStep(grads={n: g / T for n, g in zip(names, total)}, extra_grads={},
                        query_loss=torch.stack(q_losses).mean(), query_outputs=outputs,
                        support_loss=torch.stack(s_losses).mean(),
                        info={"engine": "implicit (CG)", "hvp": "double_backward", "task_batching": "loop"})
