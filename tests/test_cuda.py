"""The CUDA kernels (csrc/cuda/*.cu) against the pure-torch reference (pymaml.reference).

Skipped without a GPU or without the compiled CUDA kernels. The ops are called through the
dispatcher (torch.ops.pymaml.*, the schemas of csrc/ops.cpp) so that these tests see exactly what
the kernels do, with no Python-side conversions in between; a few tests go through pymaml.ops too.

Tolerances: float64 is compared to 1e-12 relative (the kernels may fuse a multiply-add where the
reference rounds twice); float32 to 1e-5; float16 and bfloat16 outputs may differ from the
reference by one rounding of the output (the opmath result itself can differ in its last float bit,
which can flip the final rounding), so they are allowed one ulp of their type: 2e-3 and 1.6e-2
relative. Sums (lr_grad, norms) are compared with a float64 computation, with a bound scaled by the
sum of the magnitudes of the terms (the summation order differs from the reference).

PYMAML_CUDA_TESTS_DEVICE=cpu runs the same checks against the CPU kernels: a way to check these
tests themselves on a machine without a GPU (the graph-capture, sync and device-mixing tests are
then skipped).
"""
import math
import os

import pytest
import torch

import pymaml.reference as ref

# The compiled extension: pymaml._C when built in place, or a .so named by PYMAML_C_SO.
_EXT_ERROR = None
try:
    if os.environ.get("PYMAML_C_SO"):
        torch.ops.load_library(os.environ["PYMAML_C_SO"])
    else:
        import pymaml._C  # noqa: F401  (importing runs the op registrations)
except Exception as e:  # noqa: BLE001 - any failure means "not built here"
    _EXT_ERROR = f"{type(e).__name__}: {e}"


DEV = os.environ.get("PYMAML_CUDA_TESTS_DEVICE", "cuda")


def _kernels_present():
    if _EXT_ERROR is not None or (DEV == "cuda" and not torch.cuda.is_available()):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("pymaml::sgd_update", DEV.upper())
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(
    not _kernels_present(),
    reason=f"needs a GPU and pymaml's CUDA kernels (extension: {_EXT_ERROR or 'loaded'}, "
           f"cuda available: {torch.cuda.is_available()})")
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="exercises CUDA itself")

OPS = torch.ops.pymaml
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Per-element bound on the summation error, relative to Σ|term| (float accumulation for low types).
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# Shapes that exercise the chunking: empty, one element, odd sizes, exactly one chunk, one chunk plus
# one (a one-element last chunk), and 278011 (several chunks and an unaligned scalar tail of 3).
SHAPES = [(64, 1, 3, 3), (64,), (0,), (1,), (3, 5), (65536,), (65537,), (278011,), (7, 0, 3), (33, 17)]
CONV_NET = [(64, 1, 3, 3), (64,), (64,), (64,)] + [(64, 64, 3, 3), (64,), (64,), (64,)] * 3 + [(5, 64), (5,)]


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make(shapes, dtype, seed=0, device=DEV, scale=1.0, positive=False):
    """A list of random tensors (drawn on the CPU in float64 so every dtype sees the same numbers)."""
    g = _gen(seed)
    out = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64) * scale
        if positive:
            x = x.abs() + 0.1 * scale
        out.append(x.to(dtype).to(device))
    return out


def make_mixed(shapes, seed=0, device=DEV):
    """One tensor per shape, cycling through the four float dtypes."""
    lists = [make([s], FLOATS[i % 4], seed + i, device)[0] for i, s in enumerate(shapes)]
    return lists


def like(xs, seed, positive=False, scale=1.0):
    """A list matching xs in shape, dtype and device."""
    return [make([x.shape], x.dtype, seed + i, x.device, scale, positive)[0] for i, x in enumerate(xs)]


def noncontig(xs, kind):
    """Views with the same values that are not contiguous (or contiguous but misaligned)."""
    out = []
    for x in xs:
        if kind == "transpose" and x.dim() >= 2:
            out.append(x.transpose(0, 1).contiguous().transpose(0, 1))
        elif kind == "strided":
            big = torch.zeros((x.numel() * 2,), dtype=x.dtype, device=x.device)
            big[::2] = x.reshape(-1)
            out.append(big[::2].view(x.shape) if x.numel() else big[:0].view(x.shape))
        elif kind == "misaligned":  # contiguous, but one element past an aligned address
            big = torch.empty((x.numel() + 1,), dtype=x.dtype, device=x.device)
            v = big[1:].view(x.shape)
            v.copy_(x)
            out.append(v)
        else:
            out.append(x)
    return out


def cpu(xs):
    if xs is None or isinstance(xs, (float, int)):
        return xs
    if isinstance(xs, torch.Tensor):
        return xs.cpu() if xs.device.type != "cpu" else xs.clone()  # never the caller's tensor
    return [cpu(x) for x in xs]


