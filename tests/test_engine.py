"""The meta-gradient engines against a hand-written autograd reference (float64).

Every exact engine (unrolled; recompute with double backward and with forward-over-reverse) must
equal plain ``torch.autograd.grad(create_graph=True)`` through the inner loop to 1e-10 relative,
compared as whole gradient vectors (global norm: conv biases before BatchNorm have an exactly zero
true gradient, so per-tensor relative errors would measure rounding). Finite differences agree to
1e-6; first order is ∇L_q(θ_K) exactly. Both backends of ``pymaml.ops`` are exercised.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymaml
import pymaml.reference
from pymaml.functional import Task, adapt, meta_gradient
from pymaml.models import MLP, ConvNet

OPS_NAMES = ["sgd_update", "sgd_update_", "backward_step", "fd_perturb", "fd_quotient", "global_norm",
             "clip_grad_norm_"]


def _compiled_available() -> bool:
    backend = getattr(pymaml, "backend", None)
    return callable(backend) and "torch" not in str(backend()).lower()


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def backend(request, monkeypatch):
    """Runs each test with the compiled ops (when built) and with the pure-torch reference."""
    if request.param == "compiled":
        if not _compiled_available():
            pytest.skip("compiled pymaml ops are not available")
    else:
        for n in OPS_NAMES:
            if hasattr(pymaml.ops, n):
                monkeypatch.setattr(pymaml.ops, n, getattr(pymaml.reference, n))
    return request.param


pytestmark = pytest.mark.usefixtures("float64_one_thread")


# ----------------------------------------------------------------------------------------- helpers

def flat(d, names=None):
    names = list(d) if names is None else names
    return torch.cat([d[n].reshape(-1) for n in names])


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def mlp_setup(n_tasks=3, seed=0):
    torch.manual_seed(seed)
    model = MLP((1, 16, 16, 1))
    tasks = [Task((torch.randn(8, 1) * 3, torch.randn(8, 1)), (torch.randn(6, 1) * 3, torch.randn(6, 1)))
             for _ in range(n_tasks)]
    return model, tasks, F.mse_loss


def conv_setup(n_tasks=2, seed=0, ways=3):
    torch.manual_seed(seed)
    model = ConvNet(in_channels=1, ways=ways, hidden=4, image_size=8, blocks=2)
    tasks = []
    for _ in range(n_tasks):
        ys = torch.arange(ways).repeat(2)
        yq = torch.arange(ways).repeat(2)
        tasks.append(Task((torch.randn(len(ys), 1, 8, 8), ys), (torch.randn(len(yq), 1, 8, 8), yq)))
    return model, tasks, F.cross_entropy


SETUPS = {"mlp": mlp_setup, "conv": conv_setup}


def make_lr(form, model, steps, adapt_names=None, seed=1):
    """Step sizes in every accepted form, small and positive."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters() if adapt_names is None or n in adapt_names]
    shapes = dict((n, p.shape) for n, p in model.named_parameters())

    def r(shape=()):
        return 0.02 + 0.03 * torch.rand(shape, generator=g)
    if form == "float":
        return 0.05
    if form == "shared":
        return r(())
    if form == "per_tensor":
        return {n: r((1,)) for n in names}
    if form == "per_element":
        return {n: r(shapes[n]) for n in names}
    if form == "per_step_per_tensor":
        return [{n: r((1,)) for n in names} for _ in range(steps)]
    if form == "per_step_mixed":
        return [0.03 if i % 2 else r(()) for i in range(steps)]
    raise ValueError(form)


def lr_at(lr, i, name):
    x = lr[i] if isinstance(lr, list) else lr
    if isinstance(x, dict):
        x = x[name]
    return x if not isinstance(x, torch.Tensor) or x.numel() > 1 else x.reshape(())


def lr_leaves(lr):
    """The distinct tensors in lr, in a fixed order."""
    xs = lr if isinstance(lr, list) else [lr]
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            out.extend(x.values())
    seen, uniq = set(), []
    for t in out:
        if id(t) not in seen:
            seen.add(id(t))
            uniq.append(t)
    return uniq


