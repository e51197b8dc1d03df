"""Each algorithm against a hand-written reference on tiny problems (float64), on both op paths.

References are written with plain autograd (``create_graph=True`` through the inner loop) or in
closed form, never with pymaml code, so they check the engine and the algorithms together.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymaml
from pymaml import reference
from pymaml.algorithms import ANIL, FOMAML, MAML, MAMLpp, MetaSGD, Reptile, iMAML, make
from pymaml.algorithms.mamlpp import multi_step_weights
from pymaml.functional import Task
from pymaml.models import MLP
from pymaml.optim import MetaOptimizer
from pymaml.wrapper import MAML as L2LMAML

OPS = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm", "clip_grad_norm_"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["active", "torch"])
def backend(request, monkeypatch):
    """'active': whatever pymaml.ops dispatches to; 'torch': every op forced to the reference."""
    if request.param == "torch":
        for name in OPS:
            if hasattr(pymaml.ops, name):
                monkeypatch.setattr(pymaml.ops, name, getattr(reference, name))
    return request.param


def rel(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sin_tasks(n=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        amp, ph = 0.5 + 4 * torch.rand((), generator=g, dtype=torch.float64), 3 * torch.rand((), generator=g, dtype=torch.float64)
        xs = 10 * torch.rand(k, 1, generator=g, dtype=torch.float64) - 5
        xq = 10 * torch.rand(k, 1, generator=g, dtype=torch.float64) - 5
        tasks.append(Task((xs, amp * torch.sin(xs - ph)), (xq, amp * torch.sin(xq - ph))))
    return tasks


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP((1, 8, 8, 1)).double()


def unrolled_reference(model, tasks, steps, lr_of, adapted=None, weights=None, extra=()):
    """Plain autograd: mean over tasks of Σ_i w_i L_q(θ_i) (or L_q(θ_K)); grads for θ and ``extra``."""
    names = [n for n, _ in model.named_parameters()]
    theta = dict(model.named_parameters())
    adapted = names if adapted is None else adapted
    total = 0.0
    for t in tasks:
        p = dict(theta)
        meta = 0.0
        for i in range(steps):
            loss = F.mse_loss(torch.func.functional_call(model, p, (t.support[0],)), t.support[1])
            g = torch.autograd.grad(loss, [p[n] for n in adapted], create_graph=True)
            p = {**p, **{n: p[n] - lr_of(i, n) * gi for n, gi in zip(adapted, g)}}
            if weights is not None:
                meta = meta + weights[i] * F.mse_loss(torch.func.functional_call(model, p, (t.query[0],)), t.query[1])
        if weights is None:
            meta = F.mse_loss(torch.func.functional_call(model, p, (t.query[0],)), t.query[1])
        total = total + meta / len(tasks)
    wrt = [theta[n] for n in names] + list(extra)
    g = torch.autograd.grad(total, wrt, allow_unused=True)
    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
    return dict(zip(names, g[:len(names)])), g[len(names):]


@pytest.mark.parametrize("engine", ["recompute", "unrolled"])
def test_maml_matches_autograd(backend, engine):
    model, tasks = mlp(), sin_tasks()
    algo = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=3, engine=engine)
    res = algo.meta_gradient(tasks)
    ref, _ = unrolled_reference(model, tasks, 3, lambda i, n: 0.05)
    assert rel(list(res.grads.values()), list(ref.values())) < 1e-10


def test_fomaml_is_query_gradient_at_adapted_params(backend):
    model, tasks = mlp(), sin_tasks()
    res = FOMAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2).meta_gradient(tasks)
    names = [n for n, _ in model.named_parameters()]
    expect = {n: 0.0 for n in names}
    for t in tasks:
        p = {n: q.detach().clone().requires_grad_() for n, q in model.named_parameters()}
        for _ in range(2):
            g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, p, (t.support[0],)), t.support[1]),
                                    list(p.values()))
            p = {n: (p[n] - 0.05 * gi).detach().requires_grad_() for n, gi in zip(names, g)}
        g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, p, (t.query[0],)), t.query[1]),
                                list(p.values()))
        for n, gi in zip(names, g):
            expect[n] = expect[n] + gi / len(tasks)
    assert rel(list(res.grads.values()), list(expect.values())) < 1e-12


def test_reptile_update_is_theta_plus_eps_times_displacement(backend):
    model, tasks = mlp(), sin_tasks()
    eps, alpha, K = 0.3, 0.02, 4
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # hand-written reference: K SGD steps per task, then θ + ε(mean θ_K − θ)
    mean_k = {n: torch.zeros_like(p) for n, p in theta0.items()}
    for t in tasks:
        p = {n: q.clone() for n, q in theta0.items()}
        for _ in range(K):
            leaves = {n: q.requires_grad_() for n, q in p.items()}
            loss = F.mse_loss(torch.func.functional_call(model, leaves, (t.support[0],)), t.support[1])
            g = torch.autograd.grad(loss, list(leaves.values()))
            p = {n: (q - alpha * gi).detach() for (n, q), gi in zip(leaves.items(), g)}
        for n in mean_k:
            mean_k[n] += p[n] / len(tasks)
    expect = {n: theta0[n] + eps * (mean_k[n] - theta0[n]) for n in theta0}
    opt = torch.optim.SGD(model.parameters(), lr=eps)
    MetaOptimizer(model, opt, "reptile", F.mse_loss, inner_lr=alpha, inner_steps=K).step(tasks)
    got = dict(model.named_parameters())
    for n in expect:
        torch.testing.assert_close(got[n].detach(), expect[n], rtol=1e-12, atol=1e-14)


def test_imaml_matches_exact_implicit_gradient_on_quadratic(backend):
    # Linear least squares: L_s(w) = mean((Xw − y)²) has the known Hessian H = 2XᵀX/N.
    torch.manual_seed(1)
    d, N, lam = 6, 20, 2.0
    model = nn.Linear(d, 1, bias=False).double()
    Xs, Xq = torch.randn(N, d, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    ys, yq = torch.randn(N, 1, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64)
    task = Task((Xs, ys), (Xq, yq))
    H = 2 * Xs.T @ Xs / N
    algo = iMAML(model, F.mse_loss, lam=lam, inner_lr=0.05, inner_steps=400, cg_steps=d)
    res = algo.meta_gradient([task])
    theta = model.weight.detach().reshape(-1)
    # the inner loop reaches the exact proximal minimiser (H + λI)⁻¹(λθ + 2Xᵀy/N)
    phi_star = torch.linalg.solve(H + lam * torch.eye(d, dtype=torch.float64), lam * theta + 2 * Xs.T @ ys[:, 0] / N)
    phi = algo.adapt(task.support, 400)["weight"].reshape(-1)
    torch.testing.assert_close(phi, phi_star, rtol=1e-10, atol=1e-12)
    # meta-gradient = (I + H/λ)⁻¹ ∇L_q(φ*)
    gq = 2 * Xq.T @ (Xq @ phi_star - yq[:, 0]) / N
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) + H / lam, gq)
    torch.testing.assert_close(res.grads["weight"].reshape(-1), exact, rtol=1e-9, atol=1e-12)


def test_anil_equals_maml_restricted_to_head(backend):
    model, tasks = mlp(), sin_tasks()
    algo = ANIL(model, F.mse_loss, inner_lr=0.1, inner_steps=2)
    assert algo.adapted_names() == ["head.weight", "head.bias"]
    res = algo.meta_gradient(tasks)
    ref, _ = unrolled_reference(model, tasks, 2, lambda i, n: 0.1, adapted=["head.weight", "head.bias"])
    assert rel(list(res.grads.values()), list(ref.values())) < 1e-10
    # the body is meta-learned (non-zero mixed term), not frozen
    assert float(res.grads["body.0.weight"].norm()) > 0


def check_metasgd(model, tasks, **kw):
    """Meta-SGD with distinct per-element step sizes against plain autograd (float64): the result and
    the step-size gradients in parameter order."""
    algo = MetaSGD(model, F.mse_loss, inner_lr=0.05, inner_steps=2, **kw)
    with torch.no_grad():
        for p in algo.lr.values():
            p.uniform_(0.01, 0.1)
    res = algo.meta_gradient(tasks)
    names = [n for n, _ in model.named_parameters()]
    alphas = [algo.lr[n.replace(".", "__")] for n in names]
    ref, ref_a = unrolled_reference(model, tasks, 2, lambda i, n: algo.lr[n.replace(".", "__")], extra=alphas)
    assert rel(list(res.grads.values()), list(ref.values())) < 1e-10
    got_a = [res.extra_grads["lr." + n.replace(".", "__")] for n in names]
    assert rel(got_a, ref_a) < 1e-10
    return res, got_a


def test_metasgd_step_size_gradients_match_autograd(backend):
    check_metasgd(mlp(), sin_tasks())


@pytest.mark.parametrize("memory_format", ["auto", "preserve"])
def test_metasgd_conv_net_channels_last_matches_autograd(backend, memory_format):
    """A conv net runs channels-last by default on the CPU; the per-element step sizes and their
    gradients stay in the parameters' own layout and match plain autograd (float64)."""
    from pymaml.models import ConvNet
    torch.manual_seed(0)
    model = ConvNet(in_channels=2, ways=3, hidden=4, image_size=8, blocks=2, batch_norm=False).double()
    g = torch.Generator().manual_seed(1)
    tasks = [Task(*[(torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64),
                     torch.randn(6, 3, generator=g, dtype=torch.float64)) for _ in range(2)]) for _ in range(2)]
    res, got_a = check_metasgd(model, tasks, memory_format=memory_format)
    assert res.info["memory_format"] == ("channels_last" if memory_format == "auto" else "preserve")
    assert all(t.is_contiguous() for t in list(res.grads.values()) + got_a)


