"""Reptile and iMAML record where a NaN or Inf appears, on the device, as MAML does: the inner
updates in row 0 of a StepFlags record (per step, per parameter), iMAML's implicit meta-gradient
(query gradient, conjugate-gradient products, solution) in row 1; MetaOptimizer names the op, the
step and the parameter, or skips the outer step. Faults go into a gradient at apex's positions (the
first element of the first tensor, the middle one of the middle tensor, the last one of the last
tensor). Run on both op paths (with and without PYMAML_BACKEND=torch)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml
from pymaml.algorithms import imaml as imaml_mod

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
K = 3
#: (position, tensor index, inner step it is injected at): first / middle / last
POSITIONS = [("first", 0, 0), ("middle", 2, 1), ("last", 3, K - 1)]


def _setup(algorithm, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = pymaml.MetaOptimizer(model, opt, algorithm, F.mse_loss, inner_lr=0.05, inner_steps=K, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 1, generator=g)
    return meta, [x, torch.sin(x), x + 0.1, torch.sin(x + 0.1)]


def _snapshot(meta):
    return [p.detach().clone() for p in meta.parameters()]


def _put(ts, index, where, value):
    """A copy of the list ``ts`` with ``value`` at the first/middle/last element of tensor ``index``."""
    ts = list(ts)
    t = ts[index].clone()
    flat = t.view(-1)
    flat[{"first": 0, "middle": flat.numel() // 2, "last": flat.numel() - 1}[where]] = value
    ts[index] = t
    return ts


def _poison_update(monkeypatch, call, index, where, value):
    """The ``call``-th ``pymaml.ops.sgd_update`` (the first task's inner step ``call``) gets a
    gradient holding ``value``; returns the list of calls seen."""
    orig = pymaml.ops.sgd_update
    calls = []

    def poisoned(params, grads, *args, **kw):
        calls.append(kw.get("found_inf") is not None)
        if len(calls) - 1 == call:
            grads = _put(grads, index, where, value)
        return orig(params, grads, *args, **kw)

    monkeypatch.setattr(pymaml.ops, "sgd_update", poisoned)
    return calls


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("where,index,step", POSITIONS, ids=[p[0] for p in POSITIONS])
@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_inner_gradient_fault_is_named_by_op_step_and_parameter(monkeypatch, algorithm, where, index, step, value):
    meta, tasks = _setup(algorithm)
    meta.step(tasks)  # a finite step first
    calls = _poison_update(monkeypatch, step, index, where, value)
    before = _snapshot(meta)
    with pytest.raises(FloatingPointError) as e:
        meta.step(tasks)
    msg = str(e.value)
    assert calls and all(calls), "every inner update carries a found_inf flag"
    lhs = "φ" if algorithm == "imaml" else "θ"
    assert f"NaN or Inf at outer step 1: first in sgd_update at " in msg, msg
    assert f"inner step {step}: {lhs}_{step + 1} = {lhs}_{step} − α" in msg, msg
    assert f"in ['{NAMES[index]}']; " in msg, msg
    assert "nothing was updated" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))


@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_skip_leaves_the_parameters_and_counts(monkeypatch, algorithm):
    meta, tasks = _setup(algorithm, nonfinite="skip")
    before = _snapshot(meta)
    _poison_update(monkeypatch, 1, 2, "middle", NAN)
    stats = meta.step(tasks)
    assert stats["skipped"] == 1.0 and meta.skipped_steps == 1 and meta.steps_done == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))
    monkeypatch.undo()
    assert "skipped" not in meta.step(tasks) and meta.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(meta)))


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("where,index,iteration", POSITIONS, ids=[p[0] for p in POSITIONS])
def test_imaml_hvp_fault_in_conjugate_gradient_is_named(monkeypatch, where, index, iteration, value):
    """A non-finite product ends the solve (NaN curvature) with b or the iterate so far, both finite:
    only the flag tells."""
    meta, tasks = _setup("imaml", cg_steps=K)
    orig = imaml_mod.hessian_vector_product
    calls = []

    def poisoned(*args, **kw):
        g, hv, mixed = orig(*args, **kw)
        calls.append(1)
        if len(calls) - 1 == iteration:
            hv = _put(hv, index, where, value)
        return g, hv, mixed

    monkeypatch.setattr(imaml_mod, "hessian_vector_product", poisoned)
    with pytest.raises(FloatingPointError) as e:
        meta.step(tasks)
    msg = str(e.value)
    assert len(calls) > iteration
    assert "first in conjugate_gradient at the implicit meta-gradient (I + H/λ)⁻¹ ∇L_q(φ)" in msg, msg
    assert f"in ['{NAMES[index]}']; " in msg, msg


@pytest.mark.parametrize("engine", ["auto", "first_order"])
def test_imaml_query_gradient_fault_is_named(monkeypatch, engine):
    meta, tasks = _setup("imaml", engine=engine, nonfinite="raise")
    orig = imaml_mod.loss_and_grad

    def poisoned(unit, theta, phi, which, **kw):
        loss, out, g, gp = orig(unit, theta, phi, which, **kw)
        return loss, out, (_put(g, 3, "last", INF) if which == "q" else g), gp

    monkeypatch.setattr(imaml_mod, "loss_and_grad", poisoned)
    with pytest.raises(FloatingPointError, match=r"first in conjugate_gradient at the implicit meta-gradient .* "
                                                 r"in \['2.bias'\]; the meta-gradient of \[.*'2.bias'"):
        meta.step(tasks)


def test_conjugate_gradient_flags_per_tensor_without_changing_the_answer():
    A = lambda v: [2.0 * t for t in v]  # noqa: E731
    b = [torch.ones(3), torch.arange(4.0)]
    flag = torch.zeros(2)
    x = imaml_mod.conjugate_gradient(A, b, 5, found_inf=flag)
    torch.testing.assert_close(x, [t / 2 for t in b])
    assert flag.tolist() == [0.0, 0.0]
    bad = lambda v: [v[0] * 2.0, v[1] * NAN]  # noqa: E731
    x = imaml_mod.conjugate_gradient(bad, b, 5, found_inf=flag)
    assert flag.tolist() == [0.0, 1.0]
    assert all(bool(t.isfinite().all()) for t in x)  # truncated at the NaN curvature: b itself


@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_inner_loop_reads_nothing_on_the_host(monkeypatch, algorithm):
    """The flags are set on the device: no .cpu/.item/.tolist/float/bool while the inner loop runs
    (Reptile: its whole meta-gradient; iMAML: the proximal loop, whose conjugate-gradient solve reads
    its residual to stop)."""
    meta, tasks = _setup(algorithm)
    reads, inside = [], []
    for name in ("cpu", "item", "tolist", "__float__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            if inside:
                reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    target = meta.algorithm
    method = "meta_gradient" if algorithm == "reptile" else "_proximal"
    orig_m = getattr(target, method)

    def watched(*a, **k):
        inside.append(1)
        try:
            return orig_m(*a, **k)
        finally:
            inside.clear()

    monkeypatch.setattr(target, method, watched)
    meta.step(tasks)
    assert meta._flags is not None and meta._flags.flags.shape == (2, K, 4)
    assert not reads, reads
