"""The ops, on both backends: against the pure-torch reference, against plain autograd (float64,
1e-10 relative), gradcheck/gradgradcheck, torch.library.opcheck, awkward inputs, and bad input."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import pymaml
from pymaml import reference as R

LOW = (torch.float16, torch.bfloat16)
# Shapes: odd sizes (unaligned vector tails), an empty tensor, one-element and 0-d tensors. The
# 278011-element tensor has its own test (test_large_odd_tensor) to keep the suite fast.
SHAPES = [(3, 4), (1031,), (0,), (5, 1, 7), (1,), ()]


def tol(dtype):
    # Both backends compute in float32 for half types and round once, so they agree to one rounding
    # step of the output dtype; float32/float64 agree to a few ulps.
    return {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
            torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}[dtype]


def rand(shapes, dtype, device, gen, positive=False, requires_grad=False):
    out = []
    for s in shapes:
        t = torch.rand(s, generator=gen, dtype=torch.float64)
        t = (t + 0.1) if positive else (2 * t - 1)
        out.append(t.to(device=device, dtype=dtype).requires_grad_(requires_grad))
    return out


def lr_forms(shapes, dtype, device, gen):
    """Every α form: float, shared 0-d tensor, per-tensor list, per-element list, a mix."""
    per_tensor = [torch.rand((1,), generator=gen, dtype=torch.float64).to(device, dtype) for _ in shapes]
    per_elem = rand(shapes, dtype, device, gen, positive=True)
    mixed = [a if i % 2 else b for i, (a, b) in enumerate(zip(per_tensor, per_elem))]
    return {"float": 0.05, "shared": torch.tensor(0.07, dtype=dtype, device=device),
            "per_tensor": per_tensor, "per_element": per_elem, "mixed": mixed}


def close(a, b, **kw):
    if a is None or b is None:
        assert a is None and b is None
        return
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **kw)
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        close(x, y, **kw)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("form", ["float", "shared", "per_tensor", "per_element", "mixed"])
def test_update_matches_reference(backend, device, dtype, gen, form):
    p = rand(SHAPES, dtype, device, gen)
    g = rand(SHAPES, dtype, device, gen)
    lr = lr_forms(SHAPES, dtype, device, gen)[form]
    for wd in (0.0, 0.01):
        out = backend.sgd_update(p, g, lr, weight_decay=wd)
        close(out, R.sgd_update(p, g, lr, wd), **tol(dtype))
        assert all(o.dtype == x.dtype and o.shape == x.shape for o, x in zip(out, p))
        q = [t.clone() for t in p]
        backend.sgd_update_(q, g, lr, weight_decay=wd)
        close(q, out, **tol(dtype))


@pytest.mark.parametrize("form", ["float", "shared", "per_tensor", "per_element", "mixed"])
@pytest.mark.parametrize("next_form", [None, "float", "shared", "per_element"])
def test_backward_step_matches_reference(backend, device, dtype, gen, form, next_form):
    v, h, g = (rand(SHAPES, dtype, device, gen) for _ in range(3))
    forms = lr_forms(SHAPES, dtype, device, gen)
    nxt = None if next_form is None else forms[next_form]
    got = backend.backward_step(v, h, g, forms[form], nxt)
    want = R.backward_step(v, h, g, forms[form], nxt)
    kw = tol(dtype)
    if form in ("shared", "per_tensor", "mixed"):  # sums over ~1000 elements: looser for low precision
        kw = dict(atol=max(kw["atol"], 1e-3) * (100 if dtype in LOW else 1), rtol=kw["rtol"] * (10 if dtype in LOW else 1))
    close(got[0], want[0], **tol(dtype))
    close(got[2], want[2], **tol(dtype))
    close(got[1], want[1], **kw)


def test_fd_and_norm_match_reference(backend, device, dtype, gen):
    p, u = rand(SHAPES, dtype, device, gen), rand(SHAPES, dtype, device, gen)
    for eps in (1e-3, torch.tensor(2e-3, device=device)):
        close(backend.fd_perturb(p, u, eps), R.fd_perturb(p, u, eps), **tol(dtype))
        close(backend.fd_quotient(p, u, eps), R.fd_quotient(p, u, eps),
              **(tol(dtype) if dtype not in LOW else dict(atol=5, rtol=1e-2)))
    n = backend.global_norm(p)
    assert n.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and n.shape == ()
    close(n, R.global_norm(p), rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    a, b = [t.clone() for t in p], [t.clone() for t in p]
    close(backend.clip_grad_norm_(a, 1.0), R.clip_grad_norm_(b, 1.0), rtol=1e-5, atol=0)
    close(a, b, **tol(dtype))


def test_clip_grad_norm_propagates_nan_and_inf(backend, device):
    # clamp(max=1) keeps a NaN scale: a NaN norm must reach every tensor, as in the reference.
    for bad in (float("nan"), float("inf")):
        a = [torch.tensor([1.0, bad], device=device), torch.tensor([3.0, 4.0], device=device)]
        b = [t.clone() for t in a]
        n_got, n_want = backend.clip_grad_norm_(a, 1.0), R.clip_grad_norm_(b, 1.0)
        torch.testing.assert_close(n_got, n_want, equal_nan=True)
        torch.testing.assert_close(a, b, equal_nan=True)
        assert torch.isnan(a[1]).all() == torch.isnan(b[1]).all()


# --------------------------------------------------------------------------- against plain autograd
def test_update_and_step_vs_autograd_float64(backend, device, gen):
    """θ' = θ − α ⊙ (g + wd θ) and one adjoint step, differentiated by plain autograd: 1e-10 rel."""
    shapes = [(4, 3), (5,), (2, 2, 2)]
    dt = torch.float64
    for form in ("shared", "per_tensor", "per_element"):
        p = rand(shapes, dt, device, gen, requires_grad=True)
        g = rand(shapes, dt, device, gen, requires_grad=True)
        lr = lr_forms(shapes, dt, device, gen)[form]
        lr = lr.clone().requires_grad_() if isinstance(lr, torch.Tensor) else [a.clone().requires_grad_() for a in lr]
        w = rand(shapes, dt, device, gen)
        out = backend.sgd_update(p, g, lr, weight_decay=0.1)
        alphas = [lr] * len(p) if isinstance(lr, torch.Tensor) else lr
        plain = [pi - a * (gi + 0.1 * pi) for pi, gi, a in zip(p, g, alphas)]
        for o, q in zip(out, plain):
            torch.testing.assert_close(o, q, rtol=1e-10, atol=0)
        leaves = p + g + ([lr] if isinstance(lr, torch.Tensor) else lr)
        got = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w)), leaves)
        want = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(plain, w)), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # backward step: v − hvp, −g ⊙ v reduced, α_next ⊙ (v − hvp), against hand-written torch
    v, h, g = (rand(shapes, dt, device, gen) for _ in range(3))
    lr = [torch.tensor([0.3], dtype=dt, device=device), *rand(shapes[1:], dt, device, gen, positive=True)]
    nlr = rand(shapes, dt, device, gen, positive=True)
    vo, lg, un = backend.backward_step(v, h, g, lr, nlr)
    for i in range(len(v)):
        torch.testing.assert_close(vo[i], v[i] - h[i], rtol=1e-10, atol=0)
        torch.testing.assert_close(un[i], nlr[i] * (v[i] - h[i]), rtol=1e-10, atol=0)
        want = -(g[i] * v[i])
        torch.testing.assert_close(lg[i], want.sum().reshape(1) if i == 0 else want, rtol=1e-10, atol=1e-15)


