"""The ops that take no found_inf flag (fd_perturb, fd_quotient, global_norm, batch_norm and its
backward, linear_head_hvp): a NaN or Inf they produce, or that is fed into them, inside a
meta-step, is caught on the device by the next flagged op (the inner update reads θ' = θ − αg; the
adjoint step reads v − Hu) or, for the mixed terms that reach only the fixed parameters, by the
check recorded where the term is made; MetaOptimizer names the op, the step and the parameter.
Faults are injected at apex's positions (first / middle / last element) and at inner or adjoint
steps 0, 1 and K−1. Run on both op paths (with and without PYMAML_BACKEND=torch)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml
from pymaml.functional import buffers, engines, head_path
from pymaml.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
K = 3
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
#: (position, tensor index, step)
POSITIONS = [("first", 0, 0), ("middle", 2, 1), ("last", 3, K - 1)]
IDS = [p[0] for p in POSITIONS]


def _tasks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 1, generator=g)
    return [x, torch.sin(x), x + 0.1, torch.sin(x + 0.1)]


def _meta(model, algorithm="maml", **kw):
    return pymaml.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), algorithm, F.mse_loss,
                                inner_lr=0.05, inner_steps=K, **kw)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))  # smooth: no finite-difference kinks


def _put(ts, index, where, value):
    """A copy of the list ``ts`` with ``value`` at the first/middle/last element of tensor ``index``."""
    ts = list(ts)
    t = ts[index].detach().clone()
    flat = t.view(-1)
    flat[{"first": 0, "middle": flat.numel() // 2, "last": flat.numel() - 1}[where]] = value
    ts[index] = t
    return ts


def _put_graph(y, where, value):
    """y with ``value`` at its first/middle/last element, keeping y's graph (the other elements'
    gradients flow as before)."""
    mask = torch.zeros(y.numel(), dtype=torch.bool)
    mask[{"first": 0, "middle": y.numel() // 2, "last": y.numel() - 1}[where]] = True
    return torch.where(mask.view(y.shape), torch.tensor(value, dtype=y.dtype), y)


def _track(monkeypatch, cls):
    """Which pass of ``cls`` (a Steps class) runs: ctx["at"] = ("support", i), ("query", None) or
    ("hvp", i)."""
    ctx = {"at": None}
    for name, phase in (("support_grad", "support"), ("query_grad", "query"), ("hvp", "hvp")):
        orig = getattr(cls, name)

        def wrapped(self, *a, _orig=orig, _phase=phase, **k):
            prev = ctx["at"]
            ctx["at"] = (_phase, None if _phase == "query" else a[0])
            try:
                return _orig(self, *a, **k)
            finally:
                ctx["at"] = prev

        monkeypatch.setattr(cls, name, wrapped)
    return ctx


def _poison_op(monkeypatch, module, name, ctx, at, fault):
    """``module.name`` runs ``fault(orig, *args)`` instead during the pass ``at``; returns the hits."""
    orig = getattr(module, name)
    hits = []

    def wrapped(*a, **k):
        if ctx["at"] == at:
            hits.append(1)
            return fault(orig, *a, **k)
        return orig(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return hits


def _raises(meta, tasks):
    before = [p.detach().clone() for p in meta.parameters()]
    with pytest.raises(FloatingPointError) as e:
        meta.step(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, meta.parameters())), "a parameter was updated"
    return str(e.value)


def _adjoint(step):
    return f"first in backward_step at adjoint step {step}: v_{step} = v_{step + 1} − H_{step}"


# ------------------------------------------------------------------ finite-difference HVP: fd_perturb, fd_quotient
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("where,index,step", POSITIONS, ids=IDS)
@pytest.mark.parametrize("fault", ["quotient_out", "quotient_in", "perturb_out"])
def test_finite_difference_ops(monkeypatch, fault, where, index, step, value):
    """fd_quotient's output, its input (a gradient at θ ± εu), fd_perturb's output (θ + εu): caught
    by backward_step of that adjoint step, without kink retries or a kink warning (a non-finite
    difference is no kink)."""
    meta = _meta(_mlp(), engine="recompute", hvp="finite_difference", task_batching="loop")
    ctx = _track(monkeypatch, engines.ModelSteps)
    if fault == "quotient_out":
        hits = _poison_op(monkeypatch, pymaml.ops, "fd_quotient", ctx, ("hvp", step),
                          lambda f, gp, gm, eps: _put(f(gp, gm, eps), index, where, value))
    elif fault == "quotient_in":
        hits = _poison_op(monkeypatch, pymaml.ops, "fd_quotient", ctx, ("hvp", step),
                          lambda f, gp, gm, eps: f(_put(gp, index, where, value), gm, eps))
    else:
        def perturb(f, th, u, eps):
            plus, minus = f(th, u, eps)
            return _put(plus, index, where, value), minus
        hits = _poison_op(monkeypatch, pymaml.ops, "fd_perturb", ctx, ("hvp", step), perturb)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "straddles a gradient jump" warning
        msg = _raises(meta, _tasks())
    assert hits == [1] * 3, f"one call per task, no retry: {hits}"
    assert _adjoint(step) in msg, msg
    if fault == "perturb_out":  # usually every gradient at θ + εu; a saturated tanh may hide it, then h_j tells
        assert f"'{NAMES[index]}'" in msg.split(_adjoint(step))[1].split("; ")[0], msg
    else:
        assert f", in {[NAMES[index]]}; " in msg, msg


@pytest.mark.parametrize("where,index,step", POSITIONS, ids=IDS)
def test_mixed_term_of_finite_differences_names_the_fixed_parameter(monkeypatch, where, index, step):
    """ANIL adapts the head; fd_quotient also returns the mixed term of each fixed (body)
    parameter, which reaches only that parameter's meta-gradient: no fused op reads it."""
    torch.manual_seed(0)
    model = MLP((1, 8, 8, 1))
    names = [n for n, _ in model.named_parameters()]
    body, head = names[:4], names[4:]
    meta = _meta(model, "anil", hvp="finite_difference")
    ctx = _track(monkeypatch, engines.ModelSteps)
    # the quotient's list is the 2 head tensors, then the 4 body tensors
    _poison_op(monkeypatch, pymaml.ops, "fd_quotient", ctx, ("hvp", step),
               lambda f, gp, gm, eps: _put(f(gp, gm, eps), len(head) + index, where, INF))
    msg = _raises(meta, _tasks())
    assert (f"first in hvp at adjoint step {step}: the mixed second derivative ∇²_{{φθ}} L_s(θ_{step})"
            f"(α_{step} ⊙ v_{step + 1}) passed to the inputs the inner loop does not adapt, in ['{body[index]}']; "
            f"the meta-gradient of ['{body[index]}'] holds NaN or Inf") in msg, msg


