"""Gradients and Hessian-vector products of the support loss at one inner step.

:func:`hessian_vector_product` runs one of the methods that ``meta_gradient``'s ``hvp=`` option names
(:data:`HVP_METHODS`). This module was ``pymaml.functional.hvp`` and the function ``hvp``; both
old names still work.

Every HVP function takes θ_i (adapted tensors, possibly task-stacked), φ (the fixed, non-adapted
tensors) and a direction u over θ, and returns ``(g, Hu, Mu)``:

* ``g``  = ∇_θ L_s(θ_i) (None where the method does not produce it for free),
* ``Hu`` = ∇²_θθ L_s(θ_i) u,
* ``Mu`` = ∇²_φθ L_s(θ_i) u, the mixed term that carries the meta-gradient to fixed parameters.

Methods:

* ``double_backward`` — Pearlmutter: the gradient of ⟨∇_θ L_s, u⟩, exact;
* ``jvp`` — forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``, exact;
* ``finite_difference`` — (∇L_s(θ + εu) − ∇L_s(θ − εu)) / 2ε with ε = ε₀/‖u‖ (ε₀ the cube root of
  the dtype's machine epsilon, the optimum for a central difference), so the perturbation always
  has norm ε₀; two plain gradients through ``pymaml.ops.fd_perturb`` / ``fd_quotient``, no
  second-order graph. Approximate (relative error ~1e-10 in float64 on smooth models). On
  piecewise-smooth nets (ReLU, max-pool) a perturbation that crosses a kink, where the gradient
  jumps, adds an error that grows like 1/ε: on the full-size MiniImageNet conv net one HVP of a
  2-step float64 meta-gradient was off by a relative 883 (with a 10× smaller ε: 1e-8). So when the
  caller passes ∇L_s(θ) (the recompute engine keeps it), the two one-sided halves of the difference
  are compared, and a pair that straddles a jump is redone with ε/8 (at most three times; if none
  avoids it, the default-ε result is returned with a RuntimeWarning). This catches jumps that
  dominate the difference, not small ones; in float32 on large ReLU nets no ε may avoid them (the
  MiniImageNet conv net: relative error ~3 and a warning). The exact methods are the default.

``replay`` (a callable or None) restores the RNG state before each forward pass, so random layers
draw the same numbers in every evaluation of the same step.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops

__all__ = ["HVP_METHODS", "loss_and_grad", "hessian_vector_product", "hvp", "StepGraph"]

HVP_METHODS = ("double_backward", "jvp", "finite_difference")


def _fill(grads, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def loss_and_grad(unit, theta: Sequence[Tensor], phi: Sequence[Tensor], which: str, *, with_phi: bool = False,
                  create_graph: bool = False):
    """(loss sum, outputs, ∇_θ, ∇_φ or None) of the unit's support (``"s"``) or query (``"q"``) loss."""
    th = [t.detach().requires_grad_() for t in theta]
    ph = [p.detach().requires_grad_() for p in phi] if with_phi else [p.detach() for p in phi]
    with torch.enable_grad():
        loss, out = unit.loss(th, ph, which)
        wrt = th + ph if with_phi else th
        g = _fill(torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True), wrt)
    n = len(th)
    return loss.detach(), out.detach(), g[:n], (g[n:] if with_phi else None)


def _identity(t):
    return t