def _gc_inputs(device, gen, n_lr_elem=True):
    shapes = [(3, 2), (4,)]
    dt = torch.float64
    p = rand(shapes, dt, device, gen, requires_grad=True)
    g = rand(shapes, dt, device, gen, requires_grad=True)
    lrs = [torch.rand((1,), generator=gen, dtype=dt).to(device).requires_grad_(),
           rand([(4,)], dt, device, gen, positive=True, requires_grad=True)[0]]
    return p, g, lrs


def test_gradcheck_and_gradgradcheck(backend, device, gen):
    p, g, lrs = _gc_inputs(device, gen)
    n = len(p)
    shared = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    eps_t = torch.tensor(0.01, dtype=torch.float64, device=device, requires_grad=True)
    cases = {
        "sgd_update/list": (lambda *a: tuple(backend.sgd_update(list(a[:n]), list(a[n:2 * n]), list(a[2 * n:]), 0.1)),
                            (*p, *g, *lrs)),
        "sgd_update/shared": (lambda *a: tuple(backend.sgd_update(list(a[:n]), list(a[n:2 * n]), a[2 * n])),
                              (*p, *g, shared)),
        "sgd_update/float": (lambda *a: tuple(backend.sgd_update(list(a[:n]), list(a[n:]), 0.2, 0.05)), (*p, *g)),
        "backward_step": (lambda *a: (lambda r: (*r[0], *r[1], *r[2]))(
            backend.backward_step(list(a[:n]), list(a[n:2 * n]), list(a[2 * n:3 * n]), lrs, list(a[3 * n:]))),
            (*p, *g, *[t.detach().clone().requires_grad_() for t in p], *lrs)),
        "fd_perturb": (lambda *a: (lambda r: (*r[0], *r[1]))(backend.fd_perturb(list(a[:n]), list(a[n:2 * n]), a[2 * n])),
                       (*p, *g, eps_t)),
        "fd_quotient": (lambda *a: tuple(backend.fd_quotient(list(a[:n]), list(a[n:2 * n]), a[2 * n])), (*p, *g, eps_t)),
        "global_norm": (lambda *a: backend.global_norm(list(a)), (*p,)),
    }
    for name, (f, inputs) in cases.items():
        assert gradcheck(f, inputs), name
        assert gradgradcheck(f, inputs), name


