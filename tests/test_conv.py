"""pymaml::convolution / convolution_backward (compiled, autograd in C++) and their pure-torch twin
pymaml.reference.conv.ConvolutionFn, against plain autograd through F.conv2d in float64: values,
first, second and third derivatives, gradcheck/gradgradcheck, opcheck; and the learners' use of it."""
import os

import pytest
import torch
import torch.nn.functional as F

import pymaml
from pymaml.reference.conv import ConvolutionFn

from conftest import DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_COMPILED = pymaml._backend.compiled_available("convolution", "cpu")

# (x shape, weight shape, bias, stride, padding, dilation, groups)
CASES = [
    ((3, 4, 9, 8), (5, 4, 3, 3), True, (1, 1), (1, 1), (1, 1), 1),
    ((2, 4, 9, 8), (6, 4, 3, 3), True, (2, 2), (1, 1), (1, 1), 1),
    ((2, 4, 10, 7), (6, 2, 3, 2), False, (2, 1), (0, 1), (1, 1), 2),
    ((2, 3, 11, 9), (4, 3, 3, 3), True, (1, 2), (2, 1), (2, 1), 1),
    ((2, 1, 12, 12), (4, 1, 3, 3), True, (2, 2), (1, 1), (1, 1), 1),
]


@pytest.fixture(params=["compiled", "compiled-gemm", "torch"])
def conv(request):
    """The op three ways: compiled with torch's gradient kernels everywhere (PYMAML_CONV_GEMM=0),
    compiled with the buffer products wherever they apply (=1), and the pure-torch twin."""
    if request.param.startswith("compiled"):
        if not HAS_COMPILED:
            pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
        old = torch.ops.pymaml_testing.conv_gemm_mode("1" if request.param == "compiled-gemm" else "0")
        request.addfinalizer(lambda: torch.ops.pymaml_testing.conv_gemm_mode(old))
        return torch.ops.pymaml.convolution
    return ConvolutionFn.apply


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(case, device="cpu", channels_last=False, seed=0):
    xs, ws, bias, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(ws, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(ws[0], generator=g, dtype=torch.float64).to(device).requires_grad_() if bias else None
    return x, w, b, (list(stride), list(padding), list(dilation), groups)


def derivatives(fn, x, w, b, seed=1):
    """y; first derivatives along a random gy (graph kept); second derivatives of a nonlinear
    function of the first (graph kept); third derivatives of a function of the second."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)  # noqa: E731
    ins = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    first = torch.autograd.grad(y, ins, rnd(y), create_graph=True)
    s = sum(((f * rnd(f)).sum() + (f * f).sum()) for f in first)  # cotangents on gx, gw and gb
    second = torch.autograd.grad(s, ins, create_graph=True, allow_unused=True, materialize_grads=True)
    third = torch.autograd.grad(sum((t * t * rnd(t)).sum() for t in second), ins, allow_unused=True,
                                materialize_grads=True)
    return [y, *first, *second, *third]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_derivatives_of_every_order_equal_autograd_float64(conv, case, channels_last, device):
    x, w, b, p = make(case, device, channels_last)
    want = derivatives(lambda x, w, b: F.conv2d(x, w, b, *p), x, w, b)
    got = derivatives(lambda x, w, b: conv(x, w, b, *p), x, w, b)
    assert len(got) == len(want)
    for k, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape
        assert rel(a, e) < 1e-12, k
    # the value is torch's own kernel, and so are the first derivatives unless the buffer products
    # compute them: equal bit for bit on the CPU (cuDNN may choose another algorithm between calls)
    if device == "cpu":
        exact = 1 if HAS_COMPILED and torch.ops.pymaml_testing.conv_gemm_mode() == "1" else 1 + len(got) // 4
        for a, e in zip(got[:exact], want):
            assert torch.equal(a, e)


@pytest.mark.parametrize("case", CASES[1:3])
def test_gradcheck_and_gradgradcheck(conv, case):
    x, w, b, p = make(case)
    ins = tuple(t for t in (x, w, b) if t is not None)
    f = (lambda x, w, b: conv(x, w, b, *p)) if b is not None else (lambda x, w: conv(x, w, None, *p))
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


def test_input_that_needs_no_grad_gets_none(conv):
    """The first layer of a net: only the weight and bias get gradients, at every order."""
    x, w, b, p = make(CASES[4])
    x = x.detach()
    gw, gb = torch.autograd.grad(conv(x, w, b, *p).square().sum(), (w, b), create_graph=True)
    ggw = torch.autograd.grad(gw.square().sum() + gb.sum(), (w,))[0]
    y = F.conv2d(x, w, b, *p)
    fw, fb = torch.autograd.grad(y.square().sum(), (w, b), create_graph=True)
    want = torch.autograd.grad(fw.square().sum() + fb.sum(), (w,))[0]
    assert rel(ggw, want) < 1e-12


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x, w, b, p = make(CASES[1], channels_last=channels_last)
    ops = torch.ops.pymaml
    torch.library.opcheck(ops.convolution.default, (x, w, b, *p))
    torch.library.opcheck(ops.convolution.default, (x.detach(), w, None, *p))
    gy = torch.randn_like(F.conv2d(x, w, b, *p)).requires_grad_()
    torch.library.opcheck(ops.convolution_backward.default, (gy, x, w, *p, [True, True, True]))
    torch.library.opcheck(ops.convolution_backward.default, (gy, x.detach(), w, *p, [False, True, False]))


def test_learner_convolutions_run_the_op_when_a_gradient_is_recorded():
    """In a learner's forward F.conv2d goes to pymaml::convolution (compiled path) or the twin
    (pure-torch path) while autograd records; under no_grad it is torch's plain convolution."""
    net = torch.nn.Conv2d(1, 4, 3).double()
    learner = pymaml.MAML(net, lr=0.1).clone()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    compiled = pymaml._backend.compiled_available("convolution", torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = learner(x)
    assert ("pymaml::convolution" in {e.name for e in prof.events()}) == compiled
    assert y.grad_fn.name() != "ConvolutionBackward0"  # not torch's double backward
    assert torch.equal(y, F.conv2d(x, learner.module.weight, learner.module.bias))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner(x)
    assert "pymaml::convolution" not in {e.name for e in prof.events()}


# ------------------------------------------------------------- buffer-product gradient kernels
# (csrc/cpu/conv_gemm.cpp): pymaml::convolution_backward's CPU kernel against torch's, directly.
GEMM_GEOMETRIES = [
    # (x shape, weight shape, stride, padding)
    ((2, 3, 9, 8), (5, 3, 3, 3), (1, 1), (1, 1)),
    ((3, 4, 9, 9), (6, 4, 3, 3), (2, 2), (1, 1)),
    ((2, 1, 12, 12), (7, 1, 3, 3), (2, 2), (1, 1)),   # one input channel (K < O: transposed product)
    ((1, 2, 7, 10), (3, 2, 5, 3), (3, 2), (2, 0)),    # rectangular kernel, unequal strides and padding
    ((2, 5, 6, 6), (4, 5, 1, 1), (1, 1), (0, 0)),     # 1×1
    ((2, 3, 5, 5), (2, 3, 2, 2), (2, 2), (0, 0)),     # kernel = stride: no overlap
    ((2, 3, 4, 4), (4, 3, 3, 3), (1, 1), (2, 2)),     # padding wider than the overlap
    ((3, 2, 3, 3), (4, 2, 3, 3), (1, 1), (0, 0)),     # one output position
]


def _gemm_case(geom, dtype, x_cl, w_cl, gy_cl, seed=0):
    xs, ws, stride, padding = geom
    g = torch.Generator().manual_seed(seed)
    fmt = lambda cl: torch.channels_last if cl else torch.contiguous_format  # noqa: E731
    x = torch.randn(xs, generator=g, dtype=dtype).contiguous(memory_format=fmt(x_cl))
    w = torch.randn(ws, generator=g, dtype=dtype).contiguous(memory_format=fmt(w_cl))
    y = F.conv2d(x, w, None, stride, padding)
    gy = torch.randn(y.shape, generator=g, dtype=dtype).contiguous(memory_format=fmt(gy_cl))
    return gy, x, w, (list(stride), list(padding), [1, 1], 1)


@pytest.fixture
def gemm_mode():
    """Sets the buffer-product mode for one test and restores it."""
    if not HAS_COMPILED:
        pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    hook = torch.ops.pymaml_testing.conv_gemm_mode
    old = hook()
    yield hook
    hook(old)


@pytest.mark.parametrize("geom", GEMM_GEOMETRIES, ids=lambda g: "x{}w{}s{}p{}".format(*g).replace(" ", ""))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gemm_gradients_equal_torch_kernels(gemm_mode, geom, layout, dtype):
    """Every mask, every layout: the values of aten.convolution_backward (float64 to 1e-12, float32 to
    rounding), in the memory format torch returns, and the op's own torch path bit for bit."""
    cls = {"nchw": (False, False, False), "channels_last": (True, True, True), "mixed": (False, True, True)}[layout]
    gy, x, w, (stride, padding, dilation, groups) = _gemm_case(geom, dtype, *cls)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True],
                 [False, True, True]):
        want = torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], stride, padding, dilation, False,
                                                   [0, 0], groups, mask)
        gemm_mode("0")
        plain = torch.ops.pymaml.convolution_backward(gy, x, w, stride, padding, dilation, groups, mask)
        gemm_mode("1")
        got = torch.ops.pymaml.convolution_backward(gy, x, w, stride, padding, dilation, groups, mask)
        for k in range(3):
            assert (got[k] is None) == (not mask[k]) and (plain[k] is None) == (not mask[k])
            if not mask[k]:
                continue
            assert torch.equal(plain[k], want[k])
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
            assert rel(got[k], want[k]) < tol, (mask, k, rel(got[k], want[k]))
            if k < 2:  # layout of grad_x and grad_weight: torch's memory format
                for fmt in (torch.contiguous_format, torch.channels_last):
                    assert got[k].is_contiguous(memory_format=fmt) == want[k].is_contiguous(memory_format=fmt), (k, fmt)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_gradients_at_one_and_two_threads(gemm_mode, threads):
    """Both gradients at once run side by side on two threads: the same numbers as one by one."""
    gy, x, w, p = _gemm_case(GEMM_GEOMETRIES[1], torch.float64, True, True, True)
    gemm_mode("1")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        both = torch.ops.pymaml.convolution_backward(gy, x, w, *p, [True, True, True])
        gx = torch.ops.pymaml.convolution_backward(gy, x, w, *p, [True, False, False])[0]
        gw = torch.ops.pymaml.convolution_backward(gy, x, w, *p, [False, True, False])[1]
    finally:
        torch.set_num_threads(old)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, *p[:3], False, [0, 0], 1, [True, True, False])
    assert rel(both[0], want[0]) < 1e-12 and rel(both[1], want[1]) < 1e-12
    assert rel(gx, both[0]) < 1e-14 and rel(gw, both[1]) < 1e-14


