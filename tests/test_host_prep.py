"""The host side of the CUDA kernels, run on CPU tensors (no GPU needed).

csrc/include/pymaml/device_plan.h holds what the CUDA ops do on the host before and between their
launches: the step-size classification (shared with the CPU kernels), the operand preparation
(contiguous copies, dtype conversions, the addresses the kernels read), the dtype grouping, the
kernel-argument tables and the rule that sizes them. The CPU build compiles it too, and the
test-only ops ``torch.ops.pymaml_testing.*`` (csrc/host_checks.cpp) run it on CPU tensors with each
kernel replaced by a host loop over the same table entries. So a defect of the host code (a
non-contiguous operand reaching a kernel, a list half written when a later operand fails, a step
size put in the wrong form, a chunk missing from the tables) shows here, without a GPU.

The host loops compute in the same opmath arithmetic as the reference, so element-wise results are
compared bit for bit; sums (lr_grad) are compared against float64 with a bound scaled by the sum
of the magnitudes of the terms (their summation order differs from the reference's).
"""
import pytest
import torch

import pymaml.reference as ref

try:
    import pymaml._C  # noqa: F401  (importing runs the op registrations)
    HOST = torch.ops.pymaml_testing
    HOST.tables  # noqa: B018  (raises when this build lacks the test-only ops)
    _ERR = None
except Exception as e:  # noqa: BLE001 - any failure means "not built here"
    HOST, _ERR = None, f"{type(e).__name__}: {e}"

pytestmark = pytest.mark.skipif(HOST is None, reason=f"needs the compiled extension ({_ERR})")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5, 7), (0,), (1,), (3, 4, 6), (65537,), (8, 3)]
CHUNK = 65536


