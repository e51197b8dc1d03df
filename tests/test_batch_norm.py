"""pymaml.ops.batch_norm (ops pymaml::batch_norm, batch_norm_backward, batch_norm_double_backward) against
plain autograd through F.batch_norm, on the compiled path and the pure-torch path."""
import pytest
import torch
import torch.nn.functional as F

import pymaml
import pymaml.ops._dispatch
from pymaml import ops as pops
from pymaml.reference import batchnorm as reference_bn
from pymaml.functional.buffers import primitive_batch_norm

from conftest import DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_COMPILED = pymaml._backend.compiled_available("batch_norm_double_backward", "cpu")
SHAPES = [(6, 3), (4, 3, 7), (3, 4, 5, 6), (2, 3, 2, 3, 4)]
EPS = 1e-5


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    if request.param == "compiled":
        if not HAS_COMPILED:
            pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    else:
        monkeypatch.setattr(pymaml.ops._dispatch, "COMPILED", False)
    return request.param


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def inputs(shape, dtype=torch.float64, device="cpu", affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(device, dtype).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if affine else None
    return x, w, b


def native(x, w, b):
    return F.batch_norm(x, None, None, w, b, True, 0.0, EPS)


def derivatives(fn, x, w, b, seed=1):
    """y, the first derivatives along a random gy, the second along random directions (x and w)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    ins = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    first = torch.autograd.grad(y, ins, rnd(y), create_graph=True)
    grad_ins = [t for t in (x, w) if t is not None]
    n = len(grad_ins)
    second = torch.autograd.grad(first[:n], grad_ins, [rnd(t) for t in first[:n]])
    return [y, *first, *second]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_first_and_second_derivatives_equal_autograd_float64(path, shape, affine, device):
    x, w, b = inputs(shape, affine=affine, device=device)
    want = derivatives(native, x, w, b)
    got = derivatives(pops.batch_norm, x, w, b)
    for a, e in zip(got, want):
        assert rel(a, e) < 1e-10


def test_gradcheck_and_gradgradcheck(path):
    x, w, b = inputs((3, 2, 2, 3))
    f = lambda x, w, b: pops.batch_norm(x, w, b, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_third_derivative_equals_primitive_ops(path):
    """The double backward's own autograd (recomputing the statistics from x) against a BatchNorm
    written from primitive ops, differentiated three times by autograd."""
    x, w, b = inputs((4, 3, 5))
    outs = []
    for fn in (pops.batch_norm, primitive_batch_norm):
        y = fn(x, w, b, EPS)
        g = torch.autograd.grad((y ** 3).sum(), (x, w), create_graph=True)
        h = torch.autograd.grad(g[0].square().sum() + g[1].square().sum(), (x, w), create_graph=True)
        outs.append(torch.autograd.grad(h[0].square().sum(), (x, w)))
    for a, e in zip(*outs):
        assert rel(a, e) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lower_precision_matches_float64(path, dtype):
    x, w, b = inputs((8, 4, 6, 6), dtype=dtype)
    want = derivatives(native, *(t.detach().double().requires_grad_() for t in (x, w, b)))
    got = derivatives(pops.batch_norm, x, w, b)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert rel(a, e) < tol


def test_non_contiguous_input(path):
    x, w, b = inputs((3, 4, 5, 6))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert not xc.is_contiguous()
    want = derivatives(native, x, w, b)
    got = derivatives(pops.batch_norm, xc, w, b)
    for a, e in zip(got, want):
        assert rel(a, e) < 1e-10


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("gg", ["all", "x_only", "params_only", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_op_equals_twin(gg, dtype, affine, device):
    """The fused CPU kernel (CUDA: the ATen composite) against the pure-torch formulas, every
    combination of absent cotangents."""
    x, w, b = (t.detach() if t is not None else None
               for t in inputs((5, 3, 4, 7), dtype=dtype, affine=affine, device=device))
    _, mean, invstd = reference_bn.batch_norm(x, w, b, EPS)
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    gy = rnd(*x.shape)
    gg_x = rnd(*x.shape) if gg in ("all", "x_only") else None
    gg_w = rnd(3) if gg in ("all", "params_only") else None
    gg_b = rnd(3) if gg in ("all", "params_only") else None
    got = torch.ops.pymaml.batch_norm_double_backward(gy, x, w, mean, invstd, EPS, gg_x, gg_w, gg_b)
    want = reference_bn.batch_norm_double_backward(gy, x, w, mean, invstd, EPS, gg_x, gg_w, gg_b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.shape == e.shape
        if e.abs().max() > 0:
            assert rel(a, e) < tol
        else:
            assert a.abs().max() < 1e-6


def _channels_last(t):
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt), fmt


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("shape", [(5, 3, 4, 7), (9, 17, 15, 16), (2, 3, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("others", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_op_channels_last(shape, others, dtype, device):
    """A channels-last x (the fused CPU kernel's [N·S, C] path; several row blocks for the larger
    shape, an odd channel count for the vector tail) equals the twin on contiguous copies, and both
    outputs come back channels-last; grad_y and gg_x in the other layout are read correctly."""
    x, w, _ = (t.detach() for t in inputs(shape, dtype=dtype, device=device))
    _, mean, invstd = reference_bn.batch_norm(x, w, None, EPS)
    g = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    gy, gg_x, gg_w, gg_b = rnd(*shape), rnd(*shape), rnd(shape[1]), rnd(shape[1])
    want = reference_bn.batch_norm_double_backward(gy, x, w, mean, invstd, EPS, gg_x, gg_w, gg_b)
    xc, fmt = _channels_last(x)
    if others == "channels_last":
        gy, gg_x = _channels_last(gy)[0], _channels_last(gg_x)[0]
    got = torch.ops.pymaml.batch_norm_double_backward(gy, xc, w, mean, invstd, EPS, gg_x, gg_w, gg_b)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert rel(a, e) < tol
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    ys = pops.batch_norm(xc, w, None, EPS)
    assert ys.is_contiguous(memory_format=fmt)


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(affine, channels_last):
    x, w, b = inputs((4, 3, 5, 6) if channels_last else (4, 3, 5), affine=affine)
    if channels_last:  # the fake kernels must give the real outputs' strides
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ops = torch.ops.pymaml
    torch.library.opcheck(ops.batch_norm.default, (x, w, b, EPS))
    _, mean, invstd = ops.batch_norm(x.detach(), w, b, EPS)
    gy = torch.randn_like(x).requires_grad_()
    torch.library.opcheck(ops.batch_norm_backward.default, (gy, x, w, mean, invstd, EPS))
    gg = torch.randn_like(x).requires_grad_()
    gw = torch.randn(3, dtype=x.dtype).requires_grad_()
    torch.library.opcheck(ops.batch_norm_double_backward.default,
                          (gy, x, w, mean, invstd, EPS, gg, gw, None))
    torch.library.opcheck(ops.batch_norm_double_backward.default,
                          (gy.detach(), x.detach(), w, mean, invstd, EPS, None, None, None))


@pytest.mark.parametrize("desc,args,exc,words", [
    ("1-D x", lambda: (torch.randn(5), None, None), ValueError, ["batch_norm", "[5]"]),
    ("one value per channel", lambda: (torch.randn(1, 3), None, None), ValueError,
     ["batch_norm", "more than 1 value per channel", "[1, 3]"]),
    ("weight shape", lambda: (torch.randn(4, 3, 2), torch.randn(4), None), ValueError,
     ["batch_norm", "weight", "[3]", "[4]"]),
    ("bias shape", lambda: (torch.randn(4, 3, 2), None, torch.randn(2)), ValueError, ["batch_norm", "bias", "[2]"]),
    ("integer x", lambda: (torch.ones(4, 3, dtype=torch.int64), None, None), TypeError, ["batch_norm", "int64"]),
])
def test_bad_inputs_name_op_and_values(path, desc, args, exc, words):
    with pytest.raises(exc) as e:
        pops.batch_norm(*args())
    for w in words:
        assert w in str(e.value), (desc, str(e.value))


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
def test_compiled_ops_check_on_their_own():
    ops = torch.ops.pymaml
    with pytest.raises(ValueError, match=r"batch_norm: weight must have shape \[3\]"):
        ops.batch_norm(torch.randn(4, 3, 2), torch.randn(4), None, EPS)
    x = torch.randn(4, 3, 2)
    _, m, s = ops.batch_norm(x, None, None, EPS)
    with pytest.raises(ValueError, match=r"batch_norm_double_backward: gg_x has shape \[4, 3\]"):
        ops.batch_norm_double_backward(x, x, None, m, s, EPS, torch.randn(4, 3), None, None)
    with pytest.raises(ValueError, match=r"batch_norm_double_backward: gg_weight must have shape \[3\], got \[2\]"):
        ops.batch_norm_double_backward(x, x, None, m, s, EPS, None, torch.randn(2), None)
    with pytest.raises(ValueError, match=r"batch_norm_backward: mean must have shape \[3\]"):
        ops.batch_norm_backward(x, x, None, m[:2], s, EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_conv_meta_gradient_uses_it_and_matches_native(path, device):
    """The BatchNorm policy routes conv nets through pymaml.batch_norm; the exact meta-gradient equals
    plain autograd through F.batch_norm (float64)."""
    from pymaml.functional import meta_gradient
    from pymaml.models import ConvNet
    torch.manual_seed(0)
    model = ConvNet(1, 3, 4, 16).double().to(device)
    calls = []
    orig = pops.batch_norm

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    from pymaml.functional import buffers
    mp = pytest.MonkeyPatch()
    mp.setattr(buffers, "_fused_batch_norm", spy)
    try:
        x = torch.randn(6, 1, 16, 16, dtype=torch.float64, device=device)
        y = torch.arange(3, device=device).repeat(2)
        task = ((x, y), (x.flip(0), y.flip(0)))
        res = meta_gradient(model, [task], F.cross_entropy, steps=2, lr=0.1, engine="recompute", hvp="double_backward",
                            task_batching="loop", keep_graphs_mib=0)
    finally:
        mp.undo()
    assert calls
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    free = ConvNet(1, 3, 4, 16).double().to(device)
    for m in free.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    fast = dict(theta)
    for _ in range(2):
        loss = F.cross_entropy(torch.func.functional_call(free, fast, (x,)), y)
        g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: t - 0.1 * gi for (n, t), gi in zip(fast.items(), g)}
    lq = F.cross_entropy(torch.func.functional_call(free, fast, (x.flip(0),)), y.flip(0))
    want = torch.autograd.grad(lq, list(theta.values()))
    for (n, a), e in zip(res.grads.items(), want):
        assert rel(a, e) < 1e-10 or (e.abs().max() < 1e-12 and a.abs().max() < 1e-10), n
