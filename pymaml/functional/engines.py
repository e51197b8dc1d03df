"""The meta-gradient engines and :func:`meta_gradient`, the one call in front of them.

For each task the meta-loss is L_q(θ_K) (or Σ_i w_i L_q(θ_i) with ``step_weights``), θ_K from
the inner loop of :mod:`pymaml.functional.inner`; the meta-gradient is that of the MEAN over tasks.

Engines
-------
``unrolled``
    The full differentiable graph (``create_graph=True`` through every inner step), then one
    backward pass. The reference; memory grows with K × activations.
``recompute``
    The adjoint recursion of DESIGN.md. The forward sweep keeps only θ_0 … θ_K (and the RNG state
    before each step); going backwards, step i's support loss is recomputed at θ_i, one HVP gives
    H_i(α_i ⊙ v_{i+1}) (and the mixed term for non-adapted parameters), and the fused
    ``pymaml.ops.backward_step`` produces v_i, ∂L/∂α_i and the next direction in one pass:

        v_K = ∇L_q(θ_K);  v_i = v_{i+1} − H_i(α_i ⊙ v_{i+1}) + w_i ∇L_q(θ_i);  ∂L/∂α_i = −g_i ⊙ v_{i+1}

    With weight decay the step is θ − α(g + λθ), so the HVP gains λu and g becomes g + λθ.
    A non-adapted φ collects ∂L_q/∂φ at every weighted θ_i minus Σ_i ∇²_φθ L_s(θ_i)(α_i ⊙ v_{i+1}).
    Memory is one step's activations plus K × parameters: flat in K. With double backward, the
    graphs of the last steps are kept instead of recomputed while they fit ``keep_graphs_mib``
    (their size is measured on step 0 with saved-tensor hooks): small models then run with no
    recomputation at all, large ones recompute every step; memory stays bounded either way.
``first_order``
    FOMAML: the recursion with H := 0. The meta-gradient is ∇L_q(θ_K) (plus the weighted
    ∇L_q(θ_i) with step weights); ∂L/∂α_i = −g_i ⊙ v_{i+1} to first order.
``auto``
    ``recompute``; with ``hvp="auto"`` and head-only adaptation of a linear head, its closed-form
    fast path (:mod:`pymaml.functional.head_path`).

BatchNorm and dropout follow :mod:`pymaml.functional.buffers`; task batching
:mod:`pymaml.functional.batching`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from . import head_path
from .batching import Unit, make_units
from .buffers import RngTape, batch_norm_policy, has_randomness
from .hvp import HVP_METHODS, StepGraph, hvp as _hvp, loss_and_grad
from .inner import LrPlan, mul_lr, split_params
from . import layout as _layout

__all__ = ["MetaGradient", "meta_gradient", "ENGINES", "DEFAULT_HVP"]

ENGINES = ("unrolled", "recompute", "first_order")
#: the exact HVP ``hvp="auto"`` resolves to (the faster one measured on CPU by benchmarks/bench_engine.py)
DEFAULT_HVP = "double_backward"
#: default ``keep_graphs_mib`` of :func:`meta_gradient`
DEFAULT_KEEP_GRAPHS_MIB = 64.0


@dataclass
class MetaGradient:
    """Result of :func:`meta_gradient`. Every tensor is detached.

    grads          name -> d(mean over tasks of the meta-loss)/dθ, for every name in ``params``
    lr_grads       the gradient for every Tensor in ``lr``, in ``lr``'s structure (None for floats)
    query_loss     mean over tasks of L_q(θ_K), 0-d
    query_outputs  per task, the model's output on the query set at θ_K
    support_loss   mean over tasks of L_s(θ_0), 0-d
    meta_loss      mean over tasks of the meta-loss (Σ_i w_i L_q(θ_i) with step weights, else query_loss)
    engine, hvp, task_batching, memory_format   what actually ran
    """
    grads: Dict[str, Tensor]
    lr_grads: object
    query_loss: Tensor
    query_outputs: List[Tensor]
    support_loss: Tensor
    meta_loss: Tensor
    engine: str = ""
    hvp: Optional[str] = None
    task_batching: str = ""
    memory_format: str = ""


class _Acc:
    """Sums per-unit results."""

    def __init__(self, n_th: int, n_ph: int, n_lr: int):
        self.th: List[Optional[Tensor]] = [None] * n_th
        self.ph: List[Optional[Tensor]] = [None] * n_ph
        self.lr: List[Optional[Tensor]] = [None] * n_lr
        self.q = self.s = self.m = None
        self.outputs: List[Tensor] = []

    @staticmethod
    def _add(acc, vals):
        for j, v in enumerate(vals):
            if v is not None:
                acc[j] = v if acc[j] is None else acc[j] + v

    def add(self, th, ph, lr, q, s, m, outputs):
        self._add(self.th, th)
        self._add(self.ph, ph)
        self._add(self.lr, lr)
        self.q = q if self.q is None else self.q + q
        self.s = s if self.s is None else self.s + s
        self.m = m if self.m is None else self.m + m
        self.outputs += outputs


def _weights(op, step_weights, steps):
    if step_weights is None:
        return None
    w = list(step_weights)
    if len(w) != steps:
        raise ValueError(f"{op}: step_weights needs one weight per inner step: got {len(w)} for steps={steps}")
    return w


def _unrolled(unit: Unit, theta0, phi0, plan: LrPlan, steps, weights, wd, scale, hvp_method, tape, budget=0.0):
    th_leaf = [t.detach().requires_grad_() for t in theta0]
    ph_leaf = [p.detach().requires_grad_() for p in phi0]
    lr_leaf = plan.requires_grad_()
    T = unit.T
    with torch.enable_grad():
        theta = [unit.stack(t) for t in th_leaf]
        s_loss = None
        meta = 0.0
        for i in range(steps):
            loss, _ = unit.loss(theta, ph_leaf, "s")
            if s_loss is None:
                s_loss = loss.detach()
            g = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, theta)]
            theta = ops.sgd_update(theta, g, plan.step_lr(i, T), wd)
            if weights is not None and i + 1 < steps:
                lq, _ = unit.loss(theta, ph_leaf, "q")
                meta = meta + weights[i] * lq
        lq, out = unit.loss(theta, ph_leaf, "q")
        meta = meta + (weights[-1] * lq if weights is not None else lq)
        if s_loss is None:
            s_loss, _ = unit.loss(theta, ph_leaf, "s")
        wrt = th_leaf + ph_leaf + lr_leaf
        grads = torch.autograd.grad(meta * scale, wrt, allow_unused=True)
    n, m = len(th_leaf), len(ph_leaf)
    grads = [None if g is None else g.detach() for g in grads]
    th_g = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[:n], th_leaf)]
    ph_g = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[n:n + m], ph_leaf)]
    return th_g, ph_g, grads[n + m:], lq.detach(), s_loss.detach(), meta.detach(), unit.outputs(out)


def _forward_sweep(unit: Unit, theta0, phi, plan: LrPlan, steps, weights, wd, scale, tape, keep_grads,
                   budget: float = 0.0):
    """θ_0 … θ_K (no graph), RNG states, optionally g_i, the weighted query grads for i < K.

    With ``budget`` > 0 (bytes) the graphs of the last steps are kept (``kept[i]``, a StepGraph) as
    long as their total, estimated from step 0's graph, stays within the budget."""
    T = unit.T
    theta = [unit.stack(t.detach()) for t in theta0]
    if unit.batched:
        theta = [t.contiguous() for t in theta]
    thetas, states, gs, qg, kept = [theta], [], [], {}, {}
    ph_acc = [torch.zeros_like(p) for p in phi]
    s_loss = None
    meta = 0.0
    first_kept = steps
    for i in range(steps):
        states.append(tape.capture())
        if budget > 0 and (i == 0 or i >= first_kept):
            sg = StepGraph(unit, theta, phi, measure=(i == 0))
            if i == 0:
                first_kept = steps - min(steps, int(budget // max(sg.nbytes, 1)))
            if i >= first_kept:
                kept[i] = sg
            loss, g = sg.loss, sg.grads()
            del sg
        else:
            loss, _, g, _ = loss_and_grad(unit, theta, phi, "s")
        if s_loss is None:
            s_loss = loss
        if keep_grads:
            gs.append(g)
        with torch.no_grad():
            theta = ops.sgd_update(theta, g, plan.step_lr(i, T), wd)
        thetas.append(theta)
        if weights is not None and i + 1 < steps:
            lq, _, gq, gp = loss_and_grad(unit, theta, phi, "q", with_phi=True)
            w = weights[i] * scale
            qg[i + 1] = [w * t for t in gq]
            ph_acc = [a + w * t for a, t in zip(ph_acc, gp)]
            meta = meta + weights[i] * lq
    lq, out, gq, gp = loss_and_grad(unit, theta, phi, "q", with_phi=True)
    end_state = tape.capture()
    w = (weights[-1] if weights is not None else 1.0)
    meta = meta + w * lq
    f = w * scale
    one = isinstance(f, float) and f == 1.0
    v = gq if one else [f * t for t in gq]
    ph_acc = [a + (t if one else f * t) for a, t in zip(ph_acc, gp)]
    if s_loss is None:
        s_loss = loss_and_grad(unit, theta, phi, "s")[0]
    return dict(thetas=thetas, states=states, end_state=end_state, gs=gs, qg=qg, v=v, ph=ph_acc,
                q=lq, s=s_loss, meta=meta, out=out, kept=kept)


def _recompute(unit: Unit, theta0, phi0, plan: LrPlan, steps, weights, wd, scale, hvp_method, tape,
               budget: float = 0.0):
    phi = [p.detach() for p in phi0]
    fs = _forward_sweep(unit, theta0, phi, plan, steps, weights, wd, scale, tape,
                        keep_grads=(hvp_method == "finite_difference"),
                        budget=budget if hvp_method == "double_backward" else 0.0)
    T = unit.T
    v, ph_acc, thetas = fs["v"], fs["ph"], fs["thetas"]
    lr_acc = plan.zero_grads()
    u = mul_lr(plan.step_lr(steps - 1, T), v) if steps > 0 else None
    for i in reversed(range(steps)):
        state = fs["states"][i]
        replay = (lambda s=state: tape.restore(s)) if state is not None else None
        sg = fs["kept"].pop(i, None)
        if sg is not None:
            g, hu, mu = sg.hvp(u)
            del sg
        else:
            g, hu, mu = _hvp(hvp_method, unit, thetas[i], phi, u, replay, grad=fs["gs"][i] if fs["gs"] else None)
        if g is None:
            g = fs["gs"][i]
        ph_acc = [a - m for a, m in zip(ph_acc, mu)]
        if wd:
            hu = [h + wd * x for h, x in zip(hu, u)]
            g = [gi + wd * t for gi, t in zip(g, thetas[i])]
        if i in fs["qg"]:
            hu = [h - q for h, q in zip(hu, fs["qg"][i])]
        nxt = plan.step_lr(i - 1, T) if i > 0 else None
        v, lr_grad, u = ops.backward_step(v, hu, g, plan.step_lr(i, T), nxt)
        plan.accumulate(lr_acc, i, lr_grad, T)
    tape.restore(fs["end_state"])
    th_g = [unit.unstack_sum(t) for t in v]
    return th_g, ph_acc, lr_acc, fs["q"], fs["s"], fs["meta"], unit.outputs(fs["out"])


def _first_order(unit: Unit, theta0, phi0, plan: LrPlan, steps, weights, wd, scale, hvp_method, tape, budget=0.0):
    phi = [p.detach() for p in phi0]
    need_lr = plan.any_tensor
    fs = _forward_sweep(unit, theta0, phi, plan, steps, weights, wd, scale, tape, keep_grads=need_lr)
    T = unit.T
    v = fs["v"]
    lr_acc = plan.zero_grads()
    if need_lr or fs["qg"]:
        for i in reversed(range(steps)):
            q = fs["qg"].get(i)
            if need_lr:
                g = fs["gs"][i]
                if wd:
                    g = [gi + wd * t for gi, t in zip(g, fs["thetas"][i])]
                h = [-t for t in q] if q is not None else [torch.zeros_like(t) for t in v]
                v, lr_grad, _ = ops.backward_step(v, h, g, plan.step_lr(i, T), None)
                plan.accumulate(lr_acc, i, lr_grad, T)
            elif q is not None:
                v = [a + b for a, b in zip(v, q)]
    th_g = [unit.unstack_sum(t) for t in v]
    return th_g, fs["ph"], lr_acc, fs["q"], fs["s"], fs["meta"], unit.outputs(fs["out"])


_RUN = {"unrolled": _unrolled, "recompute": _recompute, "first_order": _first_order}


def trainable_params(model: nn.Module) -> Dict[str, Tensor]:
    """The default meta-parameters: the model's parameters that require grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def meta_gradient(model: nn.Module, tasks, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                  params: Optional[Mapping[str, Tensor]] = None, steps: int = 1, lr=0.01,
                  engine: str = "auto", hvp: str = "auto", step_weights: Optional[Sequence] = None,
                  adapt: Optional[Iterable[str]] = None, task_batching: str = "auto",
                  weight_decay: float = 0.0, keep_graphs_mib: float = DEFAULT_KEEP_GRAPHS_MIB,
                  memory_format: str = "auto") -> MetaGradient:
    """The exact (or first-order) MAML meta-gradient of the mean query loss over ``tasks``.

    model          any nn.Module; run through ``torch.func.functional_call`` on ``params``
    tasks          a list of :class:`Task` (equal shapes may be stacked for vmap) or one Task whose
                   tensors carry a leading task dimension
    loss_fn        ``loss_fn(output, target) -> scalar``
    params         meta-parameters θ, default the model's parameters that require grad (frozen
                   ones are neither adapted nor meta-learned); names missing from it keep the
                   module's own value and get no gradient
    steps          inner steps K ≥ 0
    lr             step sizes, see :mod:`pymaml.functional.inner` (float, shared Tensor, dict per
                   tensor or per element, or a per-step list of those); Tensors get ``lr_grads``
    engine         "unrolled" | "recompute" | "first_order" | "auto" (= recompute)
    hvp            "double_backward" | "jvp" | "finite_difference" | "auto": the faster exact one,
                   or, when only a linear head adapts (``adapt`` = ``head.*`` of a model with
                   ``features`` + ``head``, cross-entropy/MSE), the closed-form head HVPs of
                   :mod:`pymaml.functional.head_path` (reported as ``hvp="linear_head"``)
    step_weights   MAML++ multi-step loss: w_1 … w_K on L_q after each step
    adapt          names adapted in the inner loop (default all); the others stay fixed there but
                   still receive their meta-gradient (ANIL: ``adapt=["head.weight", "head.bias"]``)
    task_batching  "vmap" | "loop" | "auto" (see :mod:`pymaml.functional.batching`)
    weight_decay   inner-loop L2 term: θ_{i+1} = θ_i − α_i(g_i + weight_decay·θ_i)
    keep_graphs_mib  ``recompute`` with double backward keeps the autograd graphs of the LAST inner
                   steps (consumed first going backwards) while their size, measured on step 0,
                   fits in this many MiB per task unit, and recomputes the others. Memory stays
                   flat in K (bounded by the budget); small models skip all recomputation. 0 gives
                   the pure recursion that stores only θ_0 … θ_K.
    memory_format  "auto" | "channels_last" | "preserve": the layout the computation runs in; auto
                   = channels-last for conv nets on the CPU (see :mod:`pymaml.functional.layout`),
                   falling back to "preserve" with a warning when the model fails in channels-last
                   (a ``.view`` that assumes NCHW strides). Gradients come back in each
                   parameter's own layout either way.

    Nothing is modified: neither the module's parameters and buffers nor their ``.grad``.
    """
    kw = dict(params=params, steps=steps, lr=lr, engine=engine, hvp=hvp, step_weights=step_weights, adapt=adapt,
              task_batching=task_batching, weight_decay=weight_decay, keep_graphs_mib=keep_graphs_mib)
    first = next(iter((params or trainable_params(model)).values()), None)
    tape = RngTape(memory_format == "auto" and has_randomness(model),
                   first.device if isinstance(first, Tensor) else None)
    state = tape.capture()
    try:
        return _meta_gradient(model, tasks, loss_fn, memory_format=memory_format, **kw)
    except RuntimeError as e:
        if memory_format != "auto" or not _layout.is_layout_error(e):
            raise
    # A model that assumes NCHW strides (typically ``x.view(x.size(0), -1)`` after the convolutions)
    # cannot run channels-last: run it as given, with the random numbers the first try saw.
    warnings.warn("meta_gradient: the model failed in channels-last layout (probably a .view() of a conv "
                  "activation; .reshape() or torch.flatten() work in any layout), so it runs in the layout "
                  "given; pass memory_format='preserve' to skip the attempt", RuntimeWarning, stacklevel=2)
    tape.restore(state)
    return _meta_gradient(model, tasks, loss_fn, memory_format="preserve", **kw)


def _meta_gradient(model, tasks, loss_fn, *, params, steps, lr, engine, hvp, step_weights, adapt, task_batching,
                   weight_decay, keep_graphs_mib, memory_format) -> MetaGradient:
    """:func:`meta_gradient` in one memory format (the arguments are its own)."""
    op = "meta_gradient"
    if params is None:
        params = trainable_params(model)
    if not params:
        frozen = [n for n, _ in model.named_parameters()]
        raise ValueError(f"{op}: no parameters to meta-learn: " + (
            f"none of the model's parameters requires grad ({frozen})" if frozen else "params is empty"))
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{op}: steps must be a non-negative int, got {steps!r}")
    if engine == "auto":
        engine = "recompute"
    if engine not in ENGINES:
        raise ValueError(f"{op}: engine must be one of {ENGINES + ('auto',)}, got {engine!r}")
    hvp_auto = hvp == "auto"
    if hvp_auto:
        hvp = DEFAULT_HVP
    if not keep_graphs_mib >= 0:
        raise ValueError(f"{op}: keep_graphs_mib must be >= 0, got {keep_graphs_mib!r}")
    if hvp not in HVP_METHODS:
        raise ValueError(f"{op}: hvp must be one of {HVP_METHODS + ('auto',)}, got {hvp!r}")
    weights = _weights(op, step_weights, steps)
    names_ad, names_fx = split_params(op, params, adapt)
    theta0 = [params[n] for n in names_ad]
    phi0 = [params[n] for n in names_fx]
    plan = LrPlan(op, lr, steps, names_ad, theta0)
    units, n_tasks, batched = make_units(model, loss_fn, names_ad, names_fx, tasks, task_batching)
    layout = _layout.resolve(op, memory_format, model, theta0 + phi0, batched)
    if layout != "preserve":
        theta0 = [_layout.to_layout(t, layout) for t in theta0]
        phi0 = [_layout.to_layout(t, layout) for t in phi0]
        for unit in units:
            unit.to_layout(layout)
    dev = theta0[0].device if theta0 else None
    tape = RngTape(has_randomness(model), dev)
    scale = 1.0 / n_tasks
    acc = _Acc(len(theta0), len(phi0), len(plan.leaves))
    with batch_norm_policy(model, primitive=batched):
        head_kind = None
        if engine == "recompute" and hvp_auto:
            head_kind = head_path.applicable(model, names_ad, loss_fn)
            if head_kind is not None and not head_path.verify(model, names_ad, names_fx, params,
                                                              units[0].support[0][0] if batched else units[0].support[0]):
                head_kind = None
        for unit in units:
            if head_kind is not None:
                acc.add(*head_path.run_head_path(model, head_kind, unit, names_ad, names_fx, theta0, phi0, plan,
                                                 steps, weights, float(weight_decay), scale))
                continue
            acc.add(*_RUN[engine](unit, theta0, phi0, plan, steps, weights, float(weight_decay), scale, hvp, tape,
                                  float(keep_graphs_mib) * 2**20))
    if head_kind is not None:
        hvp = "linear_head"
    grads = dict(zip(names_ad, acc.th))
    grads.update(zip(names_fx, acc.ph))
    grads = {n: _layout.like(grads[n], p) for n, p in params.items()}
    lr_acc = [_layout.like(g, leaf) for g, leaf in zip(acc.lr, plan.leaves)]
    return MetaGradient(grads=grads, lr_grads=plan.to_user(lr_acc), query_loss=acc.q * scale,
                        query_outputs=acc.outputs, support_loss=acc.s * scale,
                        meta_loss=torch.as_tensor(acc.m) * scale, engine=engine,
                        hvp=None if engine != "recompute" else hvp,
                        task_batching="vmap" if batched else "loop", memory_format=layout)