def _runs_torch_kernel(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    assert "pymaml::convolution_backward" in names
    return "aten::convolution_backward" in names


def test_gemm_size_rule(gemm_mode):
    """auto: the buffer products for the gradients of a strided 64-channel Omniglot layer and of a
    small stride-1 layer; torch's kernels for a large stride-1 layer, grouped or dilated
    convolutions and float16; 0 and 1 force either."""
    def call(xs, ws, stride, dilation=(1, 1), groups=1, dtype=torch.float32):
        x = torch.randn(xs, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(ws, dtype=dtype).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, w, None, stride, 1, dilation, groups)
        return lambda: torch.ops.pymaml.convolution_backward(torch.ones_like(y), x, w, list(stride), [1, 1],
                                                             list(dilation), groups, [True, True, False])
    omniglot = call((20, 64, 14, 14), (64, 64, 3, 3), (2, 2))
    small = call((5, 32, 10, 10), (32, 32, 3, 3), (1, 1))
    large = call((25, 32, 42, 42), (32, 32, 3, 3), (1, 1))
    grouped = call((2, 4, 8, 8), (4, 2, 3, 3), (2, 2), groups=2)
    dilated = call((2, 4, 8, 8), (4, 4, 3, 3), (2, 2), dilation=(2, 2))
    gemm_mode("auto")
    assert not _runs_torch_kernel(omniglot) and not _runs_torch_kernel(small)
    assert _runs_torch_kernel(large) and _runs_torch_kernel(grouped) and _runs_torch_kernel(dilated)
    gemm_mode("0")
    assert _runs_torch_kernel(omniglot)
    gemm_mode("1")
    assert not _runs_torch_kernel(large) and _runs_torch_kernel(grouped)


@pytest.fixture(params=["0", "1"])
def gemm_mode_any(request):
    """Runs a test with torch's gradient kernels and with the buffer products (compiled path)."""
    if HAS_COMPILED:
        old = torch.ops.pymaml_testing.conv_gemm_mode(request.param)
        request.addfinalizer(lambda: torch.ops.pymaml_testing.conv_gemm_mode(old))
    elif request.param == "1":
        pytest.skip("the buffer products are part of the compiled extension")
    return request.param


def test_gemm_mode_rejects_unknown_values(gemm_mode):
    with pytest.raises(ValueError, match="conv_gemm_mode: mode must be '0', '1' or 'auto', got 'fast'"):
        gemm_mode("fast")


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
def test_gemm_environment_variable_is_checked():
    import subprocess
    import sys
    code = ("import torch, pymaml; x = torch.randn(2, 3, 6, 6); w = torch.randn(4, 3, 3, 3); "
            "gy = torch.randn(2, 4, 3, 3); "
            "torch.ops.pymaml.convolution_backward(gy, x, w, [2, 2], [1, 1], [1, 1], 1, [True, True, False])")
    env = dict(os.environ, PYMAML_CONV_GEMM="yes")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "PYMAML_CONV_GEMM must be 0, 1 or auto, got 'yes'" in r.stderr
    env["PYMAML_CONV_GEMM"] = "0"
    code += "; print(torch.ops.pymaml_testing.conv_gemm_mode())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-1] == "0", r.stderr


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("mode", ["0", "1"])
def test_opcheck_either_gradient_kernel(gemm_mode, mode):
    gemm_mode(mode)
    for cl in (False, True):
        x, w, b, p = make(CASES[1], channels_last=cl)
        gy = torch.randn_like(F.conv2d(x, w, b, *p)).requires_grad_()
        torch.library.opcheck(torch.ops.pymaml.convolution_backward.default, (gy, x, w, *p, [True, True, True]))
        torch.library.opcheck(torch.ops.pymaml.convolution.default, (x, w, b, *p))


@pytest.mark.parametrize("impl", ["compiled", "torch"])
def test_backward_returns_only_the_requested_gradients(impl, gemm_mode_any):
    """aten.convolution_backward returns grad_weight even when only grad_bias is asked for; the op
    and its twin return exactly the masked outputs, each in its own slot."""
    from pymaml.reference.conv import convolution_backward as twin
    if impl == "compiled" and not HAS_COMPILED:
        pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    gy, x, w, p = _gemm_case(GEMM_GEOMETRIES[0], torch.float64, False, False, False)
    fn = torch.ops.pymaml.convolution_backward if impl == "compiled" else twin
    want = torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], *p[:3], False, [0, 0], 1, [True, True, True])
    for mask in ([False, False, True], [True, False, True], [False, True, False], [True, False, False]):
        got = fn(gy, x, w, *p, mask)
        for k in range(3):
            if mask[k]:
                assert got[k].shape == want[k].shape and rel(got[k], want[k]) < 1e-12
            else:
                assert got[k] is None


