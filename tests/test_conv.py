"""pymaml::convolution / convolution_backward (compiled, autograd in C++) and their pure-torch twin
pymaml.reference.conv.ConvolutionFn, against plain autograd through F.conv2d in float64: values,
first, second and third derivatives, gradcheck/gradgradcheck, opcheck; and the learners' use of it."""
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


@pytest.fixture(params=["compiled", "torch"])
def conv(request):
    if request.param == "compiled":
        if not HAS_COMPILED:
            pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
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
    # the value and the first derivatives are torch's own kernels: equal bit for bit on the CPU (cuDNN
    # may choose another algorithm from one call to the next)
    if device == "cpu":
        for a, e in zip(got[:1 + len(got) // 4], want):
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
