"""The meta-gradient engines and :func:`meta_gradient`, the one call in front of them.

For each task the meta-loss is L_q(θ_K) (or Σ_i w_i L_q(θ_i) with ``step_weights``), θ_K from
the inner loop of :mod:`pymaml.functional.inner`; the meta-gradient is that of the MEAN over tasks.

Engines
-------
``unrolled``
    The full differentiable graph (``create_graph=True`` through every inner step), then one
    backward pass. The reference; memory grows with K × activations.
``recompute``
    The adjoint recursion of docs/design.md (:mod:`pymaml.functional.sweep`). The forward sweep keeps only θ_0 … θ_K (and the RNG state
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

BatchNorm (``batch_norm="mode"`` or ``"transductive"``) and dropout follow
:mod:`pymaml.functional.buffers`; task batching :mod:`pymaml.functional.batching`.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .._checks import check_loss_scale
from . import head_path
from . import layout as _layout
from .batching import Unit, make_units
from .buffers import RngTape, batch_norm_policy, check_policy, has_randomness
from .hessian import HVP_METHODS, StepGraph, hessian_vector_product, loss_and_grad
from .inner import LrPlan, split_params
from .nonfinite import StepFlags
from .sweep import Setup, Steps, UnitResult, adjoint_sweep, forward_sweep

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
    engine, hvp, task_batching, memory_format, batch_norm   what actually ran
    nonfinite      where the fused ops met NaN or Inf, on the device (None when not recorded: no
                   inner steps, or parameters on several devices); see
                   :class:`pymaml.functional.nonfinite.StepFlags`. Reading it is the caller's choice.
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
    batch_norm: str = ""
    nonfinite: Optional[StepFlags] = None


class _Acc:
    """Sums the units' :class:`UnitResult`."""

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

    def add(self, r: UnitResult) -> None:
        self._add(self.th, r.theta_grads)
        self._add(self.ph, r.phi_grads)
        self._add(self.lr, r.lr_grads)
        self.q = r.query_loss if self.q is None else self.q + r.query_loss
        self.s = r.support_loss if self.s is None else self.s + r.support_loss
        self.m = r.meta_loss if self.m is None else self.m + r.meta_loss
        self.outputs += r.outputs


def _weights(op, step_weights, steps):
    if step_weights is None:
        return None
    w = list(step_weights)
    if len(w) != steps:
        raise ValueError(f"{op}: step_weights needs one weight per inner step: got {len(w)} for steps={steps}")
    return w


def _unrolled(unit: Unit, setup: Setup) -> UnitResult:
    plan, steps, weights, wd = setup.plan, setup.steps, setup.weights, setup.weight_decay
    th_leaf = [t.detach().requires_grad_() for t in setup.theta0]
    ph_leaf = [p.detach().requires_grad_() for p in setup.phi0]
    lr_leaf = plan.requires_grad_()
    T = unit.T
    counted = setup.bn.counted
    with torch.enable_grad():
        theta = [unit.stack(t) for t in th_leaf]
        s_loss = None
        meta = 0.0
        for i in range(steps):
            with counted():
                loss, _ = unit.loss(theta, ph_leaf, "s")
            if s_loss is None:
                s_loss = loss.detach()
            g = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, theta)]
            theta = ops.sgd_update(theta, g, plan.step_lr(i, T), wd, found_inf=setup.flag(0, i))
            if weights is not None and i + 1 < steps:
                with counted():
                    lq, _ = unit.loss(theta, ph_leaf, "q")
                meta = meta + weights[i] * lq
        with counted():
            lq, out = unit.loss(theta, ph_leaf, "q")
        meta = meta + (weights[-1] * lq if weights is not None else lq)
        if s_loss is None:
            s_loss, _ = unit.loss(theta, ph_leaf, "s")
        wrt = th_leaf + ph_leaf + lr_leaf
        grads = torch.autograd.grad(meta * setup.scale, wrt, allow_unused=True)
    n, m = len(th_leaf), len(ph_leaf)
    grads = [None if g is None else g.detach() for g in grads]
    th_g = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[:n], th_leaf)]
    ph_g = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[n:n + m], ph_leaf)]
    return UnitResult(th_g, ph_g, grads[n + m:], lq.detach(), s_loss.detach(), meta.detach(), unit.outputs(out))