def test_engine_convolutions_run_the_op_and_match_plain_convolutions(gemm_mode_any):
    """meta_gradient on a conv net: F.conv2d goes to pymaml::convolution (compiled path) or the
    twin, and the exact meta-gradient equals the one through plain F.conv2d (float64)."""
    import pymaml.functional.inner as inner
    from pymaml.functional import Task, meta_gradient
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    tasks = [Task((torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(6) % 3),
                  (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(6) % 3))
             for _ in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = meta_gradient(net, tasks, F.cross_entropy, steps=2, lr=0.3)
    assert not any("ConvolutionBackwardBackward0" in e.name for e in prof.events())
    names = {e.name for e in prof.events()}
    assert ("pymaml::convolution" in names) == HAS_COMPILED
    plain = inner._has_conv2d
    try:
        inner._has_conv2d = lambda model: False
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            want = meta_gradient(net, tasks, F.cross_entropy, steps=2, lr=0.3)
    finally:
        inner._has_conv2d = plain
    # torch's second derivative (with its whole-feature-map convolution) runs only in the plain run
    torch_second = lambda p: any("ConvolutionBackwardBackward0" in e.name for e in p.events())  # noqa: E731
    assert torch_second(prof) and "pymaml::convolution" not in {e.name for e in prof.events()}
    flat = lambda m: torch.cat([t.flatten() for t in (m.grads.values() if isinstance(m.grads, dict) else m.grads)])  # noqa: E731
    assert rel(flat(got), flat(want)) < 1e-12