def assert_close(got, want, dtype=None, rtol=None):
    """want computed by the reference on the CPU; got from the kernel on the GPU."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.device.type == DEV
    r = rtol if rtol is not None else RTOL[dtype or want.dtype]
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=r, atol=r)


def assert_lists_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w)


def assert_sum_close(got, terms, acc_dtype):
    """got: one-element tensor; terms: a list of tensors whose total sum is expected; acc_dtype: the
    lowest precision the kernel accumulated in (float32 unless every input is float64)."""
    exact = sum(t.double().sum().item() for t in terms) if terms else 0.0
    mag = sum(t.double().abs().sum().item() for t in terms) if terms else 0.0
    out_rtol = {torch.float64: 1e-15, torch.float32: 1.2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[got.dtype]
    bound = out_rtol * abs(exact) + SUM_RTOL[acc_dtype] * mag + 1e-30
    assert abs(got.double().item() - exact) <= bound, (got.item(), exact, bound)


# ----------------------------------------------------------------------------------------------
# sgd_update / sgd_update_lrs (out of place)


def lr_forms(params, seed=100):
    """(name, op-args, reference lr) for every α form, including mixed lists and lr dtypes other
    than the parameters'."""
    per_tensor = [torch.tensor(0.01 * (i + 1), dtype=p.dtype, device=p.device) for i, p in enumerate(params)]
    per_elem = like(params, seed, positive=True, scale=0.01)
    mixed = [per_elem[i] if i % 2 else per_tensor[i] for i in range(len(params))]
    # per-element α in float32 for every parameter (float16 params then read it in opmath)
    elem_f32 = [a.float() for a in per_elem]
    # per-tensor α in float64, as a (1,)-shaped tensor
    tensor_f64 = [torch.tensor([0.02 + 0.001 * i], dtype=torch.float64, device=p.device) for i, p in enumerate(params)]
    shared_dev = torch.tensor(0.05, dtype=torch.float32, device=DEV)
    shared_cpu = torch.tensor(0.05, dtype=torch.float64)
    return [
        ("float", None, 0.05),
        ("shared_device", [shared_dev], shared_dev),
        ("shared_cpu", [shared_cpu], shared_cpu),
        ("per_tensor", per_tensor, per_tensor),
        ("per_element", per_elem, per_elem),
        ("mixed", mixed, mixed),
        ("per_element_f32", elem_f32, elem_f32),
        ("per_tensor_f64", tensor_f64, tensor_f64),
    ]


def call_sgd(params, grads, lrs_arg, lr_float, wd, inplace=False):
    if lrs_arg is None:
        op = OPS.sgd_update_ if inplace else OPS.sgd_update
        return op(params, grads, lr_float, wd)
    op = OPS.sgd_update_lrs_ if inplace else OPS.sgd_update_lrs
    return op(params, grads, lrs_arg, wd)


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_update_every_lr_form(dtype, wd):
    params = make_mixed(SHAPES) if dtype == "mixed" else make(SHAPES, dtype)
    grads = like(params, 10)
    for name, lrs_arg, lr_ref in lr_forms(params):
        got = call_sgd(params, grads, lrs_arg, 0.05, wd)
        want = ref.sgd_update(cpu(params), cpu(grads), cpu(lr_ref), wd)
        assert_lists_close(got, want)
        for g, p in zip(got, params):
            assert g.is_contiguous() and g.data_ptr() != p.data_ptr() or g.numel() == 0, name


@pytest.mark.parametrize("dtype", FLOATS)
def test_elementwise_bitwise_equal_to_reference(dtype):
    # The kernels round every operation separately (no FMA contraction), as the reference does, so
    # the element-wise ops agree bit for bit with the reference run on the same device.
    params = make(SHAPES, dtype)
    grads, lrs = like(params, 1), like(params, 2, positive=True, scale=0.01)
    for got, want in [
        (OPS.sgd_update(params, grads, 0.05, 0.01), ref.sgd_update(params, grads, 0.05, 0.01)),
        (OPS.sgd_update_lrs(params, grads, lrs, 0.0), ref.sgd_update(params, grads, lrs)),
        (OPS.backward_step(params, grads, grads, [], lrs, 0.0, True)[2],
         ref.backward_step(params, grads, grads, 0.1, lrs)[2]),
        # eps as a 0-d tensor on the device: the reference then divides (a Python float divisor
        # becomes a multiplication by its reciprocal on CUDA, which may differ in the last bit)
        (OPS.fd_quotient(params, grads, 1e-3, torch.ones((), device=DEV)),
         ref.fd_quotient(params, grads, torch.tensor(1e-3, dtype=torch.float64, device=DEV))),
    ]:
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_subnormals_are_not_flushed():
    # built without --use_fast_math: subnormal inputs and results are kept, as the reference keeps them
    p = [torch.full((1003,), 3e-39, device=DEV), torch.full((5,), 1e-310, dtype=torch.float64, device=DEV)]
    g = [x * 0.5 for x in p]
    for got, want in [(OPS.sgd_update(p, g, 0.5, 0.0), ref.sgd_update(p, g, 0.5)),
                      (OPS.fd_quotient(p, g, 0.5, torch.ones((), device=DEV)),
                       ref.fd_quotient(p, g, torch.tensor(0.5, dtype=torch.float64, device=DEV)))]:
        for x, w in zip(got, want):
            assert torch.equal(x, w) and (x != 0).all()