@pytest.mark.parametrize("engine", ["recompute", "unrolled"])
def test_mamlpp_step_size_gradients_and_multi_step_loss_match_autograd(backend, engine):
    model, tasks = mlp(), sin_tasks()
    K = 3
    algo = MAMLpp(model, F.mse_loss, inner_lr=0.05, inner_steps=K, engine=engine, msl_iterations=10)
    with torch.no_grad():
        for p in algo.lr.values():
            p.uniform_(0.01, 0.1)
    algo.iteration.fill_(4)
    w = multi_step_weights(K, 4, 10)
    assert abs(sum(w) - 1) < 1e-12 and w[-1] > w[0]
    res = algo.meta_gradient(tasks)
    names = [n for n, _ in model.named_parameters()]
    lr_of = lambda i, n: algo.lr[f"s{i}__{n.replace('.', '__')}"]
    alphas = [algo.lr[f"s{i}__{n.replace('.', '__')}"] for i in range(K) for n in names]
    ref, ref_a = unrolled_reference(model, tasks, K, lr_of, weights=w, extra=alphas)
    assert rel(list(res.grads.values()), list(ref.values())) < 1e-10
    got_a = [res.extra_grads[f"lr.s{i}__{n.replace('.', '__')}"] for i in range(K) for n in names]
    assert rel(got_a, ref_a) < 1e-10
    assert int(algo.iteration) == 5