def lr_grads_flat(lr, lr_grads):
    xs = lr if isinstance(lr, list) else [lr]
    gs = lr_grads if isinstance(lr, list) else [lr_grads]
    out = []
    for x, gx in zip(xs, gs):
        if isinstance(x, torch.Tensor):
            out.append(gx.reshape(-1))
        elif isinstance(x, dict):
            out.extend(gx[k].reshape(-1) for k in x)
    return torch.cat(out) if out else None


def reference(model, tasks, loss_fn, steps, lr, step_weights=None, adapt_names=None, weight_decay=0.0):
    """Plain autograd through the unrolled inner loop: (grads dict, flat lr grads in lr_leaves order)."""
    params = dict(model.named_parameters())
    names = list(params)
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    leaves = lr_leaves(lr)
    proxies = {id(t): t.detach().clone().requires_grad_() for t in leaves}

    def lr_proxy(i, n):
        a = lr_at(lr, i, n)
        if isinstance(a, torch.Tensor):
            base = lr[i] if isinstance(lr, list) else lr
            src = base if isinstance(base, torch.Tensor) else base[n]
            return proxies[id(src)].reshape(a.shape)
        return a

    bn_free = copy.deepcopy(model)
    for m in bn_free.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    bn_free.train()

    def run(th, x):
        return torch.func.functional_call(bn_free, th, (x,))

    total = 0.0
    for t in tasks:
        cur = dict(theta)
        meta = 0.0
        for i in range(steps):
            ls = loss_fn(run(cur, t.support[0]), t.support[1])
            ad = [n for n in names if adapt_names is None or n in adapt_names]
            g = torch.autograd.grad(ls, [cur[n] for n in ad], create_graph=True)
            for n, gn in zip(ad, g):
                cur[n] = cur[n] - lr_proxy(i, n) * (gn + weight_decay * cur[n])
            if step_weights is not None and i + 1 < steps:
                meta = meta + step_weights[i] * loss_fn(run(cur, t.query[0]), t.query[1])
        lq = loss_fn(run(cur, t.query[0]), t.query[1])
        meta = meta + (step_weights[-1] if step_weights is not None else 1.0) * lq
        total = total + meta
    total = total / len(tasks)
    wrt = [theta[n] for n in names] + [proxies[id(t)] for t in leaves]
    gs = torch.autograd.grad(total, wrt, allow_unused=True)
    gs = [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]
    grads = dict(zip(names, gs[:len(names)]))
    lr_flat = torch.cat([g.reshape(-1) for g in gs[len(names):]]) if leaves else None
    return grads, lr_flat


# (engine, hvp, keep_graphs_mib): recompute with double backward both keeping step graphs within the
# default budget (these small models fit: no recomputation) and as the pure recursion (budget 0).
EXACT = [("unrolled", "double_backward", 64.0), ("recompute", "double_backward", 64.0),
         ("recompute", "double_backward", 0.0), ("recompute", "jvp", 64.0)]


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("setup", ["mlp", "conv"])
@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("form", ["float", "shared", "per_tensor", "per_step_per_tensor", "per_element"])
@pytest.mark.parametrize("weighted", [False, True])
def test_exact_engines_match_autograd(setup, steps, form, weighted):
    model, tasks, loss_fn = SETUPS[setup]()
    lr = make_lr(form, model, steps)
    w = [0.5 + 0.1 * i for i in range(steps)] if weighted else None
    ref, ref_lr = reference(model, tasks, loss_fn, steps, lr, step_weights=w)
    for engine, hvp, keep in EXACT:
        res = meta_gradient(model, tasks, loss_fn, steps=steps, lr=lr, engine=engine, hvp=hvp,
                            step_weights=w, task_batching="loop", keep_graphs_mib=keep)
        assert rel(flat(res.grads), flat(ref)) < 1e-10, (engine, hvp)
        if ref_lr is None:
            assert res.lr_grads is None
        else:
            assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-10, (engine, hvp, "lr")