@pytest.mark.parametrize("kind", ["transpose", "strided", "misaligned"])
def test_sgd_update_noncontiguous_and_misaligned(kind):
    params = make(SHAPES + CONV_NET, torch.float32)
    grads = like(params, 3)
    lrs = like(params, 7, positive=True, scale=0.01)
    p_nc, g_nc, l_nc = noncontig(params, kind), noncontig(grads, "strided"), noncontig(lrs, kind)
    got = OPS.sgd_update_lrs(p_nc, g_nc, l_nc, 0.1)
    want = ref.sgd_update(cpu(params), cpu(grads), cpu(lrs), 0.1)
    assert_lists_close(got, want)
    # and mixed with aligned tensors in one list
    mixed_p = [p_nc[i] if i % 2 else params[i] for i in range(len(params))]
    got = OPS.sgd_update(mixed_p, grads, 0.3, 0.0)
    assert_lists_close(got, ref.sgd_update(cpu(params), cpu(grads), 0.3))


def test_sgd_update_conv_net_list():
    params = make(CONV_NET, torch.float32)
    grads = like(params, 1)
    assert_lists_close(OPS.sgd_update(params, grads, 0.4, 0.0), ref.sgd_update(cpu(params), cpu(grads), 0.4))


def test_sgd_update_more_tensors_than_one_launch():
    # Far more tensors than any table holds (a few hundred at most), of ragged small sizes.
    g = _gen(5)
    shapes = [(int(n),) for n in torch.randint(0, 300, (1500,), generator=g)]
    params = make_mixed(shapes)
    grads = like(params, 2)
    lrs = [a if i % 3 else a.reshape(-1)[:1].reshape(()) if a.numel() else torch.tensor(0.1, device=DEV, dtype=a.dtype)
           for i, a in enumerate(like(params, 4, positive=True, scale=0.01))]
    got = OPS.sgd_update_lrs(params, grads, lrs, 0.0)
    assert_lists_close(got, ref.sgd_update(cpu(params), cpu(grads), cpu(lrs)))


@cuda_only
def test_sgd_update_more_chunks_than_one_launch():
    # 150M elements: more than the 2240 blocks × 65536 of one launch, so a tensor is split across
    # launches (its slot carried over to the next table).
    n1, n2 = 100_000_003, 50_000_001
    params = [torch.randn(n1, device=DEV), torch.randn(n2, device=DEV)]
    grads = [torch.randn(n1, device=DEV), torch.randn(n2, device=DEV)]
    lr = torch.tensor(0.25, device=DEV)
    got = OPS.sgd_update_lrs(params, grads, [lr], 0.0)
    for g, p, d in zip(got, params, grads):
        torch.testing.assert_close(g, p - 0.25 * d, rtol=1e-6, atol=1e-6)
    OPS.sgd_update_lrs_(params, grads, [lr], 0.0)
    for g, p in zip(got, params):
        assert torch.equal(g, p)
    norm = OPS.global_norm(grads)
    want = torch.sqrt(sum((d.double() ** 2).sum() for d in grads))
    torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)
    del params, grads, got
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# sgd_update_ (in place)


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
def test_sgd_update_inplace(dtype):
    params = make_mixed(SHAPES) if dtype == "mixed" else make(SHAPES, dtype)
    grads = like(params, 10)
    for name, lrs_arg, lr_ref in lr_forms(params):
        ps = [p.clone() for p in params]
        ptrs = [p.data_ptr() for p in ps]
        with torch.no_grad():
            assert call_sgd(ps, grads, lrs_arg, 0.05, 0.01, inplace=True) is None
        want = ref.sgd_update(cpu(params), cpu(grads), cpu(lr_ref), 0.01)
        assert_lists_close(ps, want)
        assert [p.data_ptr() for p in ps] == ptrs, name


@pytest.mark.parametrize("kind", ["transpose", "strided", "misaligned"])
def test_sgd_update_inplace_noncontiguous(kind):
    base = make(SHAPES + CONV_NET, torch.float32)
    grads = like(base, 3)
    ps = noncontig([p.clone() for p in base], kind)
    # the memory around strided views must stay untouched
    bases = [p._base if p._base is not None else p for p in ps]
    before = [b.clone() for b in bases]
    OPS.sgd_update_(ps, grads, 0.5, 0.0)
    assert_lists_close([p.contiguous() for p in ps], ref.sgd_update(cpu(base), cpu(grads), 0.5))
    if kind == "strided":
        for b, b0 in zip(bases, before):
            assert torch.equal(b[1::2], b0[1::2])


# ----------------------------------------------------------------------------------------------
# backward_step


