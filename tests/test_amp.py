"""Mixed precision: torch.autocast around the meta-step, and loss scaling (GradScaler).

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the model's matmuls and convolutions run in
bfloat16 while the parameters, the learned step sizes, the meta-gradients and BatchNorm's running
statistics stay float32 (autocast casts the inputs of each op, not the tensors it is given). The
meta-gradient is compared with the float32 one: bfloat16 keeps 8 bits of mantissa (relative
rounding 2^-8 ≈ 4e-3 per op), and the tolerances below are what a few second-order steps of that
rounding give on these nets (measured: 1.6e-2 and 1.7e-2 relative), with a 3x margin.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pymaml

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    num = sum(float((x - y).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.double().norm() ** 2) for y in b) ** 0.5


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 20, 1, generator=g) * 10 - 5
    sin = (x[:, :10], torch.sin(x[:, :10]), x[:, 10:], torch.sin(x[:, 10:]))
    img = (torch.randn(4, 10, 1, 16, 16, generator=g), torch.randint(0, 5, (4, 10), generator=g),
           torch.randn(4, 10, 1, 16, 16, generator=g), torch.randint(0, 5, (4, 10), generator=g))
    return {"mlp": (mlp, F.mse_loss, sin, 5e-2), "conv_bn": (conv, F.cross_entropy, img, 5e-2)}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.parametrize("net", ["mlp", "conv_bn"])
def test_bfloat16_autocast_meta_gradient_close_to_float32(net, algorithm):
    model, loss_fn, tasks, tol = _nets()[net]
    grads, extra = {}, {}
    for name, ctx in (("f32", torch.autocast("cpu", enabled=False)),
                      ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        m = copy.deepcopy(model)
        meta = pymaml.MetaOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), algorithm, loss_fn,
                                    inner_lr=0.1, inner_steps=2)
        with ctx:
            stats = meta.step(tasks)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
        grads[name] = [p.grad for p in m.parameters()]
        extra[name] = [p.grad for p in meta.algorithm.parameters()]
        # parameters, step sizes, gradients and running statistics stay float32
        for t in [*m.parameters(), *meta.algorithm.parameters(), *grads[name], *extra[name]]:
            assert t.dtype == torch.float32
        for b in m.buffers():
            assert b.dtype in (torch.float32, torch.int64)
    assert _rel(grads["bf16"], grads["f32"]) < tol
    if algorithm == "metasgd":
        assert _rel(extra["bf16"], extra["f32"]) < tol


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("net", ["mlp", "conv_bn"])
def test_autocast_with_grad_scaler_meta_gradient_close_to_float32(net, dtype, device):
    """float16 autocast with a GradScaler (bfloat16 without one) around MetaOptimizer.step, on the
    CPU and on a GPU: the first step that is not skipped (float16 second derivatives overflow at the
    initial scale 2^16, the scaler backs off, skipped steps leave the parameters alone) gives the
    float32 meta-gradient within the bfloat16 tolerance above; parameters and gradients stay float32."""
    model, loss_fn, tasks, tol = _nets()[net]
    model, tasks = model.to(device), tuple(t.to(device) for t in tasks)
    grads = {}
    for name in ("f32", "amp"):
        m = copy.deepcopy(model)
        scaler = (torch.amp.GradScaler(device, init_scale=2.0 ** 16)
                  if name == "amp" and dtype == torch.float16 else None)
        meta = pymaml.MetaOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), "maml", loss_fn,
                                    inner_lr=0.1, inner_steps=2, scaler=scaler)
        while meta.steps_done == 0 and meta.skipped_steps < 16:
            with torch.autocast(device, dtype=dtype, enabled=name == "amp"):
                meta.step(tasks)
        assert meta.steps_done == 1
        grads[name] = [p.grad for p in m.parameters()]  # unscaled in place by the scaler
        for t in [*m.parameters(), *grads[name]]:
            assert t.dtype == torch.float32
    assert _rel(grads["amp"], grads["f32"]) < tol


# -- loss scaling: meta_gradient(loss_scale=) and MetaOptimizer(scaler=torch.amp.GradScaler) ----------

def _f64_problem():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).double()
    tasks = (torch.randn(3, 6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 6), generator=g),
             torch.randn(3, 6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 6), generator=g))
    return conv, tasks


class _Head(nn.Module):  # features + head: the closed-form head path of the engine (ANIL)
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "mamlpp", "anil", "imaml", "reptile"])
def test_loss_scale_multiplies_every_algorithms_meta_gradient(algorithm):
    """float64: the gradients with loss_scale S are S times those without (to 1e-12; S = 1000 is not a
    power of two, so this is not only exponent arithmetic); the reported losses are unscaled."""
    from pymaml.algorithms import make
    conv, tasks = _f64_problem()
    model = _Head().double() if algorithm == "anil" else conv
    settings = dict(inner_lr=0.3, inner_steps=2)
    out = {}
    for s in (1.0, 1000.0):
        algo = make(algorithm, copy.deepcopy(model), F.cross_entropy, **settings)
        out[s] = algo.meta_gradient(tasks, loss_scale=s)
    a, b = out[1.0], out[1000.0]
    assert set(a.grads) == set(b.grads) and a.grads
    assert _rel([b.grads[k] for k in a.grads], [1000.0 * a.grads[k] for k in a.grads]) < 1e-12
    assert set(a.extra_grads) == set(b.extra_grads)
    if a.extra_grads:
        assert _rel([b.extra_grads[k] for k in a.extra_grads], [1000.0 * a.extra_grads[k] for k in a.extra_grads]) < 1e-12
    assert float(b.query_loss) == pytest.approx(float(a.query_loss), rel=1e-12)
    assert float(b.support_loss) == pytest.approx(float(a.support_loss), rel=1e-12)
    if algorithm == "anil":
        assert a.info["hvp"] == "linear_head"  # the head path was the one checked


@pytest.mark.parametrize("engine,hvp", [("recompute", "double_backward"), ("recompute", "jvp"),
                                        ("unrolled", "auto"), ("first_order", "auto")])
def test_functional_loss_scale_every_engine(engine, hvp):
    from pymaml.functional import meta_gradient
    conv, tasks = _f64_problem()
    tasks = _stacked(tasks)
    kw = dict(steps=2, lr=0.3, engine=engine, hvp=hvp, step_weights=[0.3, 0.7])
    a = meta_gradient(conv, tasks, F.cross_entropy, **kw)
    b = meta_gradient(conv, tasks, F.cross_entropy, loss_scale=1000.0, **kw)
    assert _rel([b.grads[k] for k in a.grads], [1000.0 * a.grads[k] for k in a.grads]) < 1e-12
    assert float(b.meta_loss) == pytest.approx(float(a.meta_loss), rel=1e-12)
    assert float(b.query_loss) == pytest.approx(float(a.query_loss), rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan"), "2"])
def test_bad_loss_scale_is_rejected_naming_the_op(bad):
    from pymaml.functional import meta_gradient
    conv, tasks = _f64_problem()
    with pytest.raises((ValueError, TypeError), match="meta_gradient: loss_scale"):
        meta_gradient(conv, _stacked(tasks), F.cross_entropy, loss_scale=bad)


def _stacked(tasks):
    from pymaml.functional import Task
    return Task(support=tuple(tasks[:2]), query=tuple(tasks[2:]))


def _mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 10, 4, generator=g), torch.randint(0, 3, (4, 10), generator=g)
    return model, (x, y, x + 0.1, y)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_grad_scaler_steps_as_without_it(algorithm):
    """float32, scales that are powers of two: unscaling is exact, so the run with a GradScaler
    (whose scale grows during the run) is bit-identical to the run without."""
    model, tasks = _mlp_task()
    runs = {}
    for name in ("plain", "scaled"):
        m = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if name == "scaled" else None
        meta = pymaml.MetaOptimizer(m, torch.optim.Adam(m.parameters(), lr=1e-2), algorithm, F.cross_entropy,
                                    inner_lr=0.1, inner_steps=2, max_grad_norm=1.0, scaler=scaler)
        stats = [meta.step(tasks) for _ in range(5)]
        runs[name] = (m, meta, stats)
    (m1, meta1, s1), (m2, meta2, s2) = runs["plain"], runs["scaled"]
    for p, q in zip([*m1.parameters(), *meta1.algorithm.parameters()], [*m2.parameters(), *meta2.algorithm.parameters()]):
        assert torch.equal(p, q)
    assert [s["query_loss"] for s in s1] == [s["query_loss"] for s in s2]
    assert [s["loss_scale"] for s in s2] == [1024.0, 1024.0, 2048.0, 2048.0, 4096.0]  # it grew, no skip
    assert meta2.skipped_steps == 0 and meta2.steps_done == 5


def _big_loss(out, target):  # 16 × a loss of about 1: times 2^127 it overflows float32
    return 16.0 * F.cross_entropy(out, target)


def test_grad_scaler_skips_an_overflowing_step_and_backs_off():
    model, tasks = _mlp_task()
    m = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    meta = pymaml.MetaOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), "metasgd", _big_loss,
                                inner_lr=0.1 / 16, inner_steps=1, scaler=scaler)
    before = [p.detach().clone() for p in [*m.parameters(), *meta.algorithm.parameters()]]
    stats = meta.step(tasks)
    assert stats["skipped"] == 1.0 and meta.skipped_steps == 1 and meta.steps_done == 0
    assert all(torch.equal(p, b) for p, b in zip([*m.parameters(), *meta.algorithm.parameters()], before))
    assert scaler.get_scale() == 2.0 ** 126
    for _ in range(12):  # backs off until the scaled loss fits, then steps
        stats = meta.step(tasks)
    assert 1 < meta.skipped_steps < 12 and meta.steps_done == 13 - meta.skipped_steps
    assert not all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    # the scaler's state travels with the meta-optimizer's
    state = meta.state_dict()
    other = pymaml.MetaOptimizer(copy.deepcopy(model), torch.optim.SGD(m.parameters(), lr=0.1), "metasgd",
                                 _big_loss, inner_lr=0.1 / 16, inner_steps=1,
                                 scaler=torch.amp.GradScaler("cpu"))
    other.load_state_dict(state)
    assert other.scaler.get_scale() == scaler.get_scale()


def test_grad_scaler_with_raise_names_the_parameters():
    model, tasks = _mlp_task()
    meta = pymaml.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "maml", _big_loss,
                                inner_lr=0.1, inner_steps=1, nonfinite="raise",
                                scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    with pytest.raises(FloatingPointError, match=r"MetaOptimizer.step: .*'0.weight'.*loss scale"):
        meta.step(tasks)


def test_grad_scaler_arguments_are_checked():
    model, _ = _mlp_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="MetaOptimizer: scaler must be a torch.amp.GradScaler, got float"):
        pymaml.MetaOptimizer(model, opt, "maml", F.cross_entropy, scaler=1024.0)
    with pytest.raises(ValueError, match="nonfinite='allow' cannot be honoured with a GradScaler"):
        pymaml.MetaOptimizer(model, opt, "maml", F.cross_entropy, nonfinite="allow",
                             scaler=torch.amp.GradScaler("cpu"))
    # a disabled scaler is no scaler: default nonfinite is then "raise"
    meta = pymaml.MetaOptimizer(model, opt, "maml", F.cross_entropy, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert meta.scaler is None and meta.nonfinite == "raise"


def test_loss_scaling_acts_before_differentiating_float16():
    """A query loss whose gradients underflow float16 (a loss times 1e-6): under float16 autocast
    without a scale the meta-gradient loses most of its mass to underflow; with the scale (2^20)
    applied before differentiating it matches float32. Scaling afterwards could not recover it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 16, 8, generator=g), torch.randint(0, 4, (2, 16), generator=g)
    tasks = _stacked((x, y, x * 0.9, y))

    def tiny(out, target):
        return 1e-6 * F.cross_entropy(out.float(), target)

    from pymaml.functional import meta_gradient
    ref = meta_gradient(model, tasks, tiny, steps=1, lr=1e4)  # float32; lr undoes the 1e-6 in the inner step
    refg = [ref.grads[k] for k in ref.grads]
    with torch.autocast("cpu", dtype=torch.float16):
        plain = meta_gradient(model, tasks, tiny, steps=1, lr=1e4)
        scaled = meta_gradient(model, tasks, tiny, steps=1, lr=1e4, loss_scale=2.0 ** 20)
    err_plain = _rel([plain.grads[k] for k in ref.grads], refg)
    err_scaled = _rel([scaled.grads[k] / 2.0 ** 20 for k in ref.grads], refg)
    assert err_scaled < 2e-2, err_scaled
    assert err_plain > 10 * err_scaled, (err_plain, err_scaled)