@pytest.mark.parametrize("setup", ["mlp", "conv"])
def test_finite_difference_close(setup):
    model, tasks, loss_fn = SETUPS[setup]()
    lr = make_lr("per_tensor", model, 3)
    ref, ref_lr = reference(model, tasks, loss_fn, 3, lr)
    res = meta_gradient(model, tasks, loss_fn, steps=3, lr=lr, engine="recompute",
                        hvp="finite_difference", task_batching="loop")
    assert rel(flat(res.grads), flat(ref)) < 1e-6
    assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-6


@pytest.mark.parametrize("offset,kink_found", [(2e-6, True), (1e-13, False)])
def test_finite_difference_steps_around_a_relu_kink(offset, kink_found):
    """A hidden unit whose pre-activation on one support point sits ``offset`` above 0, and a
    direction u along its bias: θ − εu (ε = ε₀ ≈ 6e-6 in float64) switches the ReLU off, so the plain
    central difference carries the gradient jump divided by ε. Given ∇L(θ), the HVP sees the one-sided
    halves disagree and retries with ε/8, which no longer crosses (2e-6); a kink closer than every ε
    tried (1e-13) is reported with a RuntimeWarning."""
    from pymaml.functional.batching import make_units
    from pymaml.functional.buffers import batch_norm_policy
    from pymaml.functional.hessian import hessian_vector_product as hvp, loss_and_grad
    torch.manual_seed(0)
    model = MLP((1, 4, 1))
    xs, ys = torch.linspace(-1, 1, 6).reshape(6, 1) + 0.3, torch.randn(6, 1)
    with torch.no_grad():
        w0 = model.body[0].weight[0, 0]
        model.body[0].bias[0] = offset - w0 * xs[0, 0]
    names = [n for n, _ in model.named_parameters()]
    unit = make_units(model, F.mse_loss, names, [], [Task((xs, ys), (xs, ys))], "loop")[0][0]
    theta = [p.detach() for p in model.parameters()]
    u = [torch.zeros_like(t) for t in theta]
    u[names.index("body.0.bias")][0] = 1.0
    with batch_norm_policy(model):
        exact = flat(dict(zip(names, hvp("double_backward", unit, theta, [], u)[1])))
        plain = flat(dict(zip(names, hvp("finite_difference", unit, theta, [], u)[1])))
        g = loss_and_grad(unit, theta, [], "s")[2]
        if kink_found:
            robust = flat(dict(zip(names, hvp("finite_difference", unit, theta, [], u, grad=g)[1])))
        else:
            with pytest.warns(RuntimeWarning, match="gradient jump"):
                robust = flat(dict(zip(names, hvp("finite_difference", unit, theta, [], u, grad=g)[1])))
    assert rel(plain, exact) > 1e-2  # the plain difference is wrong here: the test can fail
    if kink_found:
        assert rel(robust, exact) < 1e-6
    else:
        assert torch.equal(robust, plain)  # the default-ε result, flagged


@pytest.mark.parametrize("setup", ["mlp", "conv"])
def test_first_order_is_query_gradient_at_theta_K(setup):
    model, tasks, loss_fn = SETUPS[setup](n_tasks=1)
    t = tasks[0]
    # bitwise: the same ops in the same layout (channels-last convolutions round differently)
    res = meta_gradient(model, tasks, loss_fn, steps=3, lr=0.05, engine="first_order", task_batching="loop",
                        memory_format="preserve")
    theta_k = adapt(model, t.support, loss_fn, steps=3, lr=0.05)
    leaves = {n: p.detach().requires_grad_() for n, p in theta_k.items()}
    from pymaml.functional.buffers import batch_norm_policy
    from pymaml.functional.inner import model_call
    with batch_norm_policy(model):
        # the engine's own forward (a conv net's convolutions through pymaml's op) ...
        lq = loss_fn(model_call(model, list(leaves), [], list(leaves.values()), [], t.query[0]), t.query[1])
        g = torch.autograd.grad(lq, list(leaves.values()))
        # ... and plain torch: the same gradient up to rounding
        lp = loss_fn(torch.func.functional_call(model, leaves, (t.query[0],)), t.query[1])
        gp = torch.autograd.grad(lp, list(leaves.values()))
    for (n, a), b in zip(res.grads.items(), g):
        assert torch.equal(a, b), n
    # whole vectors: a conv bias before BatchNorm has an exactly zero gradient (rounding noise)
    got, plain = torch.cat([a.reshape(-1) for a in res.grads.values()]), torch.cat([c.reshape(-1) for c in gp])
    assert rel(got, plain) < 1e-12


