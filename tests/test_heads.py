"""Closed-form linear-head HVPs (pymaml.ops.linear_head_hvp): both backends against double backward.

The oracle is plain autograd in float64: the Hessian-vector product is the gradient of
⟨∇_{W,b} L, (V, v_b)⟩ with respect to (W, b), and grad_x its gradient with respect to x.
The compiled cases run when the built extension (pymaml._C) is loaded and holds the op's CPU kernel;
otherwise they are skipped.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import pymaml  # loads the extension when it is built
import pymaml.ops._dispatch
from pymaml import _backend, ops
from pymaml.reference import heads as reference_heads

# The op itself (direct calls, opcheck) whenever pymaml._C holds its CPU kernel; the public wrapper
# on the compiled path only when the package chose it (not under the suite's PYMAML_BACKEND=torch run).
HAS_COMPILED = _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pymaml::linear_head_hvp", "CPU")
WRAPPER_COMPILED = _backend.compiled_available("linear_head_hvp", "cpu")
BACKENDS = [pytest.param("compiled", marks=pytest.mark.skipif(
                not WRAPPER_COMPILED, reason=f"compiled backend not active: {pymaml.backend_reason()}")),
            "torch"]
LOSSES = ["cross_entropy", "mse"]


def call(backend, *args, monkeypatch=None):
    """The public wrapper with the backend forced, checking that the wrapper really took it."""
    if backend == "torch":
        monkeypatch.setattr(pymaml.ops._dispatch, "COMPILED", False)
        assert not pymaml.ops._dispatch.compiled("linear_head_hvp", args[0].device)
    else:
        assert _backend.compiled_available("linear_head_hvp", args[0].device)
    return ops.linear_head_hvp(*args)


def make(n, f, c, loss, bias=True, v_bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=dtype)
    w = torch.randn(c, f, generator=g, dtype=dtype) * 0.5
    b = torch.randn(c, generator=g, dtype=dtype) if bias else None
    t = (torch.randint(0, c, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, c, generator=g, dtype=dtype))
    vw = torch.randn(c, f, generator=g, dtype=dtype)
    vb = torch.randn(c, generator=g, dtype=dtype) if (bias and v_bias) else None
    return x, w, b, t, vw, vb


def double_backward(x, w, b, t, vw, vb, loss):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    params = [w] + ([b.detach().requires_grad_()] if b is not None else [])
    z = F.linear(x, *params)
    L = F.cross_entropy(z, t) if loss == "cross_entropy" else F.mse_loss(z, t)
    grads = torch.autograd.grad(L, params, create_graph=True)
    inner = (grads[0] * vw).sum()
    if b is not None and vb is not None:
        inner = inner + (grads[1] * vb).sum()
    out = torch.autograd.grad(inner, params + [x])
    return out[0], (out[1] if b is not None else None), out[-1]


def assert_rel(actual, expected, tol=1e-10):
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias,v_bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("n,f,c", [(80, 64, 5), (1, 3, 1), (17, 9, 45)])
def test_equals_double_backward_float64(backend, loss, bias, v_bias, n, f, c, monkeypatch):
    if loss == "cross_entropy" and c == 1:
        pytest.skip("one class: the softmax is constant, the Hessian is exactly zero (tested below)")
    args = make(n, f, c, loss, bias, v_bias)
    hw, hb, gx = call(backend, *args, loss, monkeypatch=monkeypatch)
    ew, eb, ex = double_backward(*args, loss)
    assert hw.dtype == gx.dtype == torch.float64
    assert_rel(hw, ew)
    assert_rel(gx, ex)
    if bias:
        assert_rel(hb, eb)
    else:
        assert hb is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_cross_entropy_is_flat(backend, monkeypatch):
    x, w, b, t, vw, vb = make(6, 4, 1, "cross_entropy")
    hw, hb, gx = call(backend, x, w, b, t, vw, vb, "cross_entropy", monkeypatch=monkeypatch)
    assert hw.abs().max() == 0 and hb.abs().max() == 0 and gx.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_strided_inputs(backend, loss, monkeypatch):
    x, w, b, t, vw, vb = make(12, 7, 6, loss)
    xs = x.t().contiguous().t()                    # column-major x
    ts = torch.stack([t, t], dim=-1)[..., 0]        # stride-2 target
    ws = torch.cat([w, w], dim=1)[:, ::2]           # non-unit inner stride
    ws.copy_(w)
    got = call(backend, xs, ws, b, ts, vw, vb, loss, monkeypatch=monkeypatch)
    want = double_backward(x, w, b, t, vw, vb, loss)
    for a, e in zip(got, want):
        assert_rel(a, e)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
def test_compiled_matches_twin_low_precision(loss, dtype):
    args = make(33, 10, 7, loss, dtype=dtype)
    got = torch.ops.pymaml.linear_head_hvp(*args, loss)
    want = reference_heads.linear_head_hvp(*args, loss)
    tol = 1e-5 if dtype == torch.float32 else 1e-2   # bf16: both round one float32 result once
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, monkeypatch):
    x, w, b, t, vw, vb = make(0, 5, 3, "cross_entropy")
    hw, hb, gx = call(backend, x, w, b, t, vw, vb, "cross_entropy", monkeypatch=monkeypatch)
    assert hw.shape == (3, 5) and hb.shape == (3,) and gx.shape == (0, 5)
    assert hw.abs().max() == 0 and hb.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_have_no_history_and_drive_the_body_backward(backend, monkeypatch):
    """grad_x pushed through a body by one ordinary backward gives the mixed second derivative
    ∂/∂θ_body ⟨∇_head L(body(θ_body)), v⟩, as double backward does."""
    g = torch.Generator().manual_seed(3)
    body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()).double()
    inp = torch.randn(20, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (20,), generator=g)
    vw, vb = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    feats = body(inp)
    hw, hb, gx = call(backend, feats, w, b, t, vw, vb, "cross_entropy", monkeypatch=monkeypatch)
    assert not (hw.requires_grad or hb.requires_grad or gx.requires_grad)
    got = torch.autograd.grad(feats, list(body.parameters()), gx)

    loss = F.cross_entropy(F.linear(body(inp), w, b), t)
    gw, gb = torch.autograd.grad(loss, [w, b], create_graph=True)
    want = torch.autograd.grad((gw * vw).sum() + (gb * vb).sum(), list(body.parameters()))
    for a, e in zip(got, want):
        assert_rel(a, e)


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(loss, bias):
    for dtype, grad in ((torch.float64, False), (torch.float32, False), (torch.float64, True)):
        args = make(9, 4, 3, loss, bias=bias, dtype=dtype)
        if grad:  # the op is registered as not differentiated: constants in, no history out
            args = (args[0].requires_grad_(), args[1].requires_grad_()) + args[2:]
        torch.library.opcheck(torch.ops.pymaml.linear_head_hvp.default, (*args, loss))


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
def test_raw_op_records_no_graph():
    x, w, b, t, vw, vb = make(9, 4, 3, "cross_entropy")
    out = torch.ops.pymaml.linear_head_hvp(x.requires_grad_(), w.requires_grad_(), b, t, vw, vb, "cross_entropy")
    assert all(not o.requires_grad and o.grad_fn is None for o in out)


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w, b, vw = torch.empty(10, 4), torch.empty(3, 4), torch.empty(3), torch.empty(3, 4)
        hw, hb, gx = torch.ops.pymaml.linear_head_hvp(x, w, b, torch.empty(10, dtype=torch.long), vw, None,
                                                      "cross_entropy")
    assert hw.shape == (3, 4) and hb.shape == (3,) and gx.shape == (10, 4)


BAD = [  # (description, mutate(args) -> args, exception type, words the message must contain)
    ("x 3-D", lambda a: (a[0][..., None],) + a[1:], ValueError, ["x must be 2-D", "[8, 4, 1]"]),
    ("weight F", lambda a: (a[0], a[1][:, :3]) + a[2:], ValueError, ["weight must be [C, F]", "F = 4", "[3, 3]"]),
    ("v_weight", lambda a: a[:4] + (a[4][:2],) + a[5:], ValueError, ["v_weight", "[3, 4]", "[2, 4]"]),
    ("bias", lambda a: a[:2] + (a[2][:2],) + a[3:], ValueError, ["bias must be [C]", "C = 3", "[2]"]),
    ("v_bias w/o bias", lambda a: a[:2] + (None,) + a[3:], ValueError, ["v_bias is given", "[3]", "bias is None"]),
    ("target shape", lambda a: a[:3] + (a[3][:5],) + a[4:], ValueError, ["target", "[8]", "[5]"]),
    ("target dtype", lambda a: a[:3] + (a[3].double(),) + a[4:], ValueError, ["int64", "[8]"]),
    ("weight dtype", lambda a: (a[0], a[1].float()) + a[2:], TypeError, ["weight has dtype", "x has dtype"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("desc,mutate,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_op_and_shapes(backend, desc, mutate, exc, words, monkeypatch):
    args = mutate(make(8, 4, 3, "cross_entropy"))
    with pytest.raises(exc) as info:
        call(backend, *args, "cross_entropy", monkeypatch=monkeypatch)
    msg = str(info.value)
    assert "linear_head_hvp" in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


@pytest.mark.skipif(not HAS_COMPILED, reason="extension not built")
@pytest.mark.parametrize("desc,mutate,exc,words", BAD, ids=[b[0] for b in BAD])
def test_compiled_op_checks_on_its_own(desc, mutate, exc, words):
    """Called directly (bypassing the Python checks) the C++ op rejects the same inputs."""
    args = mutate(make(8, 4, 3, "cross_entropy"))
    with pytest.raises(exc) as info:
        torch.ops.pymaml.linear_head_hvp(*args, "cross_entropy")
    assert "linear_head_hvp" in str(info.value)
    for w in words:
        assert w.lower() in str(info.value).lower(), (w, str(info.value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_loss_and_class_out_of_range(backend, monkeypatch):
    args = make(8, 4, 3, "cross_entropy")
    with pytest.raises(ValueError, match="linear_head_hvp: loss must be one of"):
        call(backend, *args, "nll", monkeypatch=monkeypatch)
    t = args[3].clone()
    t[5] = 3
    with pytest.raises(IndexError, match=r"linear_head_hvp: target holds class 3 outside \[0, 3\)"):
        call(backend, *args[:3], t, *args[4:], "cross_entropy", monkeypatch=monkeypatch)
    mse_args = make(8, 4, 3, "mse")
    with pytest.raises(ValueError, match=r"linear_head_hvp: mse needs target of shape \[N, C\] = \[8, 3\]"):
        call(backend, *mse_args[:3], mse_args[3][:, :2], *mse_args[4:], "mse", monkeypatch=monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_vmap_over_tasks_equals_loop(backend, loss, monkeypatch):
    tasks = [make(10, 6, 4, loss, seed=s) for s in range(3)]
    stacked = [torch.stack([t[i] for t in tasks]) for i in range(6)]
    shared_v = stacked[4][0]  # one direction for every task: an unbatched argument
    got = torch.vmap(lambda x, w, b, t, vb: call(backend, x, w, b, t, shared_v, vb, loss, monkeypatch=monkeypatch))(
        *stacked[:4], stacked[5])
    for k, task in enumerate(tasks):
        want = double_backward(*task[:4], shared_v, task[5], loss)
        for a, e in zip(got, want):
            assert_rel(a[k], e)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@CUDA
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n,f,c", [(80, 64, 5), (1000, 33, 100), (3, 5, 1)])
def test_cuda_equals_double_backward_float64(loss, n, f, c, monkeypatch):
    """Both paths on the GPU: C = 100 spans several lanes per row of the warp-per-row kernel,
    N = 1000 several blocks."""
    if loss == "cross_entropy" and c == 1:
        pytest.skip("one class: the Hessian is exactly zero")
    args = tuple(None if a is None else a.cuda() for a in make(n, f, c, loss))
    want = double_backward(*args, loss)
    backends = ["torch"] + (["compiled"] if _backend.compiled_available("linear_head_hvp", "cuda") else [])
    for backend in backends:
        got = call(backend, *args, loss, monkeypatch=monkeypatch)
        for a, e in zip(got, want):
            assert a.device.type == "cuda"
            assert_rel(a, e)
    if HAS_COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key("pymaml::linear_head_hvp", "CUDA"):
        torch.library.opcheck(torch.ops.pymaml.linear_head_hvp.default, (*args, loss))