def make(shapes, dtypes, seed, positive=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        x = torch.randn(s, generator=g, dtype=torch.float64) * scale
        if positive:
            x = x.abs() + 0.1 * scale
        out.append(x.to(dtypes[i % len(dtypes)]))
    return out


def like(xs, seed, positive=False, scale=1.0, dtype=None):
    return [make([x.shape], [dtype or x.dtype], seed + i, positive, scale)[0] for i, x in enumerate(xs)]


def transposed(xs):
    """Same values, same dtype, not contiguous: a transpose (2-d and more) or a stride-2 slice."""
    out = []
    for x in xs:
        if x.dim() >= 2:
            out.append(x.transpose(0, 1).contiguous().transpose(0, 1))
        else:
            big = torch.zeros(2 * x.numel(), dtype=x.dtype)
            big[::2] = x.reshape(-1)
            out.append(big[::2].view(x.shape))
        assert x.numel() <= 1 or not out[-1].is_contiguous()
    return out


def assert_equal_lists(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)


def assert_sums_close(got, want_terms):
    """got: lr_grad sums; want_terms: the summed terms (any dtype), compared in float64."""
    for g, t in zip(got, want_terms):
        t = t.double()
        bound = 1e-5 * t.abs().sum().item() + 1e-30
        assert abs(g.double().sum().item() - t.sum().item()) <= bound


# ----------------------------------------------------------------------------------------------
# Operand preparation: non-contiguous operands of the parameters' own dtype.


@pytest.mark.parametrize("dtype", FLOATS)
def test_update_same_dtype_noncontiguous_operands(dtype):
    params = make(SHAPES, [dtype], 0)
    grads = like(params, 10)
    lrs = like(params, 20, positive=True, scale=0.01)  # per-element, the parameters' dtype
    want = ref.sgd_update(params, grads, lrs, 0.01)
    got = HOST.sgd_update(transposed(params), transposed(grads), transposed(lrs), None, 0.01, False)
    assert_equal_lists(got, want)
    assert all(g.is_contiguous() for g in got)
    # in place: targets that are not contiguous are updated through a copy and written back
    ps = transposed([p.clone() for p in params])
    with torch.no_grad():
        assert HOST.sgd_update(ps, transposed(grads), transposed(lrs), None, 0.01, True) == []
    assert_equal_lists([p.contiguous() for p in ps], want)


def test_update_per_element_lr_of_another_dtype_noncontiguous():
    params = make(SHAPES, FLOATS, 1)
    grads = like(params, 11)
    lrs = like(params, 21, positive=True, scale=0.01, dtype=torch.float64)
    lrs[0] = lrs[0].float()  # and one of the parameter's own dtype in the same list
    got = HOST.sgd_update(params, grads, transposed(lrs), None, 0.0, False)
    assert_equal_lists(got, ref.sgd_update(params, grads, lrs))


@pytest.mark.parametrize("dtype", FLOATS + ["mixed"])
def test_backward_step_same_dtype_noncontiguous_operands(dtype):
    v = make(SHAPES, FLOATS if dtype == "mixed" else [dtype], 2)
    h, g = like(v, 12), like(v, 22)
    lrs = like(v, 32, positive=True, scale=0.01)           # per element: lr_grad per element
    next_lrs = like(v, 42, positive=True, scale=0.01)      # per element: u_next
    vo, lg, un = HOST.backward_step(transposed(v), transposed(h), transposed(g), transposed(lrs),
                                    transposed(next_lrs), 0.0, True)
    wv, wl, wu = ref.backward_step(v, h, g, lrs, next_lrs)
    assert_equal_lists(vo, wv)
    assert_equal_lists(un, wu)
    assert_equal_lists(lg, wl)


def test_backward_step_every_lr_form():
    v = make(SHAPES, FLOATS, 3)
    h, g = like(v, 13), like(v, 23)
    per_tensor = [torch.tensor(0.01 * (i + 1), dtype=torch.float64) for i in range(len(v))]
    per_element = like(v, 33, positive=True, scale=0.01)
    shared = torch.tensor(0.05, dtype=torch.float64)
    for lrs, lr_ref in [([shared], shared), (per_tensor, per_tensor), (transposed(per_element), per_element)]:
        for next_lrs, next_f, next_ref in [([], 0.3, 0.3), ([shared], 0.0, shared), (per_tensor, 0.0, per_tensor),
                                           (transposed(per_element), 0.0, per_element)]:
            vo, lg, un = HOST.backward_step(v, h, g, lrs, next_lrs, next_f, True)
            wv, wl, wu = ref.backward_step(v, h, g, lr_ref, next_ref)
            assert_equal_lists(vo, wv)
            assert_equal_lists(un, wu)
            terms = [-(gi.double() * vi.double()) for gi, vi in zip(g, v)]
            if lr_ref is shared:
                assert lg[0].shape == shared.shape and lg[0].dtype == shared.dtype
                assert_sums_close(lg, [torch.cat([t.reshape(-1) for t in terms])])
            elif lr_ref is per_tensor:
                assert [x.shape for x in lg] == [a.shape for a in per_tensor]
                assert_sums_close(lg, terms)
            else:
                assert_equal_lists(lg, wl)


def test_backward_step_sums_span_chunks():
    # one tensor of CHUNK + 1 elements: two chunks, two partial sums, added in order
    v = [torch.full((CHUNK + 1,), 2.0, dtype=torch.float64)]
    g = [torch.full((CHUNK + 1,), 0.5, dtype=torch.float64)]
    _, lg, _ = HOST.backward_step(v, v, g, [torch.tensor(0.1, dtype=torch.float64)], [], 0.0, False)
    assert lg[0].item() == -(CHUNK + 1)


# ----------------------------------------------------------------------------------------------
# An in-place update that fails writes nothing.


def test_inplace_failure_writes_nothing():
    # Operands are prepared before the first launch: a grad the preparation cannot read (a sparse
    # tensor, which passes the shape/dtype/device checks) in the second dtype group must leave the
    # first group's parameters untouched.
    params = make([(4, 5), (6,), (3, 3)], [torch.float32, torch.float64], 4)
    before = [p.clone() for p in params]
    grads = like(params, 14)
    grads[1] = grads[1].to_sparse()
    lrs = like(params, 24, positive=True, scale=0.01)
    with torch.no_grad(), pytest.raises(RuntimeError):
        HOST.sgd_update(params, grads, lrs, None, 0.0, True)
    assert_equal_lists(params, before)


@pytest.mark.parametrize("via", ["kernel", "pymaml.ops"])
def test_inplace_bad_operand_writes_nothing(via):
    # The last step size has a wrong shape: every path raises and no parameter moves.
    from pymaml import ops

    params = make([(4, 5), (6,), (3, 3)], [torch.float32, torch.float64], 5)
    before = [p.clone() for p in params]
    grads = like(params, 15)
    lrs = like(params, 25, positive=True, scale=0.01)
    lrs[-1] = torch.ones(4)
    calls = {"kernel": lambda: torch.ops.pymaml.sgd_update_lrs_(params, grads, lrs, 0.0),
             "pymaml.ops": lambda: ops.sgd_update_(params, grads, lrs)}
    with torch.no_grad(), pytest.raises(ValueError, match=r"sgd_update_(lrs_)?: lr\[2\] has shape \(4,\)"):
        calls[via]()
    with torch.no_grad(), pytest.raises(ValueError, match=r"sgd_update_lrs_: lr\[2\] has shape \(4,\)"):
        HOST.sgd_update(params, grads, lrs, None, 0.0, True)
    assert_equal_lists(params, before)


# ----------------------------------------------------------------------------------------------
# Step-size forms: one description for the CPU and CUDA kernels.


@pytest.mark.parametrize("n", [1, 2])
def test_one_cpu_number_is_a_shared_step_size(n):
    # A params list on another device (meta stands in for a GPU) with one CPU 0-d α: the shared
    # form, read on the host, for one param as for several.
    params = [torch.empty(3, device="meta") for _ in range(n)]
    assert HOST.lr_form("sgd_update_lrs", [torch.tensor(0.1)], params, False) == "shared_host"
    assert HOST.lr_form("sgd_update_lrs", [torch.tensor([0.1])], params, False) == "shared_host"
    assert HOST.lr_form("sgd_update_lrs", [torch.tensor(0.1, device="meta")], params, False) == "shared_device"
    assert HOST.lr_form("backward_step", [], params, True) == "none"
    per = [torch.tensor(0.1, device="meta") for _ in range(n)]
    if n > 1:
        assert HOST.lr_form("sgd_update_lrs", per, params, False) == "per_param"
    # one value per element lives on its parameter's device
    assert HOST.lr_form("sgd_update_lrs", [torch.ones(3, device="meta")] * n, params, False) == "per_param"
    with pytest.raises(ValueError, match=r"sgd_update_lrs: lr\[0\] is on cpu but params\[0\] is on meta"):
        HOST.lr_form("sgd_update_lrs", [torch.ones(3)] * n, params, False)


def test_one_param_shared_step_size_through_the_kernels():
    p, g = make([(4, 3)], [torch.float32], 6), make([(4, 3)], [torch.float32], 16)
    lr = torch.tensor(0.25, dtype=torch.float64)
    want = ref.sgd_update(p, g, lr)
    assert_equal_lists(torch.ops.pymaml.sgd_update_lrs(p, g, [lr], 0.0), want)
    assert_equal_lists(HOST.sgd_update(p, g, [lr], None, 0.0, False), want)
    for step in (torch.ops.pymaml.backward_step, HOST.backward_step):
        _, lg, un = step(p, p, g, [lr], [lr], 0.0, True)
        assert lg[0].shape == () and lg[0].dtype == torch.float64
        assert_equal_lists(un, ref.backward_step(p, p, g, lr, lr)[2])


def test_error_messages_name_the_op():
    p = [torch.ones(2)] * 2
    for name, call in [("sgd_update_lrs", lambda lrs: torch.ops.pymaml.sgd_update_lrs(p, p, lrs, 0.0)),
                       ("sgd_update_lrs_", lambda lrs: torch.ops.pymaml.sgd_update_lrs_(p, p, lrs, 0.0)),
                       ("sgd_update_lrs", lambda lrs: HOST.sgd_update(p, p, lrs, None, 0.0, False)),
                       ("sgd_update_lrs_", lambda lrs: HOST.sgd_update(p, p, lrs, None, 0.0, True))]:
        with pytest.raises(ValueError, match=rf"^{name}: lr has 3 entries but there are 2 params"):
            call([torch.ones(1)] * 3)


# ----------------------------------------------------------------------------------------------
# Kernel-argument tables.


def test_large_kernel_args_rule():
    assert HOST.large_kernel_args(13000, 13000, 9, False)
    assert HOST.large_kernel_args(12010, 12010, 7, False)
    assert not HOST.large_kernel_args(13000, 12000, 9, False)  # a driver older than CUDA 12.1
    assert not HOST.large_kernel_args(12000, 13000, 9, False)  # built with an older toolkit
    assert not HOST.large_kernel_args(13000, 13000, 6, False)  # before Volta
    assert not HOST.large_kernel_args(13000, 13000, 9, True)   # during CUDA graph capture


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("depth", [1, 3, 4, 7])
def test_tables_cover_every_chunk_once(depth, large):
    max_tensors, max_blocks = HOST.table_limits(depth, large)
    assert 0 < max_tensors and 0 < max_blocks
    # many small tensors (tensor slots run out), empty ones, chunk boundaries, and one tensor with
    # more chunks than a table has blocks (continued in the next table)
    numels = [3] * (2 * max_tensors + 5) + [0, 1, CHUNK, CHUNK + 1, 0, 278011, (max_blocks + 2) * CHUNK + 7, 5]
    rows = HOST.tables(numels, depth, large).tolist()
    seen = [(t, c) for _, t, c, _ in rows]
    want = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // CHUNK))]
    assert seen == want  # every chunk of every non-empty tensor once, in order
    launches = {}
    for launch, t, _, slot in rows:
        launches.setdefault(launch, []).append((t, slot))
    assert sorted(launches) == list(range(len(launches)))
    for k in sorted(launches):
        blocks = launches[k]
        slots = {s for _, s in blocks}
        assert len(blocks) <= max_blocks and max(slots) < max_tensors
        assert len({t for t, _ in blocks}) == len(slots)  # one tensor per slot
        if k != max(launches):  # a table is launched only when full
            assert len(blocks) == max_blocks or len(slots) == max_tensors