def next_forms(v):
    per_tensor = [torch.tensor(0.03 * (i + 1), dtype=x.dtype, device=x.device) for i, x in enumerate(v)]
    per_elem = like(v, 300, positive=True, scale=0.01)
    mixed = [per_elem[i] if i % 2 else per_tensor[i] for i in range(len(v))]
    shared_dev = torch.tensor(0.07, device=DEV, dtype=torch.float64)
    shared_cpu = torch.tensor(0.07)
    elem_f32 = [a.float() for a in per_elem]
    # (name, next_lrs, next_lr, has_next, the reference's next_lr)
    return [
        ("none", [], 0.0, False, None),
        ("float", [], 0.07, True, 0.07),
        ("shared_device", [shared_dev], 0.0, True, shared_dev.cpu()),
        ("shared_cpu", [shared_cpu], 0.0, True, shared_cpu),
        ("per_tensor", per_tensor, 0.0, True, cpu(per_tensor)),
        ("per_element", per_elem, 0.0, True, cpu(per_elem)),
        ("mixed", mixed, 0.0, True, cpu(mixed)),
        ("per_element_f32", elem_f32, 0.0, True, cpu(elem_f32)),
        ("ignored_without_next", per_elem, 0.0, False, None),
    ]


def lrgrad_forms(v):
    per_tensor = [torch.tensor([0.01], dtype=x.dtype, device=x.device) for x in v]
    per_elem = like(v, 200, positive=True, scale=0.01)
    mixed = [per_elem[i] if i % 2 else per_tensor[i] for i in range(len(v))]
    return [
        ("float", []),
        ("shared_device", [torch.tensor(0.01, device=DEV)]),
        ("shared_cpu", [torch.tensor(0.01, dtype=torch.float64)]),
        ("per_tensor", per_tensor),
        ("per_element", per_elem),
        ("mixed", mixed),
        ("per_element_f64", [a.double() for a in per_elem]),
    ]


def check_backward_step(v, h, g, lrs, next_lrs, next_lr, has_next, next_ref):
    v_out, lr_grad, u_next = OPS.backward_step(v, h, g, lrs, next_lrs, next_lr, has_next)
    shared = len(lrs) == 1 and (len(v) != 1 or lrs[0].numel() == 1)  # pymaml/ops.h: classify_lrs
    lr_ref = 0.01 if not lrs else (lrs[0].cpu() if shared else cpu(lrs))
    want_v, want_lg, want_u = ref.backward_step(cpu(v), cpu(h), cpu(g), lr_ref, next_ref)
    assert_lists_close(v_out, want_v)
    if has_next:
        assert_lists_close(u_next, want_u)
    else:
        assert u_next == []
    terms = [-(gi.double() * vi.double()).cpu() for gi, vi in zip(g, v)]
    if not lrs:
        assert lr_grad == []
    elif shared:
        assert len(lr_grad) == 1
        lg = lr_grad[0]
        assert lg.device == lrs[0].device and lg.dtype == lrs[0].dtype and lg.shape == lrs[0].shape
        acc = torch.float64 if all(x.dtype == torch.float64 for x in v) else torch.float32
        assert_sum_close(lg, terms, acc)
    else:
        assert len(lr_grad) == len(v)
        for i, (lg, a) in enumerate(zip(lr_grad, lrs)):
            assert lg.dtype == a.dtype and lg.shape == a.shape and lg.device == a.device, i
            if a.numel() == 1:
                assert_sum_close(lg, [terms[i]], v[i].dtype)
            else:
                assert_close(lg, want_lg[i], dtype=a.dtype if a.dtype.itemsize < v[i].dtype.itemsize else v[i].dtype)
    return v_out, lr_grad, u_next


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
def test_backward_step_every_form(dtype):
    v = make_mixed(SHAPES) if dtype == "mixed" else make(SHAPES, dtype)
    h = like(v, 20)
    g = like(v, 30)
    nexts = next_forms(v)
    for k, (lname, lrs) in enumerate(lrgrad_forms(v)):
        # every lr form meets two next forms, and every next form is met
        for nname, next_lrs, next_lr, has_next, next_ref in (nexts[k % len(nexts)], nexts[(k + 4) % len(nexts)],
                                                             nexts[(k + 7) % len(nexts)]):
            try:
                check_backward_step(v, h, g, lrs, next_lrs, next_lr, has_next, next_ref)
            except AssertionError as e:
                raise AssertionError(f"lr={lname} next={nname}: {e}") from e


@pytest.mark.parametrize("kind", ["transpose", "strided", "misaligned"])
def test_backward_step_noncontiguous(kind):
    v = make(SHAPES + CONV_NET, torch.float64)
    h, g = like(v, 1), like(v, 2)
    lrs = like(v, 3, positive=True, scale=0.01)
    nl = like(v, 4, positive=True, scale=0.01)
    check_backward_step(noncontig(v, kind), noncontig(h, "strided"), noncontig(g, kind), noncontig(lrs, kind),
                        noncontig(nl, kind), 0.0, True, cpu(nl))
    # per-tensor sums from non-contiguous inputs
    pt = [torch.tensor(0.1, device=DEV, dtype=torch.float64) for _ in v]
    check_backward_step(noncontig(v, kind), h, noncontig(g, kind), pt, [], 0.2, True, 0.2)