def test_first_order_mean_over_tasks():
    model, tasks, loss_fn = mlp_setup(n_tasks=3)
    res = meta_gradient(model, tasks, loss_fn, steps=2, lr=0.05, engine="first_order")
    want = 0
    for t in tasks:
        theta_k = adapt(model, t.support, loss_fn, steps=2, lr=0.05)
        leaves = {n: p.detach().requires_grad_() for n, p in theta_k.items()}
        lq = loss_fn(torch.func.functional_call(model, leaves, (t.query[0],)), t.query[1])
        want = want + flat(dict(zip(leaves, torch.autograd.grad(lq, list(leaves.values()))))) / len(tasks)
    assert rel(flat(res.grads), want) < 1e-14


@pytest.mark.parametrize("setup", ["mlp", "conv"])
@pytest.mark.parametrize("engine,hvp,keep", EXACT + [("first_order", "auto", 0.0)])
def test_vmap_equals_loop(setup, engine, hvp, keep):
    model, tasks, loss_fn = SETUPS[setup]()
    lr = make_lr("per_element", model, 2)
    kw = dict(steps=2, lr=lr, engine=engine, hvp=hvp, keep_graphs_mib=keep)
    a = meta_gradient(model, tasks, loss_fn, task_batching="loop", **kw)
    b = meta_gradient(model, tasks, loss_fn, task_batching="vmap", **kw)
    assert a.task_batching == "loop" and b.task_batching == "vmap"
    assert rel(flat(b.grads), flat(a.grads)) < 1e-10
    assert rel(lr_grads_flat(lr, b.lr_grads), lr_grads_flat(lr, a.lr_grads)) < 1e-10
    assert torch.allclose(a.query_loss, b.query_loss, rtol=1e-12)
    for x, y in zip(a.query_outputs, b.query_outputs):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


class _NotAChain(nn.Module):
    """A custom forward: the batched unit must keep using vmap for it."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)) * 2)


def _batched_case(kind):
    torch.manual_seed(0)
    reg = [Task((torch.randn(8, 1) * 3, torch.randn(8, 1)), (torch.randn(6, 1) * 3, torch.randn(6, 1)))
           for _ in range(3)]
    if kind == "sequential_ce":
        model = nn.Sequential(nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        tasks = [Task((torch.randn(6, 2), torch.randint(0, 3, (6,))), (torch.randn(5, 2), torch.randint(0, 3, (5,))))
                 for _ in range(3)]
        return model, tasks, F.cross_entropy, None, True
    if kind == "custom_loss":
        return MLP((1, 8, 8, 1)), reg, lambda o, y: ((o - y) ** 4).mean(), None, True
    if kind == "head_only":
        return MLP((1, 8, 8, 1)), reg, F.mse_loss, ["head.weight", "head.bias"], True
    if kind == "not_a_chain":
        return _NotAChain(), reg, F.mse_loss, None, False
    return MLP((1, 8, 8, 1)), reg, F.mse_loss, None, True


@pytest.mark.parametrize("kind", ["mlp", "sequential_ce", "custom_loss", "head_only", "not_a_chain"])
@pytest.mark.parametrize("engine", ["unrolled", "recompute"])
def test_stacked_linear_path_equals_loop(kind, engine):
    """Batched units of Linear/activation chains run as batched matmuls (no vmap); the meta-gradient
    equals the task loop's, and other models still take the vmap path."""
    from pymaml.functional.batching import make_units
    model, tasks, loss_fn, adapt_names, stackable = _batched_case(kind)
    names = [n for n, _ in model.named_parameters() if adapt_names is None or n in adapt_names]
    fixed = [n for n, _ in model.named_parameters() if n not in names]
    units, _, batched = make_units(model, loss_fn, names, fixed, tasks, "vmap")
    assert batched and (units[0]._stacked is not None) == stackable
    kw = dict(steps=2, lr=0.05, engine=engine, hvp="double_backward", adapt=adapt_names)
    a = meta_gradient(model, tasks, loss_fn, task_batching="loop", **kw)
    b = meta_gradient(model, tasks, loss_fn, task_batching="vmap", **kw)
    assert rel(flat(b.grads), flat(a.grads)) < 1e-10
    assert torch.allclose(a.query_loss, b.query_loss, rtol=1e-12)
    for x, y in zip(a.query_outputs, b.query_outputs):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_stacked_task_input_equals_list():
    model, tasks, loss_fn = mlp_setup()
    stacked = Task(tuple(torch.stack(z) for z in zip(*(t.support for t in tasks))),
                   tuple(torch.stack(z) for z in zip(*(t.query for t in tasks))))
    a = meta_gradient(model, tasks, loss_fn, steps=2, lr=0.05, task_batching="loop")
    for tb in ("vmap", "loop"):
        b = meta_gradient(model, stacked, loss_fn, steps=2, lr=0.05, task_batching=tb)
        assert rel(flat(b.grads), flat(a.grads)) < 1e-12