class ModelSteps(Steps):
    """The sweeps' numbers from autograd on the model (one task or a task stack).

    The forward sweep records the RNG state before each step, so that recomputing a step for its
    HVP replays the same random numbers; with a graph budget (double backward) the autograd graphs
    of the last steps are kept from the forward sweep (:class:`StepGraph`) instead of recomputed,
    as many as fit, measured on step 0."""

    def __init__(self, unit: Unit, setup: Setup, method: Optional[str]):
        self.unit, self.T, self.method, self.K = unit, unit.T, method, setup.steps
        self.phi = [p.detach() for p in setup.phi0]
        self.tape, self.counted = setup.tape, setup.bn.counted
        self.budget = setup.keep_graph_bytes if method == "double_backward" else 0.0
        self.needs_grads = method == "finite_difference"
        self.states: List[object] = []
        self.kept: Dict[int, StepGraph] = {}
        self.first_kept = self.K
        self.end_state = None
        self.replayed = False

    def start(self, theta0):
        theta = [self.unit.stack(t.detach()) for t in theta0]
        return [t.contiguous() for t in theta] if self.unit.batched else theta

    def fixed_zeros(self):
        return [torch.zeros_like(p) for p in self.phi]

    def support_grad(self, i, theta):
        with self.counted():
            return self._support_grad(i, theta)

    def _support_grad(self, i, theta):
        self.states.append(self.tape.capture())
        if self.budget > 0 and (i == 0 or i >= self.first_kept):
            sg = StepGraph(self.unit, theta, self.phi, measure=(i == 0))
            if i == 0:
                self.first_kept = self.K - min(self.K, int(self.budget // max(sg.nbytes, 1)))
            if i >= self.first_kept:
                self.kept[i] = sg
            return sg.loss, sg.grads()
        loss, _, g, _ = loss_and_grad(self.unit, theta, self.phi, "s")
        return loss, g

    def support_loss(self, theta):
        return loss_and_grad(self.unit, theta, self.phi, "s")[0]

    def query_grad(self, theta):
        with self.counted():
            return loss_and_grad(self.unit, theta, self.phi, "q", with_phi=True)

    def forward_done(self):
        self.end_state = self.tape.capture()

    def hvp(self, i, theta, u, grad):
        self.replayed = True
        sg = self.kept.pop(i, None)
        if sg is not None:
            return sg.hvp(u)
        state = self.states[i]
        replay = (lambda s=state: self.tape.restore(s)) if state is not None else None
        return hessian_vector_product(self.method, self.unit, theta, self.phi, u, replay, grad=grad)

    def adjoint_done(self):
        if self.replayed:
            self.tape.restore(self.end_state)


def _sweeps(unit: Unit, setup: Setup, method: Optional[str]) -> UnitResult:
    steps = ModelSteps(unit, setup, method)
    second = method is not None
    fwd = forward_sweep(steps, setup, keep_grads=steps.needs_grads if second else setup.plan.any_tensor)
    v, fixed, lr = adjoint_sweep(steps, fwd, setup, second_order=second)
    return UnitResult([unit.unstack_sum(t) for t in v], fixed, lr, fwd.query_loss, fwd.support_loss, fwd.meta_loss,
                      unit.outputs(fwd.query_out))


def _recompute(unit: Unit, setup: Setup) -> UnitResult:
    return _sweeps(unit, setup, setup.hvp)


def _first_order(unit: Unit, setup: Setup) -> UnitResult:
    return _sweeps(unit, setup, None)


_RUN = {"unrolled": _unrolled, "recompute": _recompute, "first_order": _first_order}


def trainable_params(model: nn.Module) -> Dict[str, Tensor]:
    """The default meta-parameters: the model's parameters that require grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def meta_gradient(model: nn.Module, tasks, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                  params: Optional[Mapping[str, Tensor]] = None, steps: int = 1, lr=0.01,
                  engine: str = "auto", hvp: str = "auto", step_weights: Optional[Sequence] = None,
                  adapt: Optional[Iterable[str]] = None, task_batching: str = "auto",
                  weight_decay: float = 0.0, keep_graphs_mib: float = DEFAULT_KEEP_GRAPHS_MIB,
                  memory_format: str = "auto", batch_norm: str = "mode", loss_scale: float = 1.0) -> MetaGradient:
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
    batch_norm     "mode" | "transductive": BatchNorm follows the module's mode (train: batch
                   statistics, running statistics updated by the forward passes an unrolled loop
                   would run; eval: running statistics), or uses batch statistics always and leaves
                   running statistics alone (the MAML paper). See :mod:`pymaml.functional.buffers`.
    loss_scale     multiplies the query losses before any gradient is taken (loss scaling, as
                   ``torch.amp.GradScaler`` does for float16): the gradients (``grads``, ``lr_grads``)
                   come back multiplied by it, the reported losses do not. The support losses are not
                   scaled, so the inner loop is unchanged. :class:`pymaml.MetaOptimizer` with
                   ``scaler=`` passes the scaler's scale and unscales.

    Nothing else is modified: neither the module's parameters (and other buffers) nor their ``.grad``.
    """
    opts = _Options(params=params, steps=steps, lr=lr, engine=engine, hvp=hvp, step_weights=step_weights,
                    adapt=adapt, task_batching=task_batching, weight_decay=weight_decay,
                    keep_graphs_mib=keep_graphs_mib, memory_format=memory_format, batch_norm=batch_norm,
                    loss_scale=loss_scale)
    first = next(iter((params or trainable_params(model)).values()), None)
    tape = RngTape(memory_format == "auto" and has_randomness(model),
                   first.device if isinstance(first, Tensor) else None)
    state = tape.capture()
    try:
        return _meta_gradient(model, tasks, loss_fn, opts)
    except RuntimeError as e:
        if memory_format != "auto" or not _layout.is_layout_error(e):
            raise
    # A model that assumes NCHW strides (typically ``x.view(x.size(0), -1)`` after the convolutions)
    # cannot run channels-last: run it as given, with the random numbers the first try saw.
    warnings.warn("meta_gradient: the model failed in channels-last layout (probably a .view() of a conv "
                  "activation; .reshape() or torch.flatten() work in any layout), so it runs in the layout "
                  "given; pass memory_format='preserve' to skip the attempt", RuntimeWarning, stacklevel=2)
    tape.restore(state)
    return _meta_gradient(model, tasks, loss_fn, dataclasses.replace(opts, memory_format="preserve"))


@dataclass(frozen=True)
class _Options:
    """The keyword arguments of :func:`meta_gradient`, as given."""
    params: Optional[Mapping[str, Tensor]]
    steps: int
    lr: object
    engine: str
    hvp: str
    step_weights: Optional[Sequence]
    adapt: Optional[Iterable[str]]
    task_batching: str
    weight_decay: float
    keep_graphs_mib: float
    memory_format: str
    batch_norm: str
    loss_scale: float

    def resolved(self, op: str):
        """(engine, hvp method, whether hvp was "auto"), validated."""
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"{op}: steps must be a non-negative int, got {self.steps!r}")
        engine = "recompute" if self.engine == "auto" else self.engine
        if engine not in ENGINES:
            raise ValueError(f"{op}: engine must be one of {ENGINES + ('auto',)}, got {self.engine!r}")
        if not self.keep_graphs_mib >= 0:
            raise ValueError(f"{op}: keep_graphs_mib must be >= 0, got {self.keep_graphs_mib!r}")
        hvp = DEFAULT_HVP if self.hvp == "auto" else self.hvp
        if hvp not in HVP_METHODS:
            raise ValueError(f"{op}: hvp must be one of {HVP_METHODS + ('auto',)}, got {self.hvp!r}")
        check_policy(op, self.batch_norm)
        check_loss_scale(op, self.loss_scale)
        return engine, hvp, self.hvp == "auto"


def _meta_gradient(model, tasks, loss_fn, opts: _Options) -> MetaGradient:
    """:func:`meta_gradient` in one memory format."""
    op = "meta_gradient"
    params = trainable_params(model) if opts.params is None else opts.params
    if not params:
        frozen = [n for n, _ in model.named_parameters()]
        raise ValueError(f"{op}: no parameters to meta-learn: " + (
            f"none of the model's parameters requires grad ({frozen})" if frozen else "params is empty"))
    engine, hvp, hvp_auto = opts.resolved(op)
    steps = opts.steps
    weights = _weights(op, opts.step_weights, steps)
    names_ad, names_fx = split_params(op, params, opts.adapt)
    theta0 = [params[n] for n in names_ad]
    phi0 = [params[n] for n in names_fx]
    plan = LrPlan(op, opts.lr, steps, names_ad, theta0)
    units, n_tasks, batched = make_units(model, loss_fn, names_ad, names_fx, tasks, opts.task_batching)
    for unit in units:
        unit.query_scale = float(opts.loss_scale)
    layout = _layout.resolve(op, opts.memory_format, model, theta0 + phi0, batched)
    if layout != "preserve":
        theta0 = [_layout.to_layout(t, layout) for t in theta0]
        phi0 = [_layout.to_layout(t, layout) for t in phi0]
        for unit in units:
            unit.to_layout(layout)
    dev = theta0[0].device if theta0 else None
    acc = _Acc(len(theta0), len(phi0), len(plan.leaves))
    with batch_norm_policy(model, primitive=batched, policy=opts.batch_norm) as bn:
        setup = Setup(names_ad=names_ad, names_fx=names_fx, theta0=theta0, phi0=phi0, plan=plan, steps=steps,
                      weights=weights, weight_decay=float(opts.weight_decay), scale=1.0 / n_tasks, hvp=hvp,
                      keep_graph_bytes=float(opts.keep_graphs_mib) * 2**20,
                      tape=RngTape(has_randomness(model), dev), bn=bn,
                      flags=StepFlags.new(names_ad, theta0, steps, fixed_names=names_fx, fixed=phi0))
        head_kind = None
        if engine == "recompute" and hvp_auto:
            head_kind = head_path.applicable(model, names_ad, loss_fn)
            if head_kind is not None and not head_path.verify(model, names_ad, names_fx, params,
                                                              units[0].support[0][0] if batched else units[0].support[0]):
                head_kind = None
        for unit in units:
            if head_kind is not None:
                acc.add(head_path.run_head_path(model, head_kind, unit, setup))
            else:
                acc.add(_RUN[engine](unit, setup))
            bn.flush()  # running statistics a stacked unit collected, in task order
    if head_kind is not None:
        hvp = "linear_head"
    grads = dict(zip(names_ad, acc.th))
    grads.update(zip(names_fx, acc.ph))
    grads = {n: _layout.like(grads[n], p) for n, p in params.items()}
    lr_acc = [_layout.like(g, leaf) for g, leaf in zip(acc.lr, plan.leaves)]
    scale, q_scale = setup.scale, setup.scale / float(opts.loss_scale)  # the losses are reported unscaled
    return MetaGradient(grads=grads, lr_grads=plan.to_user(lr_acc), query_loss=acc.q * q_scale,
                        query_outputs=acc.outputs, support_loss=acc.s * scale,
                        meta_loss=torch.as_tensor(acc.m) * q_scale, engine=engine,
                        hvp=None if engine != "recompute" else hvp,
                        task_batching="vmap" if batched else "loop", memory_format=layout,
                        batch_norm=opts.batch_norm, nonfinite=setup.flags)
