"""The BatchNorm policy ``batch_norm="mode"`` (the default): the module's mode decides, as in PyTorch.

The oracle is plain autograd through an unrolled inner loop on a copy of the model, run in the same
mode through ``F.batch_norm`` (``torch.func.functional_call`` on the module, whose BatchNorm layers
update their own running statistics in train mode). Every engine must give the same meta-gradient
(float64, 1e-10 relative as whole vectors) and leave the same running statistics (the forward
passes an unrolled loop makes count; recomputed steps, HVP and finite-difference passes do not),
on both op paths.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymaml
import pymaml.ops._dispatch
from pymaml import reference
from pymaml.functional import Task, inner_loop, meta_gradient
from pymaml.models import ConvNet

OPS = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm", "clip_grad_norm_"]
HEAD = ["head.weight", "head.bias"]
# (engine, hvp, keep_graphs_mib, tolerance)
ENGINES = [("unrolled", "auto", 64.0, 1e-10), ("recompute", "double_backward", 64.0, 1e-10),
           ("recompute", "double_backward", 0.0, 1e-10), ("recompute", "jvp", 0.0, 1e-10),
           ("recompute", "finite_difference", 0.0, 1e-5)]


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def path(request, monkeypatch):
    if request.param == "compiled":
        if pymaml.backend() != "compiled":
            pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    else:
        for n in OPS:
            monkeypatch.setattr(pymaml.ops, n, getattr(reference, n))
        monkeypatch.setattr(pymaml.ops._dispatch, "COMPILED", False)  # batch_norm, linear_head_hvp
    return request.param


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def setup(n_tasks=2, seed=0, ways=3, momentum=0.1):
    torch.manual_seed(seed)
    model = ConvNet(in_channels=1, ways=ways, hidden=4, image_size=8, blocks=2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            with torch.no_grad():  # non-trivial running statistics, so eval mode differs from batch statistics
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    tasks = []
    for _ in range(n_tasks):
        y = torch.arange(ways).repeat(2)
        tasks.append(Task((torch.randn(len(y), 1, 8, 8) * 2 + 1, y), (torch.randn(len(y), 1, 8, 8) * 2 + 1, y)))
    return model, tasks


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def unrolled(model, tasks, steps, lr, adapt=None, weights=None):
    """(meta-gradient of the mean meta-loss, BatchNorm buffers after) by plain autograd on a copy."""
    ref = copy.deepcopy(model)
    theta = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    names = [n for n in theta if adapt is None or n in adapt]
    total = 0.0
    for t in tasks:
        cur = dict(theta)
        meta = 0.0
        for i in range(steps):
            ls = F.cross_entropy(torch.func.functional_call(ref, cur, (t.support[0],)), t.support[1])
            g = torch.autograd.grad(ls, [cur[n] for n in names], create_graph=True)
            cur.update({n: cur[n] - lr * gn for n, gn in zip(names, g)})
            if weights is not None and i + 1 < steps:
                meta = meta + weights[i] * F.cross_entropy(torch.func.functional_call(ref, cur, (t.query[0],)),
                                                           t.query[1])
        lq = F.cross_entropy(torch.func.functional_call(ref, cur, (t.query[0],)), t.query[1])
        total = total + meta + (weights[-1] if weights is not None else 1.0) * lq
    grads = torch.autograd.grad(total / len(tasks), list(theta.values()))
    return dict(zip(theta, grads)), bn_state(ref)


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=1e-15, msg=k)


@pytest.mark.parametrize("engine,hvp,keep,tol", ENGINES + [("first_order", "auto", 0.0, None)])
def test_train_mode_updates_running_stats_like_an_unrolled_loop(engine, hvp, keep, tol):
    model, tasks = setup()
    model.train()
    want_g, want_state = unrolled(model, tasks, 2, 0.1)
    res = meta_gradient(model, tasks, F.cross_entropy, steps=2, lr=0.1, engine=engine, hvp=hvp,
                        keep_graphs_mib=keep, task_batching="loop")
    assert res.batch_norm == "mode"
    assert_same_state(bn_state(model), want_state)
    assert int(model.state_dict()["body.1.num_batches_tracked"]) == 2 * (2 + 1)  # tasks × (K support + query)
    if tol is not None:
        assert rel(flat(res.grads), flat(want_g)) < tol


@pytest.mark.parametrize("engine,hvp,keep,tol", ENGINES)
def test_eval_mode_uses_running_stats_and_updates_nothing(engine, hvp, keep, tol):
    model, tasks = setup()
    model.eval()
    before = bn_state(model)
    want_g, _ = unrolled(model, tasks, 2, 0.1)
    res = meta_gradient(model, tasks, F.cross_entropy, steps=2, lr=0.1, engine=engine, hvp=hvp,
                        keep_graphs_mib=keep, task_batching="loop")
    assert rel(flat(res.grads), flat(want_g)) < tol
    assert_same_state(bn_state(model), before)
    # the running statistics matter: batch statistics give another meta-gradient
    other = meta_gradient(model, tasks, F.cross_entropy, steps=2, lr=0.1, engine=engine, hvp=hvp,
                          keep_graphs_mib=keep, batch_norm="transductive")
    assert rel(flat(other.grads), flat(want_g)) > 1e-3


def test_step_weights_and_cumulative_average():
    """A multi-step loss interleaves support and query passes; momentum=None is the cumulative average."""
    model, tasks = setup(momentum=None)
    w = [0.2, 0.3, 0.5]
    want_g, want_state = unrolled(model, tasks, 3, 0.1, weights=w)
    res = meta_gradient(model, tasks, F.cross_entropy, steps=3, lr=0.1, step_weights=w)
    assert rel(flat(res.grads), flat(want_g)) < 1e-10
    assert_same_state(bn_state(model), want_state)


@pytest.mark.parametrize("weights", [None, [0.3, 0.7]])
def test_head_only_adaptation_counts_the_loops_passes(weights):
    """ANIL on the closed-form head path: the body runs once per set, yet the running statistics are
    updated as by the loop's passes (the support set per inner step, the query set per query loss,
    interleaved with a multi-step loss); up to rounding, as the update is written out."""
    model, tasks = setup()
    want_g, want_state = unrolled(model, tasks, 2, 0.1, adapt=HEAD, weights=weights)
    res = meta_gradient(model, tasks, F.cross_entropy, steps=2, lr=0.1, adapt=HEAD, step_weights=weights)
    assert res.hvp == "linear_head"
    assert rel(flat(res.grads), flat(want_g)) < 1e-10
    got = bn_state(model)
    for k in want_state:
        torch.testing.assert_close(got[k], want_state[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("engine,hvp,keep,tol", [ENGINES[0], ENGINES[2], ("first_order", "auto", 0.0, 1e-10)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmap_updates_running_stats_task_by_task_like_the_loop(engine, hvp, keep, tol, mode):
    model, tasks = setup(n_tasks=3)
    model.train(mode == "train")
    w = [0.4, 0.6]
    want_g, want_state = unrolled(model, tasks, 2, 0.1, weights=w) if engine != "first_order" else (None, None)
    loop = copy.deepcopy(model)
    a = meta_gradient(loop, tasks, F.cross_entropy, steps=2, lr=0.1, engine=engine, hvp=hvp, keep_graphs_mib=keep,
                      step_weights=w, task_batching="loop")
    b = meta_gradient(model, tasks, F.cross_entropy, steps=2, lr=0.1, engine=engine, hvp=hvp, keep_graphs_mib=keep,
                      step_weights=w, task_batching="vmap")
    assert b.task_batching == "vmap" and rel(flat(b.grads), flat(a.grads)) < tol
    got, ref = bn_state(model), bn_state(loop)
    for k in ref:  # the update is written out under vmap: equal up to rounding
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14, msg=k)
    if want_state is not None:
        assert rel(flat(b.grads), flat(want_g)) < tol
        assert_same_state(bn_state(loop), want_state)


def test_inner_loop_counts_each_step():
    model, tasks = setup()
    ref = copy.deepcopy(model)
    cur = {n: p.detach() for n, p in ref.named_parameters()}
    for _ in range(3):  # three ordinary train-mode forward passes of an SGD loop
        leaves = {n: p.requires_grad_() for n, p in ((n, p.detach()) for n, p in cur.items())}
        loss = F.cross_entropy(torch.func.functional_call(ref, leaves, (tasks[0].support[0],)), tasks[0].support[1])
        cur = {n: p.detach() - 0.1 * g for (n, p), g in zip(leaves.items(), torch.autograd.grad(loss, list(leaves.values())))}
    fast = inner_loop(model, tasks[0].support, F.cross_entropy, steps=3, lr=0.1)
    assert_same_state(bn_state(model), bn_state(ref))
    assert rel(flat(fast), flat(cur)) < 1e-12
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        meta_gradient(model, tasks, F.cross_entropy, batch_norm="batch")


def test_meta_optimizer_collects_running_stats_for_eval_mode():
    """A net meta-trained through MetaOptimizer in train mode has running statistics collected from
    its training passes, and evaluates sensibly in eval mode on new tasks of the same family."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    meta = pymaml.MetaOptimizer(model, opt, "maml", F.cross_entropy, inner_lr=0.1, inner_steps=1)
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([1.0, -1.0, 0.5, 0.0])

    def tasks(n):
        """Inputs far from zero mean / unit variance; the label is one fixed linear rule."""
        out = []
        for _ in range(n):
            x = [torch.randn(20, 4, generator=g) * 3 + 5 for _ in range(2)]
            out.append(Task(*[(xi, ((xi - 5) @ w > 0).long()) for xi in x]))
        return out

    iters, per = 60, 4
    for _ in range(iters):
        meta.step(tasks(per))
    assert meta.last_info["batch_norm"] == "mode"
    bn = model[1]
    assert int(bn.num_batches_tracked) == iters * per * 2  # one support pass and one query pass per task
    assert not torch.allclose(bn.running_mean, torch.zeros(16), atol=0.1)
    assert not torch.allclose(bn.running_var, torch.ones(16), atol=0.1)
    model.eval()
    before, test = bn_state(model), tasks(20)
    _, outputs = meta.algorithm.evaluate(test)
    assert_same_state(bn_state(model), before)  # eval mode: running statistics read, not written
    acc = sum(float((o.argmax(-1) == t.query[1]).double().mean()) for o, t in zip(outputs, test)) / len(test)
    assert acc > 0.85, acc