# ------------------------------------------------------------------ global_norm (ε of the difference; clipping)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("step", [0, 1, K - 1])
def test_global_norm_of_the_finite_difference_direction(monkeypatch, step, value):
    """ε = ε₀ / ‖u‖: a NaN norm makes ε NaN, an Inf norm makes ε 0 and the quotient 0/0."""
    meta = _meta(_mlp(), engine="recompute", hvp="finite_difference", task_batching="loop")
    ctx = _track(monkeypatch, engines.ModelSteps)
    calls = []

    def norm(f, ts):
        calls.append(1)
        return f(ts) * value if len(calls) % 3 == 1 else f(ts)  # ‖u‖, not the kink test's two norms

    _poison_op(monkeypatch, pymaml.ops, "global_norm", ctx, ("hvp", step), norm)
    msg = _raises(meta, _tasks())
    assert _adjoint(step) in msg and f", in {NAMES}; " in msg, msg


def test_global_norm_of_the_kink_test_does_not_mislead(monkeypatch):
    """A NaN in the kink test's norms (the difference itself finite) is no kink: the difference is
    used as it is, without retries or a warning, and the meta-gradient is the unpoisoned one."""
    tasks = _tasks()
    want = _meta(_mlp(), engine="recompute", hvp="finite_difference", task_batching="loop")
    want.step(tasks)
    meta = _meta(_mlp(), engine="recompute", hvp="finite_difference", task_batching="loop")
    ctx = _track(monkeypatch, engines.ModelSteps)
    calls = []

    def norm(f, ts):
        calls.append(1)
        return f(ts) * NAN if len(calls) % 3 == 2 else f(ts)

    _poison_op(monkeypatch, pymaml.ops, "global_norm", ctx, ("hvp", 1), norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        meta.step(tasks)
    assert len(calls) == 3 * 3, "three norms per task: ‖u‖ and the kink test's two, no retry"
    for p, q in zip(want.parameters(), meta.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_clipping_norm_that_overflows_is_not_applied(nonfinite):
    """A finite meta-gradient whose global norm overflows float32 (‖g‖ > 1.8e19): clipping would
    scale it by max_norm / Inf = 0 and apply a zero step silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    meta = _meta(model, max_grad_norm=1.0, nonfinite=nonfinite)
    tasks = _tasks()
    tasks[3] = tasks[3] * 1e21  # query targets: the query loss and its gradient become huge but finite
    before = [p.detach().clone() for p in meta.parameters()]
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"global_norm: the global norm of the meta-gradient, "
                                                     r"inf, is not finite .*max_grad_norm"):
            meta.step(tasks)
    else:
        stats = meta.step(tasks)
        assert stats["skipped"] == 1.0 and meta.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, meta.parameters()))


# ------------------------------------------------------------------ batch_norm and its backward
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


BN_NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("fault,step", [("forward", 0), ("forward", 1), ("backward", 1), ("backward", K - 1),
                                        ("query", None), ("hvp", 0), ("hvp", K - 1)])
def test_batch_norm(monkeypatch, fault, step, where):
    """batch_norm's output in the support pass of inner step i (every gradient of the step), the
    gradient fed into batch_norm's backward there (the parameters up to the BatchNorm only), its
    output in the query pass (the adjoint's start v_K) and in a finite-difference HVP pass."""
    meta = _meta(_bn_net(), task_batching="loop", engine="recompute", hvp="finite_difference")
    ctx = _track(monkeypatch, engines.ModelSteps)

    def forward(f, x, *a):
        return _put_graph(f(x, *a), where, NAN)

    def backward(f, x, *a):
        y = f(x, *a)
        y.register_hook(lambda g: _put_graph(g, where, INF))
        return y

    at = {"forward": ("support", step), "backward": ("support", step), "query": ("query", None),
          "hvp": ("hvp", step)}[fault]
    hits = _poison_op(monkeypatch, buffers, "_fused_batch_norm", ctx, at, backward if fault == "backward" else forward)
    msg = _raises(meta, _tasks())
    assert hits
    if fault in ("forward", "backward"):
        assert f"first in sgd_update at inner step {step}: θ_{step + 1} = θ_{step} − α_{step} ⊙ g_{step}" in msg, msg
        names = BN_NAMES if fault == "forward" else BN_NAMES[:4]
        assert f", in {names}; " in msg, msg
    else:
        assert _adjoint(K - 1 if fault == "query" else step) in msg and f", in {BN_NAMES}; " in msg, msg


# ------------------------------------------------------------------ linear_head_hvp (ANIL's head path)
@pytest.mark.parametrize("where,index,step", [("first", 0, 0), ("middle", 0, 1), ("last", 1, K - 1)], ids=IDS)
@pytest.mark.parametrize("fault", ["hvp_out", "direction_in", "features_grad_out"])
def test_linear_head_hvp(monkeypatch, fault, where, index, step):
    """Its head HVP (caught by backward_step), the direction u fed into it, and its gradient for the
    support features, which reaches only the body's meta-gradient (every body parameter)."""
    torch.manual_seed(0)
    model = MLP((1, 8, 8, 1))
    names = [n for n, _ in model.named_parameters()]
    body, head = names[:4], names[4:]
    meta = _meta(model, "anil")
    ctx = _track(monkeypatch, head_path.HeadSteps)

    def op(f, x, w, b, y, uw, ub, kind):
        if fault == "direction_in":
            uw, ub = _put([uw, ub], index, where, NAN)
        r = f(x, w, b, y, uw, ub, kind)
        if fault == "hvp_out":
            hw, hb = _put([r.hvp_weight, r.hvp_bias], index, where, INF)
            r = r._replace(hvp_weight=hw, hvp_bias=hb)
        elif fault == "features_grad_out":
            r = r._replace(grad_x=_put([r.grad_x], 0, where, NAN)[0])
        return r

    hits = _poison_op(monkeypatch, pymaml.ops, "linear_head_hvp", ctx, ("hvp", step), op)
    msg = _raises(meta, _tasks())
    assert hits and meta.last_info["hvp"] == "linear_head"
    if fault == "features_grad_out":
        assert f"first in hvp at adjoint step {step}: the mixed second derivative" in msg, msg
        # the body's backward may drop it (a ReLU passes no gradient where it is off, NaN or not), and
        # then only this flag tells: the meta-gradient can be finite
        assert f", in {body}; the meta-gradient " in msg, msg
    else:
        assert _adjoint(step) in msg, msg
        flagged = msg.split(_adjoint(step))[1].split("; ")[0]
        assert head[index] in flagged and not any(n in flagged for n in body), msg


def test_step_flags_with_fixed_columns():
    from pymaml.functional.nonfinite import StepFlags
    flags = StepFlags.new(["a", "b"], [torch.zeros(2), torch.zeros(3)], 2, fixed_names=["f"], fixed=[torch.zeros(1)])
    assert flags.flags.shape == (2, 2, 3) and flags.slot(1, 0).shape == (2,)
    flags.raise_fixed(0, [torch.tensor(True)])
    assert flags.first(flags.flags) is None
    flags.raise_fixed(0, [torch.tensor(False)])
    flags.slot(1, 0)[1] = 1.0
    assert flags.first(flags.flags) == (
        "backward_step at adjoint step 0: v_0 = v_1 − H_0(α_0 ⊙ v_1), the Hessian-vector product of step 0, the "
        "adjoint v_1 or the step sizes, in ['b']; and hvp at adjoint step 0: the mixed second derivative "
        "∇²_{φθ} L_s(θ_0)(α_0 ⊙ v_1) passed to the inputs the inner loop does not adapt, in ['f']")
    assert flags.flags[0].sum() == 0
    if torch.cuda.is_available():  # fixed inputs on another device get no columns
        other = StepFlags.new(["a"], [torch.zeros(2)], 1, fixed_names=["f"], fixed=[torch.zeros(1, device="cuda")])
        assert other.fixed == 0 and other.flags.shape == (2, 1, 1)