@pytest.mark.parametrize("setup", ["mlp", "conv"])
@pytest.mark.parametrize("hvp", ["double_backward", "jvp", "finite_difference"])
def test_anil_adapt_subset(setup, hvp):
    model, tasks, loss_fn = SETUPS[setup]()
    head = ["head.weight", "head.bias"]
    lr = make_lr("per_element", model, 3, adapt_names=head)
    ref, ref_lr = reference(model, tasks, loss_fn, 3, lr, adapt_names=head)
    tol = 1e-6 if hvp == "finite_difference" else 1e-10
    for tb, keep in (("loop", 0.0), ("vmap", 64.0)):
        res = meta_gradient(model, tasks, loss_fn, steps=3, lr=lr, engine="recompute", hvp=hvp, adapt=head,
                            task_batching=tb, keep_graphs_mib=keep)
        assert rel(flat(res.grads), flat(ref)) < tol
        assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < tol
        body = [n for n in ref if n not in head]
        assert rel(flat(res.grads, body), flat(ref, body)) < tol  # the body's share, through mixed terms


def test_weight_decay():
    model, tasks, loss_fn = mlp_setup()
    lr = make_lr("per_tensor", model, 3)
    ref, ref_lr = reference(model, tasks, loss_fn, 3, lr, weight_decay=0.1)
    for engine, hvp, keep in EXACT:
        res = meta_gradient(model, tasks, loss_fn, steps=3, lr=lr, engine=engine, hvp=hvp, weight_decay=0.1,
                            keep_graphs_mib=keep)
        assert rel(flat(res.grads), flat(ref)) < 1e-10
        assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-10


def test_mixed_per_step_forms_and_shared_tensor_reused():
    model, tasks, loss_fn = mlp_setup()
    lr = make_lr("per_step_mixed", model, 4)
    ref, ref_lr = reference(model, tasks, loss_fn, 4, lr)
    res = meta_gradient(model, tasks, loss_fn, steps=4, lr=lr, engine="recompute")
    assert rel(flat(res.grads), flat(ref)) < 1e-10
    assert [g is None for g in res.lr_grads] == [not isinstance(x, torch.Tensor) for x in lr]
    assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-10
    a = torch.tensor(0.04)  # one tensor serving all steps: its gradient sums the steps
    ref, ref_lr = reference(model, tasks, loss_fn, 3, [a, a, a])
    res = meta_gradient(model, tasks, loss_fn, steps=3, lr=a, engine="recompute")
    assert rel(res.lr_grads.reshape(1), ref_lr) < 1e-10