def test_backward_step_large_and_many():
    g0 = _gen(9)
    shapes = [(int(n),) for n in torch.randint(0, 200, (700,), generator=g0)] + [(278011,), (65537,)]
    v = make_mixed(shapes)
    h, g = like(v, 1), like(v, 2)
    lrs = [torch.tensor(0.01, device=DEV, dtype=x.dtype) if i % 2 else a for i, (x, a) in
           enumerate(zip(v, like(v, 3, positive=True, scale=0.01)))]
    check_backward_step(v, h, g, lrs, lrs, 0.0, True, cpu(lrs))
    check_backward_step(v, h, g, [torch.tensor(0.5, device=DEV)], [], 0.3, True, 0.3)


def test_backward_step_deterministic():
    v = make(SHAPES * 3, torch.float32)
    h, g = like(v, 1), like(v, 2)
    shared = [torch.tensor(0.1, device=DEV)]
    pt = [torch.tensor(0.1, device=DEV) for _ in v]
    a = OPS.backward_step(v, h, g, shared, [], 0.0, False)[1][0]
    b = OPS.backward_step(v, h, g, shared, [], 0.0, False)[1][0]
    assert torch.equal(a, b)
    a = OPS.backward_step(v, h, g, pt, [], 0.0, False)[1]
    b = OPS.backward_step(v, h, g, pt, [], 0.0, False)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_one_param_with_a_cpu_shared_lr():
    # one parameter and one 0-d step size on the CPU: the shared form (read on the host), not a
    # per-tensor α on the wrong device
    p, g = make([(33, 17)], torch.float32), make([(33, 17)], torch.float32, seed=1)
    lr = torch.tensor(0.05, dtype=torch.float64)
    assert_lists_close(OPS.sgd_update_lrs(p, g, [lr], 0.01), ref.sgd_update(cpu(p), cpu(g), lr, 0.01))
    q = [x.clone() for x in p]
    OPS.sgd_update_lrs_(q, g, [lr], 0.0)
    assert_lists_close(q, ref.sgd_update(cpu(p), cpu(g), lr))
    v_out, lr_grad, u_next = OPS.backward_step(p, g, g, [lr], [lr], 0.0, True)
    assert lr_grad[0].device.type == "cpu" and lr_grad[0].shape == () and lr_grad[0].dtype == torch.float64
    assert_sum_close(lr_grad[0], [-(g[0].double() * p[0].double()).cpu()], torch.float32)
    assert_lists_close(u_next, ref.backward_step(cpu(p), cpu(g), cpu(g), lr, lr)[2])


def test_backward_step_empty_list_shared_lr():
    lr = torch.tensor(0.1, device=DEV)
    v_out, lr_grad, u = OPS.backward_step([], [], [], [lr], [], 0.0, False)
    assert v_out == [] and u == [] and len(lr_grad) == 1 and lr_grad[0].item() == 0.0


# ----------------------------------------------------------------------------------------------
# fd_perturb / fd_quotient


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
@pytest.mark.parametrize("scale_on", sorted({DEV, "cpu"}))
def test_fd_helpers(dtype, scale_on):
    p = make_mixed(SHAPES) if dtype == "mixed" else make(SHAPES, dtype)
    u = like(p, 5)
    for eps, s, sdtype in [(1.0, 0.25, torch.float32), (1e-3, 2.0, torch.float64), (0.5, 0.125, torch.float16)]:
        scale = torch.tensor(s, dtype=sdtype, device=scale_on)
        e_ref = torch.tensor(eps * s, dtype=torch.float64)
        plus, minus = OPS.fd_perturb(p, u, eps, scale)
        wp, wm = ref.fd_perturb(cpu(p), cpu(u), e_ref)
        assert_lists_close(plus, wp)
        assert_lists_close(minus, wm)
        q = OPS.fd_quotient(plus, minus, eps, scale)
        assert_lists_close(q, ref.fd_quotient(cpu(plus), cpu(minus), e_ref))


@pytest.mark.parametrize("kind", ["transpose", "strided", "misaligned"])
def test_fd_noncontiguous(kind):
    p = make(SHAPES + CONV_NET, torch.float32)
    u = like(p, 5)
    scale = torch.tensor(0.5, device=DEV)
    plus, minus = OPS.fd_perturb(noncontig(p, kind), noncontig(u, "strided"), 1e-2, scale)
    wp, wm = ref.fd_perturb(cpu(p), cpu(u), 5e-3)
    assert_lists_close(plus, wp)
    assert_lists_close(minus, wm)
    q = OPS.fd_quotient(noncontig(plus, kind), noncontig(minus, "misaligned"), 1e-2, scale)
    assert_lists_close(q, ref.fd_quotient(cpu(plus), cpu(minus), 5e-3))


# ----------------------------------------------------------------------------------------------
# global_norm / clip_grad_norm_


