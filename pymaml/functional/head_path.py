"""The recompute engine's fast path for head-only adaptation (ANIL) with a linear head.

When the adapted parameters are exactly those of a linear head (``model.head``, an ``nn.Linear``)
on a body ``model.features`` with ``model(x) == model.head(model.features(x))`` (the convention
of :mod:`pymaml.models`), and the loss is the mean cross-entropy or mean squared error, the body
does not change during adaptation, so:

* the support and query features X_s, X_q are computed once per task (one body forward each);
* every inner step and every query loss is a small linear-head computation on those features;
* every HVP is the closed-form ``pymaml.ops.linear_head_hvp`` (compiled op or its
  pure-torch twin; no autograd graph), which also returns the mixed term ∂⟨∇_{W,b} L_s, u⟩/∂X_s;
* the body's meta-gradient is then ONE ordinary backward pass through the body, with the
  accumulated ∂L/∂X_s (minus the mixed terms) and ∂L/∂X_q as output gradients.

The forward and adjoint sweeps are those of every engine (:mod:`pymaml.functional.sweep`), with the
head's numbers supplied by :class:`HeadSteps`. Models with random layers are not
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
from ..reference.updates import finite
from .buffers import has_randomness
from .sweep import Setup, Steps, UnitResult, adjoint_sweep, forward_sweep

__all__ = ["head_loss_kind", "applicable", "verify", "HeadSteps", "run_head_path"]

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


class HeadSteps(Steps):
    """The sweeps' numbers for one task on the head-only path: losses and gradients of the linear head
    on the body's features (computed once), HVPs in closed form. The fixed inputs are the support
    and query features [X_s, X_q]: the query losses give ∂L/∂X_q, the HVPs' mixed terms ∂/∂X_s."""

    needs_grads = True  # the closed form gives H u and the mixed term, not g

    def __init__(self, loss_kind: str, names_ad: Sequence[str], Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor,
                 query_scale: float = 1.0):
        self.kind, self.query_scale = loss_kind, query_scale
        self.loss_fn = F.cross_entropy if loss_kind == "cross_entropy" else F.mse_loss
        self.i_w = names_ad.index("head.weight")
        self.i_b = names_ad.index("head.bias") if "head.bias" in names_ad else None
        self.n = len(names_ad)
        self.Xs, self.ys, self.Xq, self.yq = Xs, ys, Xq, yq

    def _head(self, X, th):
        return F.linear(X, th[self.i_w], th[self.i_b] if self.i_b is not None else None)

    def _grads(self, X, y, th, with_x=False, scale=1.0):
        th_ = [t.detach().requires_grad_() for t in th]
        Xl = X.detach().requires_grad_(with_x)
        with torch.enable_grad():
            out = self._head(Xl, th_)
            loss = self.loss_fn(out, y)
            if scale != 1.0:
                loss = loss * scale
            g = torch.autograd.grad(loss, th_ + ([Xl] if with_x else []))
        return loss.detach(), out.detach(), list(g[:self.n]), (g[self.n] if with_x else None)

    def start(self, theta0):
        return [t.detach() for t in theta0]

    def fixed_zeros(self):
        return [torch.zeros_like(self.Xs), torch.zeros_like(self.Xq)]

    def support_grad(self, i, theta):
        loss, _, g, _ = self._grads(self.Xs, self.ys, theta)
        return loss, g

    def support_loss(self, theta):
        return self.loss_fn(self._head(self.Xs, theta), self.ys).detach()

    def query_grad(self, theta):
        loss, out, g, gx = self._grads(self.Xq, self.yq, theta, with_x=True, scale=self.query_scale)
        return loss, out, g, [None, gx]

    def hvp(self, i, theta, u, grad):
        i_w, i_b = self.i_w, self.i_b
        r = ops.linear_head_hvp(self.Xs, theta[i_w], theta[i_b] if i_b is not None else None, self.ys,
                                u[i_w], u[i_b] if i_b is not None else None, self.kind)
        hu: List[Optional[Tensor]] = [None] * self.n
        hu[i_w] = r.hvp_weight
        if i_b is not None:
            hu[i_b] = r.hvp_bias
        return None, hu, [r.grad_x, None]

    def mixed_ok(self, mixed):
        # the mixed term is the support features' gradient: it reaches every fixed (body) parameter
        return [finite(mixed[0].detach())]


def run_head_path(model: nn.Module, loss_kind: str, unit, setup: Setup) -> UnitResult:
    """One unit's :class:`UnitResult` (as the recompute engine's) on the fast path: per task, the body's
    features once, the sweeps on the head, then one backward pass through the body."""
    fmod = _Features(model)
    n_ad = len(setup.names_ad)
    th_acc: List[Optional[Tensor]] = [None] * n_ad
    ph_acc: List[Optional[Tensor]] = [None] * len(setup.phi0)
    lr_acc = setup.plan.zero_grads()
    q_sum = s_sum = m_sum = 0.0
    outputs = []
    for (xs, ys), (xq, yq) in _split_task(unit):
        ph = [p.detach().requires_grad_() for p in setup.phi0]
        pd = {"m." + n: p for n, p in zip(setup.names_fx, ph)}
        pd.update({"m." + n: t.detach() for n, t in zip(setup.names_ad, setup.theta0)})
        # The body runs once per set; its BatchNorm running statistics are updated as by the passes of
        # an unrolled loop: the support set at every inner step, the query set at every query loss.
        bn = setup.bn
        with torch.enable_grad():
            with bn.counted(), bn.collect() as s_stats:
                Xs = torch.func.functional_call(fmod, pd, (xs,))
            with bn.counted(), bn.collect() as q_stats:
                Xq = torch.func.functional_call(fmod, pd, (xq,))
        K = setup.steps
        bn.replay([s_stats, q_stats] * K if (setup.weights is not None and K) else [s_stats] * K + [q_stats])
        steps = HeadSteps(loss_kind, setup.names_ad, Xs.detach(), ys, Xq.detach(), yq, unit.query_scale)
        fwd = forward_sweep(steps, setup, keep_grads=True)
        v, (gXs, gXq), lr_acc = adjoint_sweep(steps, fwd, setup, lr_acc=lr_acc)
        if ph:
            with torch.enable_grad():
                body = torch.autograd.grad([Xs, Xq], ph, grad_outputs=[gXs, gXq], allow_unused=True)
            body = [torch.zeros_like(p) if b is None else b for b, p in zip(body, ph)]
        else:
            body = []
        th_acc = [b if a is None else a + b for a, b in zip(th_acc, v)]
        ph_acc = [b if a is None else a + b for a, b in zip(ph_acc, body)]
        q_sum, s_sum, m_sum = q_sum + fwd.query_loss, s_sum + fwd.support_loss, m_sum + fwd.meta_loss
        outputs.append(fwd.query_out)
    ph_acc = [torch.zeros_like(p) if a is None else a for a, p in zip(ph_acc, setup.phi0)]
    return UnitResult(th_acc, ph_acc, lr_acc, q_sum, s_sum, m_sum, outputs)