def test_transductive_batch_norm_leaves_running_stats_and_module_untouched():
    model, tasks, loss_fn = conv_setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for engine in ("unrolled", "recompute", "first_order"):
        for tb in ("loop", "vmap"):
            meta_gradient(model, tasks, loss_fn, steps=2, lr=0.1, engine=engine, task_batching=tb,
                          batch_norm="transductive")
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_transductive_batch_statistics_even_in_eval_mode():
    model, tasks, loss_fn = conv_setup()
    a = meta_gradient(model.train(), tasks, loss_fn, steps=1, lr=0.1, batch_norm="transductive")
    b = meta_gradient(model.eval(), tasks, loss_fn, steps=1, lr=0.1, batch_norm="transductive")
    assert torch.equal(flat(a.grads), flat(b.grads))
    assert a.batch_norm == b.batch_norm == "transductive"


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("tb", ["loop", "vmap"])
def test_dropout_replayed_by_recompute(tb):
    _, tasks, loss_fn = mlp_setup()
    torch.manual_seed(3)
    model = DropoutMLP().train()
    out = {}
    for engine, hvp, keep in EXACT + [("recompute", "finite_difference", 0.0)]:
        torch.manual_seed(11)
        res = meta_gradient(model, tasks, loss_fn, steps=3, lr=0.05, engine=engine, hvp=hvp, task_batching=tb,
                            keep_graphs_mib=keep)
        out[(engine, hvp, keep)] = (flat(res.grads), torch.rand(3))
    ref_g, ref_next = out[EXACT[0]]
    for key, (g, nxt) in out.items():
        tol = 1e-6 if key[1] == "finite_difference" else 1e-10
        assert rel(g, ref_g) < tol, key
        assert torch.equal(nxt, ref_next), key  # the caller's random stream is the same for every engine


def test_results_and_outputs():
    model, tasks, loss_fn = mlp_setup()
    res = meta_gradient(model, tasks, loss_fn, steps=2, lr=0.05)
    assert res.engine == "recompute" and res.task_batching == "vmap"
    assert set(res.grads) == {n for n, _ in model.named_parameters()}
    assert len(res.query_outputs) == len(tasks) and res.query_outputs[0].shape == (6, 1)
    qs = [loss_fn(o, t.query[1]) for o, t in zip(res.query_outputs, tasks)]
    assert torch.allclose(res.query_loss, torch.stack(qs).mean())
    ss = [loss_fn(model(t.support[0]), t.support[1]) for t in tasks]
    assert torch.allclose(res.support_loss, torch.stack(ss).mean())
    assert not res.query_loss.requires_grad and all(not g.requires_grad for g in res.grads.values())


