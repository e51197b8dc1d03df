"""MetaOptimizer(nonfinite=...): a meta-gradient holding NaN or Inf raises (default), skips the
outer step (counted) or is applied, on both op paths."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml

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
    with pytest.raises(FloatingPointError, match=r"MetaOptimizer.step: the meta-gradient of \['0.weight'.* "
                                                 r"holds NaN or Inf at outer step 1"):
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
