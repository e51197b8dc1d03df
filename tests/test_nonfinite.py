"""MetaOptimizer(nonfinite=...): a NaN or Inf in an inner-loop gradient, a Hessian-vector product or
the meta-gradient raises (default) naming the op, the step and the parameters, skips the outer step
(counted) or is applied, on both op paths (run with and without PYMAML_BACKEND=torch)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml
from pymaml.functional import engines

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(algorithm="maml", **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = pymaml.MetaOptimizer(model, opt, algorithm, F.mse_loss, inner_lr=0.05, inner_steps=2, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 1, generator=g)
    return model, meta, [x, torch.sin(x), x.clone(), torch.sin(x)]


def _snapshot(meta):
    return [p.detach().clone() for p in meta.parameters()]


@pytest.mark.parametrize("where", ["query_target", "support_input_inf"])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_default_raises_naming_parameters_and_step_and_updates_nothing(where, algorithm):
    model, meta, tasks = _setup(algorithm)
    meta.step(tasks)  # a finite step first
    if where == "query_target":
        tasks[3][0, 0, 0] = float("nan")
    else:
        tasks[0][1, -1, 0] = float("inf")
    before = _snapshot(meta)
    with pytest.raises(FloatingPointError, match=r"MetaOptimizer.step: NaN or Inf at outer step 1: .*"
                                                 r"the meta-gradient of \['0.weight'.* holds NaN or Inf"):
        meta.step(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))


def test_skip_leaves_parameters_counts_and_continues():
    model, meta, tasks = _setup(nonfinite="skip")
    bad = [t.clone() for t in tasks]
    bad[3][0, 0, 0] = float("nan")
    before = _snapshot(meta)
    stats = meta.step(bad)
    assert stats["skipped"] == 1.0 and meta.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))
    assert all(p.grad is None for p in meta.parameters())
    stats = meta.step(tasks)
    assert "skipped" not in stats and meta.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))
    assert all(bool(p.isfinite().all()) for p in meta.parameters())


def test_allow_applies_the_step():
    model, meta, tasks = _setup(nonfinite="allow")
    tasks[3][0, 0, 0] = float("nan")
    meta.step(tasks)
    assert not all(bool(p.isfinite().all()) for p in model.parameters())


def test_bad_setting_is_named():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip', 'allow'\), got 'ignore'"):
        _setup(nonfinite="ignore")


# ---------------------------------------------------------------------------- faults injected in the engine
def _poison(monkeypatch, method, step, index=0):
    """Makes ``ModelSteps.<method>`` return a NaN in tensor ``index`` of its gradient (support_grad)
    or Hessian-vector product (hvp) at inner step ``step``; records the calls."""
    orig = getattr(engines.ModelSteps, method)
    calls = []

    def poisoned(self, i, theta, *args):
        out = orig(self, i, theta, *args)
        calls.append(i)
        if i != step:
            return out
        if method == "support_grad":
            loss, g = out
            g = list(g)
            g[index] = g[index].clone()
            g[index].view(-1)[0] = float("nan")
            return loss, g
        g, hu, mu = out
        hu = list(hu)
        hu[index] = hu[index].clone()
        hu[index].view(-1)[-1] = float("inf")
        return g, hu, mu

    monkeypatch.setattr(engines.ModelSteps, method, poisoned)
    return calls


def _setup_k(algorithm="maml", steps=4, **kw):
    model, meta, tasks = _setup(algorithm, **kw)
    meta.algorithm.inner_steps = steps
    return model, meta, tasks


@pytest.mark.parametrize("step", [0, 2, 3])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "fomaml"])
def test_nan_in_inner_gradient_names_sgd_update_the_step_and_the_parameter(monkeypatch, step, algorithm):
    model, meta, tasks = _setup_k(algorithm)
    meta.step(tasks)
    calls = _poison(monkeypatch, "support_grad", step, index=2)  # '2.weight'
    before = _snapshot(meta)
    with pytest.raises(FloatingPointError) as e:
        meta.step(tasks)
    msg = str(e.value)
    assert step in calls
    assert f"NaN or Inf at outer step 1: first in sgd_update at inner step {step}: θ_{step + 1} = " in msg, msg
    assert "in ['2.weight']" in msg, msg
    assert "nothing was updated" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))


@pytest.mark.parametrize("step", [0, 1, 3])
@pytest.mark.parametrize("hvp", ["double_backward", "jvp", "finite_difference"])
def test_inf_in_hvp_names_backward_step_and_the_adjoint_step(monkeypatch, step, hvp):
    model, meta, tasks = _setup_k("maml", hvp=hvp, engine="recompute")
    _poison(monkeypatch, "hvp", step, index=1)  # '0.bias'
    with pytest.raises(FloatingPointError) as e:
        meta.step(tasks)
    msg = str(e.value)
    assert f"first in backward_step at adjoint step {step}: v_{step} = v_{step + 1} − H_{step}" in msg, msg
    assert "in ['0.bias']" in msg, msg


def test_one_host_read_per_outer_step(monkeypatch):
    """The sweeps record their flags without reading them (no .cpu/.item/.tolist while the
    meta-gradient runs); MetaOptimizer.step then copies the flags and the meta-gradient's check to
    the host once, together."""
    model, meta, tasks = _setup_k("maml")
    reads, inside = [], []
    for name in ("cpu", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            reads.append((_name, tuple(self.shape), bool(inside)))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    orig_mg = meta.algorithm.meta_gradient

    def meta_gradient(tasks):
        inside.append(1)
        try:
            return orig_mg(tasks)
        finally:
            inside.clear()

    monkeypatch.setattr(meta.algorithm, "meta_gradient", meta_gradient)
    meta.step(tasks)
    assert not [r for r in reads if r[2]]
    n_params = len(list(meta.parameters()))
    assert [r for r in reads if r[0] == "cpu"] == [("cpu", (n_params + 2 * 4 * 4,), False)]  # K=4, 4 tensors


@pytest.mark.parametrize("fused_opt", ["sgd", "adam"])
def test_skip_with_a_fused_outer_optimizer_decides_on_the_device(monkeypatch, fused_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, fused=True) if fused_opt == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.1, fused=True))
    meta = pymaml.MetaOptimizer(model, opt, "maml", F.mse_loss, inner_lr=0.05, inner_steps=3, nonfinite="skip")
    _, _, tasks = _setup()
    meta.step(tasks)
    state_before = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                    for k, st in opt.state.items()}
    before = _snapshot(meta)
    monkeypatch.setattr(pymaml.MetaOptimizer, "_find_nonfinite",
                        lambda self: pytest.fail("the flag was read on the host"))
    calls = _poison(monkeypatch, "support_grad", 1)
    stats = meta.step(tasks)
    assert 1 in calls and "skipped" not in stats
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))
    if fused_opt == "adam":  # the step counters are not advanced by a skipped step
        for k, st in opt.state.items():
            torch.testing.assert_close(st["step"], state_before[k]["step"])
    monkeypatch.undo()
    assert meta.skipped_steps == 1
    meta.step(tasks)
    assert meta.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))


def test_a_flag_alone_decides_even_when_the_meta_gradient_is_finite(monkeypatch):
    """A NaN met in the inner loop that does not reach the meta-gradient still counts."""
    from pymaml.functional import nonfinite
    orig = nonfinite.StepFlags.new

    def preset(*args, **kw):
        flags = orig(*args, **kw)
        flags.flags[0, 1, 3] = 1.0  # as if sgd_update of inner step 1 had met a NaN in '2.bias'
        return flags

    monkeypatch.setattr(nonfinite.StepFlags, "new", staticmethod(preset))
    model, meta, tasks = _setup_k("maml", steps=2)
    with pytest.raises(FloatingPointError, match=r"first in sgd_update at inner step 1: .* in \['2.bias'\]; "
                                                 r"the meta-gradient is finite"):
        meta.step(tasks)
    model, meta, tasks = _setup_k("maml", steps=2, nonfinite="skip")
    assert meta.step(tasks)["skipped"] == 1.0 and meta.skipped_steps == 1


def test_first_follows_the_order_the_sweeps_run():
    from pymaml.functional.nonfinite import StepFlags
    flags = StepFlags.new(["a", "b"], [torch.zeros(1), torch.zeros(1)], 2)
    assert flags.first(flags.flags) is None
    flags.flags[1, 0, 0] = 1.0
    flags.flags[1, 1, 1] = 1.0
    assert flags.first(flags.flags).startswith("backward_step at adjoint step 1: v_1 = v_2 − H_1")  # K-1 … 0
    flags.flags[0, 1, 1] = 1.0
    assert flags.first(flags.flags) == ("sgd_update at inner step 1: θ_2 = θ_1 − α_1 ⊙ g_1, the support "
                                        "gradient g_1 or θ_1, in ['b']")
    assert StepFlags.new(["a"], [torch.zeros(1)], 0) is None  # no inner steps: nothing to flag


def test_allow_does_not_read_the_flags(monkeypatch):
    model, meta, tasks = _setup_k("maml", nonfinite="allow")
    monkeypatch.setattr(pymaml.MetaOptimizer, "_find_nonfinite", lambda self: pytest.fail("checked"))
    _poison(monkeypatch, "support_grad", 1)
    meta.step(tasks)
    assert not all(bool(p.isfinite().all()) for p in model.parameters())