def test_adapt_create_graph_matches_reference():
    model, tasks, loss_fn = mlp_setup(n_tasks=1)
    t = tasks[0]
    lr = make_lr("per_element", model, 2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    th = adapt(model, t.support, loss_fn, params=params, steps=2, lr=lr, create_graph=True)
    lq = loss_fn(torch.func.functional_call(model, th, (t.query[0],)), t.query[1])
    g = dict(zip(params, torch.autograd.grad(lq, list(params.values()))))
    ref, _ = reference(model, tasks, loss_fn, 2, lr)
    assert rel(flat(g), flat(ref)) < 1e-12
    th2 = adapt(model, t.support, loss_fn, steps=2, lr=lr)
    assert rel(flat(th2), flat({n: v.detach() for n, v in th.items()})) < 1e-14
    assert not any(v.requires_grad for v in th2.values())


def test_errors_name_the_function_and_values():
    model, tasks, loss_fn = mlp_setup()
    with pytest.raises(ValueError, match=r"meta_gradient: .*2 entries for steps=3"):
        meta_gradient(model, tasks, loss_fn, steps=3, lr=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"meta_gradient: adapt names \['nope'\]"):
        meta_gradient(model, tasks, loss_fn, adapt=["nope"])
    with pytest.raises(ValueError, match=r"meta_gradient: engine must be one of"):
        meta_gradient(model, tasks, loss_fn, engine="fast")
    with pytest.raises(ValueError, match=r"meta_gradient: lr has no step size for adapted params \['head.bias'\]"):
        meta_gradient(model, tasks, loss_fn, lr={n: torch.tensor(0.1) for n, _ in model.named_parameters()
                                                 if n != "head.bias"})
    with pytest.raises(ValueError, match=r"step_weights needs one weight per inner step: got 1 for steps=2"):
        meta_gradient(model, tasks, loss_fn, steps=2, step_weights=[1.0])
    with pytest.raises(ValueError, match=r"meta_gradient: memory_format must be one of .* got 'nhwc'"):
        meta_gradient(model, tasks, loss_fn, memory_format="nhwc")


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("engine,hvp,keep", EXACT + [("recompute", "finite_difference", 0.0),
                                                     ("first_order", "double_backward", 0.0)])
def test_memory_format_channels_last(in_channels, engine, hvp, keep):
    """Channels-last runs equal the NCHW ones and the reference (float64); every BatchNorm, ReLU and
    max-pool inside sees channels-last tensors (so no op silently falls back to NCHW, which would cost
    the speed this exists for); grads and lr grads come back in the layout of what they belong to."""
    torch.manual_seed(0)
    model = ConvNet(in_channels=in_channels, ways=3, hidden=4, image_size=8, blocks=2)
    tasks = [Task((torch.randn(6, in_channels, 8, 8), torch.arange(3).repeat(2)),
                  (torch.randn(6, in_channels, 8, 8), torch.arange(3).repeat(2))) for _ in range(2)]
    loss_fn, steps = F.cross_entropy, 3
    lr = make_lr("per_element", model, steps)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen.append(
        i[0].stride() == torch.empty_like(i[0], memory_format=torch.channels_last).stride()))
        for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d))]
    kw = dict(steps=steps, lr=lr, engine=engine, hvp=hvp, task_batching="loop", keep_graphs_mib=keep)
    res = meta_gradient(model, tasks, loss_fn, memory_format="auto", **kw)
    assert res.memory_format == "channels_last" and seen and all(seen)
    for h in hooks:
        h.remove()
    nchw = meta_gradient(model, tasks, loss_fn, memory_format="preserve", **kw)
    assert nchw.memory_format == "preserve"
    fd = hvp == "finite_difference" and engine == "recompute"
    tol = 1e-6 if fd else 1e-10
    assert rel(flat(res.grads), flat(nchw.grads)) < (1e-8 if fd else 1e-12)
    assert rel(lr_grads_flat(lr, res.lr_grads), lr_grads_flat(lr, nchw.lr_grads)) < 1e-11
    if engine != "first_order":
        ref, ref_lr = reference(model, tasks, loss_fn, steps, lr)
        assert rel(flat(res.grads), flat(ref)) < tol
        assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < tol
    for n, p in model.named_parameters():
        assert res.grads[n].stride() == p.stride(), n
        assert res.lr_grads[n].stride() == lr[n].stride(), n