class StepGraph:
    """The support loss's gradient at θ_i with its graph kept (``create_graph=True``), so that the
    HVP of that step needs no recomputation: :meth:`hvp` is the double-backward product, and frees
    the graph. ``nbytes`` (with ``measure=True``) is the size of the tensors the graph saved (forward
    activations and the backward's own saved tensors), counted once per storage."""

    def __init__(self, unit, theta, phi, measure: bool = False):
        self.th = [t.detach().requires_grad_() for t in theta]
        self.ph = [p.detach().requires_grad_() for p in phi]
        self.nbytes = 0
        if not measure:
            with torch.enable_grad():
                self.loss, self.g = self._run(unit)
            return
        # The hooks live as long as the graph's saved tensors, so they must not reference this
        # object (that would be a cycle graph -> hook -> self -> graph, freed only by the gc).
        seen, total = set(), [0]

        def pack(t):
            try:
                st = t.untyped_storage()
                key, size = st.data_ptr(), st.nbytes()
            except (RuntimeError, NotImplementedError):  # wrapper tensors without a storage
                key, size = id(t), t.numel() * t.element_size()
            if key not in seen:
                seen.add(key)
                total[0] += size
            # Detached: a node's own output saved in it would otherwise form a reference cycle too.
            # Autograd restores the history of an unpacked tensor from the saved metadata.
            return t.detach()

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            self.loss, self.g = self._run(unit)
        self.nbytes = total[0]

    def _run(self, unit):
        loss, _ = unit.loss(self.th, self.ph, "s")
        return loss.detach(), torch.autograd.grad(loss, self.th, create_graph=True, allow_unused=True)

    def grads(self) -> List[Tensor]:
        return [torch.zeros_like(t) if gi is None else gi.detach() for gi, t in zip(self.g, self.th)]

    def hvp(self, u: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        g = self.grads()
        hu, mu = _second(self.g, self.th, self.ph, u)
        self.g = None
        return g, hu, mu


def _second(g, th, ph, u):
    """(H u, mixed term) from a gradient ``g`` of θ built with create_graph; consumes its graph."""
    with torch.enable_grad():
        outs, dirs = [], []
        for gi, ui in zip(g, u):
            if gi is not None and gi.requires_grad:
                outs.append(gi)
                dirs.append(ui)
        wrt = list(th) + list(ph)
        if outs:
            h = _fill(torch.autograd.grad(outs, wrt, grad_outputs=dirs, allow_unused=True), wrt)
        else:
            h = [torch.zeros_like(t) for t in wrt]
    n = len(th)
    return h[:n], h[n:]


def _double_backward(unit, theta, phi, u, replay, grad=None):
    if replay:
        replay()
    return StepGraph(unit, theta, phi).hvp(u)


def _jvp(unit, theta, phi, u, replay, grad=None):
    if replay:
        replay()
    th = [t.detach() for t in theta]
    ph = [p.detach() for p in phi]
    n = len(th)

    # Floating targets enter as primals with a materialised zero tangent: forward-over-reverse
    # through F.mse_loss otherwise fails on an implicit (immutable) zero tangent in torch 2.14.
    y = unit.support[1]
    y_dual = y.is_floating_point()

    def grad_all(th_, ph_, *y_):
        def f(a, b):
            return unit.loss(a, b, "s", target=y_[0] if y_ else None)[0]
        ga, gb = torch.func.grad(f, argnums=(0, 1))(th_, ph_)
        return list(ga) + list(gb)

    primals = (th, ph, y) if y_dual else (th, ph)
    tangents = (list(u), [torch.zeros_like(p) for p in ph]) + ((torch.zeros_like(y),) if y_dual else ())
    with torch.enable_grad():
        g, h = torch.func.jvp(grad_all, primals, tangents)
    return list(g[:n]), list(h[:n]), list(h[n:])


#: a central difference whose one-sided halves disagree by more than this share of it has crossed a
#: gradient jump (see _kink_ratio); it is redone with ε / _FD_SHRINK, at most _FD_RETRIES times
_FD_KINK_TOL = 0.05
_FD_SHRINK = 8.0
_FD_RETRIES = 3


def _kink_ratio(gp: Sequence[Tensor], gm: Sequence[Tensor], g0: Sequence[Tensor], extra=0.0) -> float:
    """How far θ ± εu are from straddling a gradient jump: ‖g₊ − 2g₀ + g₋‖ / ‖g₊ − g₋‖. On a smooth
    loss the one-sided differences g₊ − g₀ and g₀ − g₋ agree to O(ε²), so the ratio is O(ε) (plus
    rounding); a ReLU or max-pool switch between θ and θ + εu (or θ − εu) puts its jump into one of
    them only, and the ratio nears 1. ``extra`` (0, or NaN for a non-finite perturbation) is added
    on the device, so that the one read says both."""
    second = ops.global_norm([p - 2 * g + m for p, g, m in zip(gp, g0, gm)])
    first = ops.global_norm([p - m for p, m in zip(gp, gm)])
    return float(second / first.clamp_min(torch.finfo(first.dtype).tiny) + extra)


def _nonfinite_terms(plus: Sequence[Tensor], minus: Sequence[Tensor]) -> List[Tensor]:
    """Per tensor j, a 0-d term that is 0 when θ_j ± εu_j are finite and NaN otherwise (x − x), on
    the device. Added to h_j: a model can turn a non-finite parameter into finite gradients (a
    saturated tanh), and the difference would then be wrong without being non-finite."""
    return [(p - p).sum() + (m - m).sum() for p, m in zip(plus, minus)]


def _finite_difference(unit, theta, phi, u, replay, grad=None):
    th = [t.detach() for t in theta]
    dt = th[0].dtype if th else torch.float32
    eps0 = torch.finfo(dt).eps ** (1.0 / 3.0)
    norm = ops.global_norm(list(u)).to(dt)
    eps = eps0 / norm.clamp_min(torch.finfo(dt).tiny)
    n = len(th)
    first = None  # (kink ratio, h) at the default ε
    for attempt in range(_FD_RETRIES + 1):
        plus, minus = ops.fd_perturb(th, list(u), eps)
        if replay:
            replay()
        _, _, gp, gpp = loss_and_grad(unit, plus, phi, "s", with_phi=True)
        if replay:
            replay()
        _, _, gm, gmp = loss_and_grad(unit, minus, phi, "s", with_phi=True)
        h = ops.fd_quotient(gp + gpp, gm + gmp, eps)
        bad = _nonfinite_terms(plus, minus)
        total = sum(bad)  # the mixed terms (fixed inputs) depend on every perturbed tensor
        h = [hj + b.to(hj.dtype) for hj, b in zip(h, bad)] + [hk + total for hk in h[n:]]
        if grad is None:
            return None, h[:n], h[n:]
        ratio = _kink_ratio(gp, gm, grad, total)
        if not ratio > _FD_KINK_TOL:  # smooth, or NaN: a non-finite gradient, which a smaller ε cannot
            return None, h[:n], h[n:]  # mend; the adjoint step's found_inf flag reports it
        if first is None:
            first = (ratio, h)
        eps = eps / _FD_SHRINK
    # No ε tried avoided the jump (with millions of ReLU/max-pool units in float32, none may): the
    # default ε rounds least, so its result is returned, with a warning.
    h = first[1]
    warnings.warn("finite_difference HVP: at every ε tried the difference straddles a gradient jump (a "
                  "ReLU/max-pool switch; its one-sided halves disagree), so this HVP may be far from exact; "
                  "use hvp='double_backward' (exact)", RuntimeWarning, stacklevel=2)
    return None, h[:n], h[n:]


_IMPL = {"double_backward": _double_backward, "jvp": _jvp, "finite_difference": _finite_difference}


def hessian_vector_product(method: str, unit, theta: Sequence[Tensor], phi: Sequence[Tensor], u: Sequence[Tensor],
        replay: Optional[Callable[[], None]] = None, grad: Optional[Sequence[Tensor]] = None
        ) -> Tuple[Optional[List[Tensor]], List[Tensor], List[Tensor]]:
    """(∇_θ L_s or None, H u, mixed φθ term) at θ for the unit's support loss; see the module docstring.
    ``grad``, ∇_θ L_s(θ) when the caller has it, lets finite differences detect a kink."""
    try:
        fn = _IMPL[method]
    except KeyError:
        raise ValueError(f"hvp: method must be one of {HVP_METHODS}, got {method!r}") from None
    return fn(unit, theta, phi, u, replay, grad)


hvp = hessian_vector_product  # former name
