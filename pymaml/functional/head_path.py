"""The recompute engine's fast path for head-only adaptation (ANIL) with a linear head.

When the adapted parameters are exactly those of a linear head (``model.head``, an ``nn.Linear``)
on a body ``model.features`` with ``model(x) == model.head(model.features(x))`` (the convention
of :mod:`pymaml.models`), and the loss is the mean cross-entropy or mean squared error, the body
does not change during adaptation, so:

* the support and query features X_s, X_q are computed once per task (one body forward each);
* every inner step and every query loss is a small linear-head computation on those features;
* every HVP is the closed-form ``pymaml.functional.heads.linear_head_hvp`` (compiled op or its
  pure-torch twin; no autograd graph), which also returns the mixed term ∂⟨∇_{W,b} L_s, u⟩/∂X_s;
* the body's meta-gradient is then ONE ordinary backward pass through the body, with the
  accumulated ∂L/∂X_s (minus the mixed terms) and ∂L/∂X_q as output gradients.

The adjoint recursion for the head (v, ∂L/∂α, step weights, weight decay) is the same as in the
general recompute engine, through ``pymaml.ops.backward_step``. Models with random layers are not
taken down this path (features computed once would share their random numbers across steps).
Whether ``forward == head ∘ features`` holds is checked once per model object on real data; when
it does not, the general path is used.
"""
from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .buffers import has_randomness
from .inner import LrPlan, mul_lr

__all__ = ["head_loss_kind", "applicable", "run_head_path"]

_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def head_loss_kind(loss_fn: Callable) -> Optional[str]:
    """"cross_entropy" / "mse" for losses the closed form covers (means, no weights/smoothing)."""
    if loss_fn is F.cross_entropy:
        return "cross_entropy"
    if loss_fn is F.mse_loss:
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        ok = (loss_fn.weight is None and loss_fn.reduction == "mean" and loss_fn.label_smoothing == 0.0)
        return "cross_entropy" if ok else None
    if isinstance(loss_fn, nn.MSELoss):
        return "mse" if loss_fn.reduction == "mean" else None
    return None


class _Features(nn.Module):
    """``model.features`` as a module's forward, so ``functional_call`` can run it on a params dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m.features(x)


def applicable(model: nn.Module, names_ad: Sequence[str], loss_fn: Callable) -> Optional[str]:
    """The loss kind when the fast path's structural conditions hold, else None."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "features", None)):
        return None
    wanted = {"head.weight"} | ({"head.bias"} if head.bias is not None else set())
    if set(names_ad) != wanted or len(names_ad) != len(wanted):
        return None
    if has_randomness(model):
        return None
    return head_loss_kind(loss_fn)


def _split_task(unit):
    """Per-task (support, query) pairs of a unit (a stacked unit is sliced)."""
    if not unit.batched:
        return [(unit.support, unit.query)]
    return [(tuple(t[i] for t in unit.support), tuple(t[i] for t in unit.query)) for i in range(unit.T)]


def verify(model, names_ad, names_fx, params, x) -> bool:
    """forward(x) == head(features(x)) on one real batch, once per model object."""
    if model in _VERIFIED:
        return _VERIFIED[model]
    from .inner import model_call
    with torch.no_grad():
        th = [params[n] for n in names_ad]
        ph = [params[n] for n in names_fx]
        out = model_call(model, names_ad, names_fx, th, ph, x)
        feats = torch.func.functional_call(_Features(model), {"m." + n: p for n, p in params.items()}, (x,))
        d = dict(zip(names_ad, th))
        alt = F.linear(feats, d["head.weight"], d.get("head.bias"))
        ok = out.shape == alt.shape and torch.allclose(out, alt, rtol=1e-5, atol=1e-6)
    _VERIFIED[model] = bool(ok)
    return bool(ok)