class _ViewNet(nn.Module):
    """A conv net written the NCHW way: ``.view`` of a conv activation (fails in channels-last)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.conv(x)))
        return self.head(h.view(h.size(0), -1))


def test_memory_format_auto_falls_back_for_nchw_only_models():
    """auto tries channels-last, meets the model's .view, warns and runs it as given, with the same
    random numbers (dropout) a preserve run draws; an explicit channels_last request raises."""
    torch.manual_seed(0)
    model = _ViewNet()
    tasks = [Task((torch.randn(6, 3, 6, 6), torch.arange(3).repeat(2)),
                  (torch.randn(6, 3, 6, 6), torch.arange(3).repeat(2))) for _ in range(2)]
    kw = dict(steps=2, lr=0.1, task_batching="loop")
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="failed in channels-last layout"):
        res = meta_gradient(model, tasks, F.cross_entropy, **kw)
    torch.manual_seed(5)
    want = meta_gradient(model, tasks, F.cross_entropy, memory_format="preserve", **kw)
    assert res.memory_format == "preserve"
    assert rel(flat(res.grads), flat(want.grads)) == 0.0
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        meta_gradient(model, tasks, F.cross_entropy, memory_format="channels_last", **kw)


def test_memory_format_auto_choice():
    model, tasks, loss_fn = mlp_setup()
    assert meta_gradient(model, tasks, loss_fn).memory_format == "preserve"
    model, tasks, loss_fn = conv_setup()
    assert meta_gradient(model, tasks, loss_fn).memory_format == "channels_last"
    assert meta_gradient(model, tasks, loss_fn, task_batching="vmap").memory_format == "preserve"


def test_recompute_partial_graph_budget():
    """A budget holding two steps' graphs: the last two steps reuse graphs, the first three recompute."""
    from pymaml.functional.batching import make_units
    from pymaml.functional.hessian import StepGraph
    model, tasks, loss_fn = conv_setup(n_tasks=1)
    names = [n for n, _ in model.named_parameters()]
    units, _, _ = make_units(model, loss_fn, names, [], tasks, "loop")
    from pymaml.functional.buffers import batch_norm_policy
    with batch_norm_policy(model):
        nbytes = StepGraph(units[0], [p.detach() for p in model.parameters()], [], measure=True).nbytes
    assert nbytes > 0
    lr = make_lr("per_tensor", model, 5)
    ref, ref_lr = reference(model, tasks, loss_fn, 5, lr)
    res = meta_gradient(model, tasks, loss_fn, steps=5, lr=lr, keep_graphs_mib=2.5 * nbytes / 2**20)
    assert rel(flat(res.grads), flat(ref)) < 1e-10
    assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-10


@pytest.mark.parametrize("setup", ["mlp", "conv"])
@pytest.mark.parametrize("form,weighted", [("float", False), ("per_element", True), ("per_step_per_tensor", False)])
def test_linear_head_fast_path(setup, form, weighted):
    """Head-only adaptation with hvp='auto' takes the closed-form head path (features once, one body
    backward) and equals plain autograd, θ and α, with weight decay, loop and stacked tasks."""
    model, tasks, loss_fn = SETUPS[setup]()
    head = ["head.weight", "head.bias"]
    lr = make_lr(form, model, 3, adapt_names=head)
    w = [0.3, 0.5, 1.0] if weighted else None
    ref, ref_lr = reference(model, tasks, loss_fn, 3, lr, adapt_names=head, step_weights=w, weight_decay=0.01)
    for tb in ("loop", "vmap"):
        res = meta_gradient(model, tasks, loss_fn, steps=3, lr=lr, adapt=head, task_batching=tb, step_weights=w,
                            weight_decay=0.01)
        assert res.hvp == "linear_head"
        assert rel(flat(res.grads), flat(ref)) < 1e-10
        if ref_lr is not None:
            assert rel(lr_grads_flat(lr, res.lr_grads), ref_lr) < 1e-10
        gen = meta_gradient(model, tasks, loss_fn, steps=3, lr=lr, adapt=head, task_batching=tb, step_weights=w,
                            weight_decay=0.01, hvp="double_backward")
        assert torch.allclose(res.query_loss, gen.query_loss, rtol=1e-12)
        assert torch.allclose(res.support_loss, gen.support_loss, rtol=1e-12)
        for a, b in zip(res.query_outputs, gen.query_outputs):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


class ScaledHead(MLP):
    """Has features + head, but forward is not head(features(x)): the fast path must not be used."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_linear_head_fast_path_not_taken_when_forward_differs():
    _, tasks, loss_fn = mlp_setup()
    torch.manual_seed(0)
    model = ScaledHead((1, 16, 16, 1))
    head = ["head.weight", "head.bias"]
    ref, _ = reference(model, tasks, loss_fn, 2, 0.05, adapt_names=head)
    res = meta_gradient(model, tasks, loss_fn, steps=2, lr=0.05, adapt=head)
    assert res.hvp == "double_backward"
    assert rel(flat(res.grads), flat(ref)) < 1e-10