def test_opcheck_every_op(device, gen):
    if pymaml.backend() != "compiled":
        pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    ops = torch.ops.pymaml
    dt = torch.float64
    shapes = [(3, 2), (0,), (5,)]
    p, g = rand(shapes, dt, device, gen), rand(shapes, dt, device, gen)
    lrs = [torch.tensor([0.1], dtype=dt, device=device), torch.rand(0, dtype=dt, device=device),
           rand([(5,)], dt, device, gen, positive=True)[0]]
    rg = lambda ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    one = torch.ones((), dtype=dt, device=device)
    samples = [
        (ops.sgd_update.default, (rg(p), rg(g), 0.1, 0.01)),
        (ops.sgd_update_lrs.default, (rg(p), rg(g), rg(lrs), 0.01)),
        (ops.sgd_update_lrs.default, (p, g, [torch.tensor(0.2, dtype=dt, device=device)], 0.0)),
        (ops.sgd_update_.default, ([t.clone() for t in p], g, 0.1, 0.01)),
        (ops.sgd_update_lrs_.default, ([t.clone() for t in p], g, lrs, 0.0)),
        (ops.backward_step.default, (rg(p), rg(g), rg(p), lrs, rg(lrs), 0.0, True)),
        (ops.backward_step.default, (p, g, p, [], [], 0.5, True)),
        (ops.backward_step.default, (p, g, p, [one], [], 0.0, False)),
        (ops.fd_perturb.default, (rg(p), rg(g), 1e-3, one.clone().requires_grad_())),
        (ops.fd_quotient.default, (rg(p), rg(g), 1e-3, one.clone().requires_grad_())),
        (ops.global_norm.default, (rg(p),)),
        (ops.clip_grad_norm_.default, ([t.clone() for t in p], 0.5, 1e-6)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- awkward inputs
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_large_odd_tensor(backend, device, gen, dt):
    p, g = rand([(278011,), (3,)], dt, device, gen), rand([(278011,), (3,)], dt, device, gen)
    lr = rand([(278011,), (3,)], dt, device, gen, positive=True)
    close(backend.sgd_update(p, g, lr), R.sgd_update(p, g, lr), **tol(dt))
    got, want = backend.backward_step(p, g, g, [a[:1] for a in lr], lr), R.backward_step(p, g, g, [a[:1] for a in lr], lr)
    close(got[0], want[0], **tol(dt))
    close(got[2], want[2], **tol(dt))
    close(got[1], want[1], rtol=1e-4 if dt == torch.float32 else 2e-2, atol=1e-3)
    torch.testing.assert_close(backend.global_norm(p), R.global_norm(p), rtol=1e-5, atol=0)


def test_many_small_tensors_noncontiguous_and_mixed_dtypes(backend, device, gen):
    # 200 small tensors: more than one CUDA launch's table holds; every dtype in one list.
    dts = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    p = [torch.randn(7 + i % 5, generator=gen).to(device, dts[i % 4]) for i in range(200)]
    g = [torch.randn(t.shape, generator=gen).to(device, t.dtype) for t in p]
    lr = [torch.rand(t.shape, generator=gen).to(device, t.dtype) for t in p]
    close(backend.sgd_update(p, g, lr), R.sgd_update(p, g, lr), atol=2e-2, rtol=2e-2)
    # non-contiguous views: transposed and strided; in place writes through to the base tensor
    base = torch.randn(6, 8, generator=gen, dtype=torch.float64).to(device)
    views = [base.t(), base[:, ::2]]
    grads = [torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device) for v in views]
    want = R.sgd_update(views, grads, 0.1)
    close(backend.sgd_update(views, grads, 0.1), want, rtol=1e-12, atol=0)
    b2 = base.clone()
    backend.sgd_update_([b2.t()], [grads[0]], 0.1)
    close(b2.t(), want[0], rtol=1e-12, atol=0)
    vo, lg, un = backend.backward_step(views, grads, grads, [torch.rand(v.shape, dtype=torch.float64, device=device) for v in views], 0.5)
    close(vo, [v - g_ for v, g_ in zip(views, grads)], rtol=1e-12, atol=0)


def _layouts(gen, device):
    """Conv-weight-shaped float64 tensors in the layouts a channels_last model produces."""
    cl = torch.channels_last

    def t(shape, fmt):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        if fmt == "cl":
            return x.contiguous(memory_format=cl)
        if fmt == "slice":  # not dense: every other output channel of a channels_last tensor
            return torch.randn((2 * shape[0],) + shape[1:], generator=gen, dtype=torch.float64).to(
                device).contiguous(memory_format=cl)[::2]
        return x
    return t


@pytest.mark.parametrize("p_fmt,g_fmt", [("cl", "cl"), ("cl", "nchw"), ("nchw", "cl"), ("slice", "cl")])
def test_layouts_channels_last_and_mixed(backend, device, gen, p_fmt, g_fmt):
    # Values agree with the reference whatever the strides; the CPU kernels return tensors laid out
    # like the first operand (torch.empty_like's rule: a channels_last list stays channels_last), CUDA
    # kernels contiguous ones; the reference (torch ops) keeps channels_last when all operands have it.
    t = _layouts(gen, device)
    shapes = [(6, 3, 3, 3), (4, 5, 2, 3)]
    p, g, v = [t(s, p_fmt) for s in shapes], [t(s, g_fmt) for s in shapes], [t(s, g_fmt) for s in shapes]
    lr = [t(s, g_fmt).abs() for s in shapes]
    dense = [x.contiguous() for x in p]

    def layout_ok(outs, like):
        for o, x in zip(outs, like):
            if backend is pymaml.ops and device.type == "cpu":
                assert o.stride() == torch.empty_like(x).stride(), (o.stride(), x.stride())
            elif backend is pymaml.ops:
                assert o.is_contiguous()
            elif p_fmt == g_fmt == "cl":
                assert o.is_contiguous(memory_format=torch.channels_last)

    for alpha in (0.1, lr):
        out = backend.sgd_update(p, g, alpha, weight_decay=0.01)
        close(out, R.sgd_update(dense, g, alpha, 0.01), rtol=1e-12, atol=1e-15)
        layout_ok(out, p)
        q = [x.clone() for x in p]
        backend.sgd_update_(q, g, alpha, weight_decay=0.01)
        close(q, out, rtol=1e-12, atol=1e-15)
    got = backend.backward_step(p, g, v, lr, lr)
    want = R.backward_step(dense, g, v, lr, lr)
    for a, b in zip(got, want):
        close(a, b, rtol=1e-12, atol=1e-14)
    layout_ok(got[0], p)
    layout_ok(got[2], p)
    plus, minus = backend.fd_perturb(p, g, 1e-3)
    close((plus, minus), R.fd_perturb(dense, g, 1e-3), rtol=1e-12, atol=1e-15)
    layout_ok(plus, p)
    quo = backend.fd_quotient(p, g, 1e-3)
    close(quo, R.fd_quotient(dense, g, 1e-3), rtol=1e-12, atol=1e-12)
    layout_ok(quo, p)
    if backend is pymaml.ops:
        ops = torch.ops.pymaml
        rg = lambda ts: [x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for x in ts]  # noqa: E731
        for op, args in [(ops.sgd_update.default, (rg(p), rg(g), 0.1, 0.01)),
                         (ops.sgd_update_lrs.default, (rg(p), rg(g), rg(lr), 0.0)),
                         (ops.backward_step.default, (rg(p), rg(g), rg(v), lr, rg(lr), 0.0, True)),
                         (ops.fd_perturb.default, (rg(p), rg(g), 1e-3, torch.ones((), dtype=torch.float64,
                                                                                  device=device)))]:
            torch.library.opcheck(op, args)


def test_empty_inputs(backend, device):
    e = [torch.empty(0, device=device), torch.empty(2, 0, device=device)]
    assert [t.shape for t in backend.sgd_update(e, e, 0.1)] == [t.shape for t in e]
    assert backend.sgd_update([], [], 0.1) == []
    vo, lg, un = backend.backward_step(e, e, e, [torch.ones(1, device=device)] * 2, 0.5)
    assert [t.shape for t in vo + un] == [t.shape for t in e + e] and all(float(x) == 0 for x in lg)


def test_mixed_devices_grouped(backend, gen):
    """Lists mixing devices are grouped, never rejected ('meta' stands in for a second device)."""
    p = [torch.randn(3, generator=gen), torch.randn(4, device="meta"), torch.randn(2, generator=gen)]
    g = [torch.ones(3), torch.ones(4, device="meta"), torch.ones(2)]
    out = backend.sgd_update(p, g, [torch.full((1,), 0.5), torch.ones(1, device="meta"), torch.full((2,), 0.25)])
    assert [o.device.type for o in out] == ["cpu", "meta", "cpu"]
    torch.testing.assert_close(out[0], p[0] - 0.5)
    torch.testing.assert_close(out[2], p[2] - 0.25)


# --------------------------------------------------------------------------- bad input
BAD = [
    (lambda m: m.sgd_update([torch.ones(2)] * 3, [torch.ones(2)] * 2, 0.1),
     ValueError, "sgd_update: params and grads differ in length: 3 vs 2"),
    (lambda m: m.sgd_update([torch.ones(2, 3)], [torch.ones(3, 2)], 0.1),
     ValueError, r"sgd_update: params\[0\] and grads\[0\] differ in shape: \(2, 3\) vs \(3, 2\)"),
    (lambda m: m.sgd_update([torch.ones(2, dtype=torch.int64)], [torch.ones(2, dtype=torch.int64)], 0.1),
     TypeError, r"sgd_update: params\[0\] has dtype torch.int64"),
    (lambda m: m.sgd_update([torch.ones(2)], [torch.ones(2, device="meta")], 0.1),
     ValueError, r"sgd_update: params\[0\] is on cpu but grads\[0\] is on meta"),
    (lambda m: m.sgd_update([torch.ones(2)] * 2, [torch.ones(2)] * 2, [torch.ones(1)] * 3),
     ValueError, "sgd_update: lr has 3 entries but there are 2 params"),
    (lambda m: m.sgd_update([torch.ones(2)], [torch.ones(2)], [torch.ones(3)]),
     ValueError, r"sgd_update: lr\[0\] has shape \(3,\); expected one number or the shape of params\[0\], \(2,\)"),
    (lambda m: m.sgd_update([torch.ones(2)], [torch.ones(2)], torch.ones(2)),
     ValueError, r"sgd_update: a single Tensor lr must hold one number, got shape \(2,\)"),
    (lambda m: m.backward_step([torch.ones(2)] * 2, [torch.ones(2)], [torch.ones(2)] * 2, 0.1),
     ValueError, "backward_step: v and hvp differ in length: 2 vs 1"),
    (lambda m: m.backward_step([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], 0.1, [torch.ones(1)] * 2),
     ValueError, "backward_step: next_lr has 2 entries but there are 1 params"),
    (lambda m: m.fd_perturb([torch.ones(2)], [torch.ones(2, dtype=torch.float64)], 1e-3),
     TypeError, r"fd_perturb: params\[0\] has dtype torch.float32 but direction\[0\] has dtype torch.float64"),
    (lambda m: m.fd_quotient([torch.ones(2)], [torch.ones(2)], 0.0), ValueError, "fd_quotient: eps must be non-zero, got 0.0"),
    (lambda m: m.global_norm([]), ValueError, "global_norm: tensors is empty"),
    (lambda m: m.sgd_update(torch.ones(2), [torch.ones(2)], 0.1), TypeError, "sgd_update: params must be a list"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_names_op_and_values(backend, i):
    call, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg):
        call(backend)


def test_in_place_refuses_grad(backend):
    p = [torch.ones(2, requires_grad=True)]
    with pytest.raises(RuntimeError, match="sgd_update_: params require grad"):
        backend.sgd_update_(p, [torch.ones(2)], 0.1)
    with torch.no_grad():
        backend.sgd_update_(p, [torch.ones(2)], 0.5)
    torch.testing.assert_close(p[0].detach(), torch.full((2,), 0.5))


def test_backend_report():
    assert pymaml.backend() in ("compiled", "torch")
    assert isinstance(pymaml.backend_reason(), str) and pymaml.backend_reason()