def run_head_path(model, loss_kind: str, unit, names_ad, names_fx, theta0, phi0, plan: LrPlan, steps,
                  weights, wd, scale):
    """The recompute engine's result tuple for one unit (see engines._recompute), on the fast path."""
    from ..ops import linear_head_hvp
    fmod = _Features(model)
    loss_fn = F.cross_entropy if loss_kind == "cross_entropy" else F.mse_loss
    i_w = names_ad.index("head.weight")
    i_b = names_ad.index("head.bias") if "head.bias" in names_ad else None
    n_ad = len(names_ad)
    th_acc: List[Optional[Tensor]] = [None] * n_ad
    ph_acc: List[Optional[Tensor]] = [None] * len(phi0)
    lr_acc = plan.zero_grads()
    q_sum = s_sum = m_sum = 0.0
    outputs = []

    def head(X, th):
        return F.linear(X, th[i_w], th[i_b] if i_b is not None else None)

    def head_grads(X, y, th, with_x=False):
        th_ = [t.detach().requires_grad_() for t in th]
        Xl = X.detach().requires_grad_(with_x)
        with torch.enable_grad():
            out = head(Xl, th_)
            loss = loss_fn(out, y)
            wrt = th_ + ([Xl] if with_x else [])
            g = torch.autograd.grad(loss, wrt)
        return loss.detach(), out.detach(), list(g[:n_ad]), (g[n_ad] if with_x else None)

    for (xs, ys), (xq, yq) in _split_task(unit):
        ph = [p.detach().requires_grad_() for p in phi0]
        pd = {"m." + n: p for n, p in zip(names_fx, ph)}
        pd.update({"m." + n: t.detach() for n, t in zip(names_ad, theta0)})
        with torch.enable_grad():
            Xs = torch.func.functional_call(fmod, pd, (xs,))
            Xq = torch.func.functional_call(fmod, pd, (xq,))
        Xs_d, Xq_d = Xs.detach(), Xq.detach()
        theta = [t.detach() for t in theta0]
        thetas, gs, qg = [theta], [], {}
        gXq = torch.zeros_like(Xq_d)
        meta = 0.0
        s_loss = None
        for i in range(steps):
            loss, _, g, _ = head_grads(Xs_d, ys, theta)
            s_loss = loss if s_loss is None else s_loss
            gs.append(g)
            with torch.no_grad():
                theta = ops.sgd_update(theta, g, plan.step_lr(i), wd)
            thetas.append(theta)
            if weights is not None and i + 1 < steps:
                lq, _, gq, gx = head_grads(Xq_d, yq, theta, with_x=True)
                w = weights[i] * scale
                qg[i + 1] = [w * t for t in gq]
                gXq = gXq + w * gx
                meta = meta + weights[i] * lq
        lq, out, gq, gx = head_grads(Xq_d, yq, theta, with_x=True)
        w = weights[-1] if weights is not None else 1.0
        meta = meta + w * lq
        v = [(w * scale) * t for t in gq]
        gXq = gXq + (w * scale) * gx
        if s_loss is None:
            s_loss = loss_fn(head(Xs_d, theta), ys).detach()
        gXs = torch.zeros_like(Xs_d)
        u = mul_lr(plan.step_lr(steps - 1), v) if steps > 0 else None
        for i in reversed(range(steps)):
            th_i = thetas[i]
            r = linear_head_hvp(Xs_d, th_i[i_w], th_i[i_b] if i_b is not None else None, ys,
                                u[i_w], u[i_b] if i_b is not None else None, loss_kind)
            hu = [None] * n_ad
            hu[i_w] = r.hvp_weight
            if i_b is not None:
                hu[i_b] = r.hvp_bias
            gXs = gXs - r.grad_x
            g = gs[i]
            if wd:
                hu = [h + wd * x for h, x in zip(hu, u)]
                g = [gi + wd * t for gi, t in zip(g, th_i)]
            if i in qg:
                hu = [h - q for h, q in zip(hu, qg[i])]
            nxt = plan.step_lr(i - 1) if i > 0 else None
            v, lr_grad, u = ops.backward_step(v, hu, g, plan.step_lr(i), nxt)
            plan.accumulate(lr_acc, i, lr_grad)
        if ph:
            with torch.enable_grad():
                body = torch.autograd.grad([Xs, Xq], ph, grad_outputs=[gXs, gXq], allow_unused=True)
            body = [torch.zeros_like(p) if b is None else b for b, p in zip(body, ph)]
        else:
            body = []
        th_acc = [b if a is None else a + b for a, b in zip(th_acc, v)]
        ph_acc = [b if a is None else a + b for a, b in zip(ph_acc, body)]
        q_sum, s_sum, m_sum = q_sum + lq, s_sum + s_loss, m_sum + meta
        outputs.append(out)
    ph_acc = [torch.zeros_like(p) if a is None else a for a, p in zip(ph_acc, phi0)]
    return th_acc, ph_acc, lr_acc, q_sum, s_sum, m_sum, outputs