@pytest.mark.parametrize("dtype", FLOATS + ["mixed", "mixed_no_f64"])
def test_global_norm(dtype):
    if dtype == "mixed":
        xs = make_mixed(SHAPES)
    elif dtype == "mixed_no_f64":
        xs = [x for x in make_mixed(SHAPES) if x.dtype != torch.float64]
    else:
        xs = make(SHAPES, dtype)
    n = OPS.global_norm(xs)
    want = ref.global_norm(cpu(xs))
    assert n.shape == () and n.device.type == DEV and n.dtype == want.dtype
    exact = math.sqrt(sum((x.double() ** 2).sum().item() for x in xs))
    rtol = 1e-13 if n.dtype == torch.float64 else 2e-6
    assert abs(n.item() - exact) <= rtol * exact
    assert torch.equal(OPS.global_norm(xs), n)  # deterministic
    for kind in ["transpose", "strided"]:  # the same chunks after .contiguous(): bitwise the same
        assert torch.equal(OPS.global_norm(noncontig(xs, kind)), n), kind
    m = OPS.global_norm(noncontig(xs, "misaligned"))  # scalar path: another summation order
    assert abs(m.item() - exact) <= rtol * exact


def test_global_norm_all_empty_and_many():
    assert OPS.global_norm([torch.empty(0, device=DEV), torch.empty(3, 0, device=DEV)]).item() == 0.0
    g0 = _gen(3)
    xs = make([(int(k),) for k in torch.randint(1, 100, (2000,), generator=g0)], torch.float32)
    exact = math.sqrt(sum((x.double() ** 2).sum().item() for x in xs))
    assert abs(OPS.global_norm(xs).item() - exact) <= 2e-6 * exact


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
@pytest.mark.parametrize("max_norm", [1e9, 0.5])
def test_clip_grad_norm(dtype, max_norm):
    xs = make_mixed(SHAPES) if dtype == "mixed" else make(SHAPES, dtype)
    ys = [x.clone() for x in xs]
    n = OPS.clip_grad_norm_(ys, max_norm, 1e-6)
    want_xs = cpu(xs)
    want_n = ref.clip_grad_norm_(want_xs, max_norm, 1e-6)
    assert n.dtype == want_n.dtype and n.shape == ()
    # the reference accumulates float32 inputs in float32 (~2e-6 relative error here)
    torch.testing.assert_close(n.cpu().double(), want_n.double(), rtol=1e-12 if n.dtype == torch.float64 else 1e-5,
                               atol=0)
    exact = math.sqrt(sum((x.double() ** 2).sum().item() for x in xs))
    assert abs(n.item() - exact) <= (1e-13 if n.dtype == torch.float64 else 2e-6) * exact
    if max_norm > 1e6:
        assert all(torch.equal(y, x) for x, y in zip(xs, ys))  # scale exactly 1
    else:
        for y, w in zip(ys, want_xs):
            # the scale may differ from the reference's in its last bit, and float16/bfloat16 round it
            assert_close(y, w, rtol=max(RTOL[w.dtype], 1e-6))
        after = OPS.global_norm(ys).item()
        assert after <= max_norm * (1 + 2e-2)


@pytest.mark.parametrize("kind", ["transpose", "strided", "misaligned"])
def test_clip_grad_norm_noncontiguous(kind):
    xs = make(SHAPES + CONV_NET, torch.float32)
    ys = noncontig([x.clone() for x in xs], kind)
    bases = [y._base if y._base is not None else y for y in ys]
    before = [b.clone() for b in bases]
    OPS.clip_grad_norm_(ys, 0.5, 1e-6)
    want = cpu(xs)
    ref.clip_grad_norm_(want, 0.5, 1e-6)
    assert_lists_close([y.contiguous() for y in ys], want)
    if kind == "strided":
        for b, b0 in zip(bases, before):
            assert torch.equal(b[1::2], b0[1::2])


def test_clip_grad_norm_nan_propagates():
    # as the reference (torch.clamp keeps NaN) and torch.nn.utils.clip_grad_norm_: a NaN norm
    # poisons every tensor instead of silently skipping the clip
    xs = [torch.tensor([float("nan"), 1.0], device=DEV), torch.ones(3, device=DEV)]
    n = OPS.clip_grad_norm_(xs, 1.0, 1e-6)
    assert torch.isnan(n) and torch.isnan(xs[1]).all()


# ----------------------------------------------------------------------------------------------
# No host sync: everything on the device, capturable into a CUDA graph.