def test_mamlpp_derivative_order_annealing():
    model, tasks = mlp(), sin_tasks()
    algo = MAMLpp(model, F.mse_loss, inner_lr=0.05, inner_steps=2, first_order_iterations=1,
                  multi_step_loss=False)
    first = algo.meta_gradient(tasks)
    second = algo.meta_gradient(tasks)
    assert first.info["engine"] == "first_order" and second.info["engine"] != "first_order"
    fo = FOMAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2).meta_gradient(tasks)
    assert rel(list(first.grads.values()), list(fo.grads.values())) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
def test_learn2learn_style_script_matches_meta_optimizer(backend, first_order):
    tasks = sin_tasks(4)
    model_a = mlp(3)
    model_b = copy.deepcopy(model_a)
    # learn2learn-style: clone / adapt / backward
    maml = L2LMAML(model_a, lr=0.05, first_order=first_order)
    opt_a = torch.optim.SGD(maml.parameters(), lr=0.1)
    opt_a.zero_grad()
    for t in tasks:
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(t.support[0]), t.support[1]))
        (F.mse_loss(learner(t.query[0]), t.query[1]) / len(tasks)).backward()
    grads_a = [p.grad.clone() for p in model_a.parameters()]
    opt_a.step()
    # the meta-optimizer
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    meta = MetaOptimizer(model_b, opt_b, "fomaml" if first_order else "maml", F.mse_loss, inner_lr=0.05,
                         inner_steps=2)
    meta.zero_grad()
    stats = meta.backward(tasks)
    grads_b = [p.grad.clone() for p in model_b.parameters()]
    opt_b.step()
    assert rel(grads_b, grads_a) < 1e-10
    assert "query_loss" in stats
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_meta_optimizer_adds_learned_step_sizes_and_reports_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = MetaOptimizer(model, opt, "metasgd", F.cross_entropy, inner_lr=0.1, inner_steps=1)
    assert len(opt.param_groups) == 2  # the step sizes joined as their own group
    x_s, y_s = torch.randn(5, 6, 4), torch.randint(0, 3, (5, 6))
    x_q, y_q = torch.randn(5, 6, 4), torch.randint(0, 3, (5, 6))
    before = [p.detach().clone() for p in meta.algorithm.parameters()]
    stats = meta.step((x_s, y_s, x_q, y_q))
    assert 0.0 <= stats["accuracy"] <= 1.0
    after = list(meta.algorithm.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_make_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        make("nope", mlp(), F.mse_loss)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "imaml"])
def test_every_algorithm_learns_sinusoid(name):
    """A short run must show learning: the held-out post-adaptation loss falls well below its start."""
    from pymaml.data import SinusoidTasks
    torch.manual_seed(0)
    model = MLP((1, 40, 40, 1))
    settings = dict(inner_lr=0.01, inner_steps=1)
    outer_lr = 1e-2
    if name == "reptile":
        settings = dict(inner_lr=0.02, inner_steps=5)
    if name == "imaml":  # the implicit gradient needs a nearly solved proximal problem
        settings = dict(inner_lr=0.01, inner_steps=10, lam=0.5, cg_steps=5)
    if name == "anil":
        settings = dict(inner_lr=0.05, inner_steps=1)
    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    meta = MetaOptimizer(model, opt, name, F.mse_loss, **settings)
    train, held = SinusoidTasks(10, 10, seed=1), SinusoidTasks(10, 50, seed=2).sample(50)

    def held_out():
        return sum(meta.algorithm.evaluate(held)[0]) / 50

    start = held_out()
    for _ in range(150 if name != "imaml" else 100):
        meta.step(train.sample(10))
    end = held_out()
    assert end < 0.7 * start, (name, start, end)