@cuda_only
def test_no_sync_debug_mode():
    params = make(CONV_NET, torch.float32)
    grads = like(params, 1)
    lr = torch.tensor(0.1, device=DEV)
    pt = [torch.tensor(0.1, device=DEV) for _ in params]
    pe = like(params, 2, positive=True, scale=0.01)
    scale = torch.tensor(0.5, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.sgd_update_lrs(params, grads, [lr], 0.0)
        OPS.sgd_update_lrs(params, grads, pt, 0.0)
        with torch.no_grad():
            OPS.sgd_update_lrs_(params, grads, pe, 0.01)
        OPS.backward_step(params, grads, grads, [lr], pe, 0.0, True)
        OPS.backward_step(params, grads, grads, pt, [lr], 0.0, True)
        OPS.fd_perturb(params, grads, 1e-3, scale)
        OPS.fd_quotient(params, grads, 1e-3, scale)
        OPS.global_norm(params)
        OPS.clip_grad_norm_(grads, 0.1, 1e-6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def captured(step, params, p0):
    """Runs step() once on a side stream (kernels loaded, as torch.cuda.graphs recommends), restores
    params from p0, then captures step() into a graph: (graph, what the captured step returned)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for p, q in zip(params, p0):
        p.copy_(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@cuda_only
def test_cuda_graph_capture():
    params = make(CONV_NET + [(278011,)], torch.float32)
    grads = like(params, 1)
    lr = torch.tensor(0.1, device=DEV)
    pt = [torch.tensor(0.01 * (i + 1), device=DEV) for i in range(len(params))]
    p0 = [p.clone() for p in params]

    def step():
        OPS.sgd_update_lrs_(params, grads, [lr], 0.0)
        return (*OPS.backward_step(params, grads, grads, pt, [lr], 0.0, True), OPS.global_norm(grads),
                *OPS.fd_perturb(params, grads, 1.0, lr))

    graph, (v_out, lr_grad, u_next, norm, plus, minus) = captured(step, params, p0)
    # capture records, it does not run: params are unchanged
    assert all(torch.equal(p, q) for p, q in zip(params, p0))
    lr.fill_(0.5)  # the replay reads the new value on the device
    graph.replay()
    torch.cuda.synchronize()
    want = ref.sgd_update(cpu(p0), cpu(grads), 0.5)
    assert_lists_close(params, want)
    wv, wl, wu = ref.backward_step(cpu(params), cpu(grads), cpu(grads), cpu(pt), 0.5)
    assert_lists_close(v_out, wv)
    assert_lists_close(u_next, wu)
    for a, w in zip(lr_grad, wl):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-5, atol=1e-4)
    exact = math.sqrt(sum((x.double() ** 2).sum().item() for x in grads))
    assert abs(norm.item() - exact) <= 2e-6 * exact
    wp, wm = ref.fd_perturb(cpu(params), cpu(grads), 0.5)
    assert_lists_close(plus, wp)
    assert_lists_close(minus, wm)
    graph.replay()  # a second step from the updated params
    torch.cuda.synchronize()
    assert_lists_close(params, ref.sgd_update(want, cpu(grads), 0.5))


@cuda_only
def test_cuda_graph_capture_refuses_a_cpu_shared_lr_grad():
    # the gradient of a shared α on the CPU needs a device-to-host copy, which a graph cannot record
    v = make(CONV_NET, torch.float32)
    lr = torch.tensor(0.1)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=r"backward_step: lr is a shared step size on the CPU.*CUDA graph"):
        with torch.cuda.graph(graph):
            OPS.backward_step(v, v, v, [lr], [], 0.0, False)
    torch.cuda.synchronize()


@cuda_only
def test_cuda_graph_capture_small_tables():
    # Under capture the kernels use the 4 KB argument tables (as PyTorch does): many tensors and
    # more chunks than one such table holds make them refill within one captured op.
    params = make([(7,)] * 60 + [(330 * 65536 + 3,)], torch.float32)
    grads = like(params, 1)
    p0 = [p.clone() for p in params]
    lr = torch.tensor(0.25, device=DEV)

    def step():
        OPS.sgd_update_lrs_(params, grads, [lr], 0.0)
        return OPS.global_norm(grads)

    graph, norm = captured(step, params, p0)
    graph.replay()
    torch.cuda.synchronize()
    assert_lists_close(params, ref.sgd_update(cpu(p0), cpu(grads), 0.25))
    exact = sum((x.double() ** 2).sum().item() for x in grads) ** 0.5
    assert abs(norm.item() - exact) <= 2e-6 * exact


# ----------------------------------------------------------------------------------------------
# Errors: the op and the values are named.


@cuda_only
def test_errors_name_op_and_values():
    p = [torch.randn(3, device=DEV)]
    with pytest.raises((ValueError, RuntimeError), match=r"sgd_update.*cpu"):
        OPS.sgd_update(p, [torch.randn(3)], 0.1, 0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"sgd_update.*differ in length: 1 vs 2"):
        OPS.sgd_update(p, [torch.randn(3, device=DEV)] * 2, 0.1, 0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"sgd_update.*shape"):
        OPS.sgd_update(p, [torch.randn(4, device=DEV)], 0.1, 0.0)
    with pytest.raises((TypeError, RuntimeError), match=r"sgd_update.*dtype"):
        OPS.sgd_update([torch.ones(3, dtype=torch.int64, device=DEV)], [torch.ones(3, dtype=torch.int64, device=DEV)],
                       0.1, 0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"sgd_update_lrs.*3 entries.*2 params"):
        OPS.sgd_update_lrs(p * 2, p * 2, [torch.tensor(0.1, device=DEV)] * 3, 0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"sgd_update_lrs.*shape"):
        OPS.sgd_update_lrs(p * 2, p * 2, [torch.ones(2, device=DEV)] * 2, 0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"backward_step.*cpu"):
        OPS.backward_step(p, p, p, [torch.ones(3)], [], 0.0, False)
    with pytest.raises((ValueError, RuntimeError), match=r"fd_perturb.*eps_scale"):
        OPS.fd_perturb(p, p, 1.0, torch.ones(2, device=DEV))
    with pytest.raises((ValueError, RuntimeError), match=r"global_norm.*cpu"):
        OPS.global_norm([p[0], torch.ones(2)])
    with pytest.raises((ValueError, RuntimeError), match=r"clip_grad_norm_.*max_norm"):
        OPS.clip_grad_norm_(p, -1.0, 1e-6)


# ----------------------------------------------------------------------------------------------
# Through the public module and the opcheck battery, when pymaml.ops is the compiled backend.


def _compiled_ops():
    """pymaml.ops when it routes to the compiled kernels, else None."""
    if os.environ.get("PYMAML_BACKEND", "").lower() == "torch":
        return None
    try:
        from pymaml import ops
    except Exception:  # noqa: BLE001
        return None
    return None if ops is ref else ops


def test_public_ops_on_cuda():
    ops = _compiled_ops()
    if ops is None:
        pytest.skip("pymaml.ops is not the compiled backend")
    params = make(SHAPES, torch.float32)
    grads = like(params, 1)
    lr = torch.tensor(0.1, device=DEV)
    assert_lists_close(ops.sgd_update(params, grads, lr), ref.sgd_update(cpu(params), cpu(grads), cpu(lr)))
    v_out, lg, u = ops.backward_step(params, grads, grads, lr, 0.2)
    wv, wl, wu = ref.backward_step(cpu(params), cpu(grads), cpu(grads), cpu(lr), 0.2)
    assert_lists_close(v_out, wv)
    assert_lists_close(u, wu)
    torch.testing.assert_close(lg.cpu(), wl, rtol=1e-5, atol=1e-4)
    n = ops.global_norm(params)
    torch.testing.assert_close(n.cpu(), ref.global_norm(cpu(params)), rtol=1e-6, atol=0)


def test_opcheck_cuda():
    if _compiled_ops() is None:
        pytest.skip("pymaml.ops (fake kernels, autograd) not registered as the compiled backend")
    p = make([(3, 4), (5,), (0,)], torch.float64)
    g = like(p, 1)
    lrs = like(p, 2, positive=True, scale=0.1)
    s = torch.tensor(0.5, device=DEV, dtype=torch.float64)
    cases = [
        (OPS.sgd_update.default, (p, g, 0.1, 0.0)),
        (OPS.sgd_update_lrs.default, (p, g, lrs, 0.01)),
        (OPS.sgd_update_.default, ([x.clone() for x in p], g, 0.1, 0.0)),
        (OPS.sgd_update_lrs_.default, ([x.clone() for x in p], g, lrs, 0.0)),
        (OPS.backward_step.default, (p, g, g, lrs, lrs, 0.0, True)),
        (OPS.backward_step.default, (p, g, g, [s], [], 0.1, True)),
        (OPS.fd_perturb.default, (p, g, 1e-3, s)),
        (OPS.fd_quotient.default, (p, g, 1e-3, s)),
        (OPS.global_norm.default, (p,)),
        (OPS.clip_grad_norm_.default, ([x.clone() for x in p], 0.5, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_autograd_through_public_ops():
    """gradcheck / gradgradcheck in float64 through pymaml.ops, whose backward formulas call the
    same kernels again (on this device)."""
    ops = _compiled_ops()
    if ops is None:
        pytest.skip("pymaml.ops is not the compiled backend")
    from torch.autograd import gradcheck, gradgradcheck

    def t(*shape, seed, positive=False):
        x = make([shape], torch.float64, seed, positive=positive, scale=0.5)[0]
        return x.requires_grad_()

    p, g, a = t(3, 4, seed=1), t(3, 4, seed=2), t(3, 4, seed=3, positive=True)
    s = t(seed=4, positive=True)

    def upd(p, g, a, s):
        return ops.sgd_update([p, p * 2], [g, g], [a, s], 0.01)

    def step(v, h, g, a, s):
        vo, lg, u = ops.backward_step([v, v], [h, g], [g, h], [a, s], [s, a])
        return (*vo, *lg, *u)

    def fd(p, g, s):
        plus, minus = ops.fd_perturb([p], [g], s)
        return plus[0], minus[0], ops.fd_quotient(plus, minus, s)[0]

    for f, args in [(upd, (p, g, a, s)), (step, (p, g, a, a, s)), (fd, (p, g, s))]:
        assert gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)
        assert gradgradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)
