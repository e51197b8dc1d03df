"""The non-finite flag (found_inf) of the fused ops, on both backends and through the CUDA host prep.

Positions and sizes are apex's multi_tensor_apply tests: a NaN at [0][0] of the first tensor, an Inf
at the last element of the last tensor, one in the middle; tensors of 7777×77, 555×555, 2048·32+1
and 33333 elements, lists of 1 or 55 repeats, with 0-size tensors in between. Each op's flag is
checked against where the value was put (per tensor and as one number), against the pure-torch twin,
and its outputs against the unflagged op (bit for bit, NaN included).
"""
import pytest
import torch

import pymaml
from pymaml import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
PAIRS = [((7777, 77), (555, 555)), ((2048 * 32 + 1,), (33333,))]
# (where, value): apex's three positions
POSITIONS = [("first", NAN), ("middle", -INF), ("last", INF)]


def _lists(pair, repeat, dtype=torch.float32, device="cpu", seed=0):
    """[a, empty, b] * repeat for params, grads (the same tensor objects repeated, as apex does)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(s, generator=g).to(device, dtype) for s in pair)
    ga, gb = (torch.randn(s, generator=g).to(device, dtype) for s in pair)
    empty = torch.empty(0, device=device, dtype=dtype)
    return [a, empty, b] * repeat, [ga, empty.clone(), gb] * repeat


def _poison(ts, where, value):
    """Puts value into a copy of one tensor of ts (its index is returned)."""
    nonempty = [i for i, t in enumerate(ts) if t.numel()]
    k = {"first": nonempty[0], "last": nonempty[-1], "middle": nonempty[len(nonempty) // 2]}[where]
    t = ts[k].clone()
    flat = t.view(-1)
    flat[{"first": 0, "last": flat.numel() - 1, "middle": flat.numel() // 2}[where]] = value
    ts = list(ts)
    ts[k] = t
    return ts, k


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _same(x, y)


def _expect(n, k):
    want = torch.zeros(n)
    if k is not None:
        want[k] = 1.0
    return want


# Each op as f(ops_module, params, grads, found_inf) -> outputs; the flag covers the list of params.
def _update(m, p, g, f):
    return m.sgd_update(p, g, 0.25, found_inf=f)


def _update_per_element(m, p, g, f):
    return m.sgd_update(p, g, [torch.full_like(t, 0.3) for t in p], found_inf=f)


def _update_shared_wd(m, p, g, f):
    return m.sgd_update(p, g, torch.tensor(0.1, device=p[0].device), weight_decay=0.01, found_inf=f)


def _update_inplace(m, p, g, f):
    p = [t.clone() for t in p]
    m.sgd_update_(p, g, [torch.full((1,), 0.2, device=t.device, dtype=t.dtype) for t in p], found_inf=f)
    return p


def _step_float(m, p, g, f):
    # v = p, hvp = g: a non-finite HVP reaches v_out; α a float: g is not read
    return m.backward_step(p, g, p, 0.1, next_lr=0.2, found_inf=f)


def _step_tensor_lr(m, p, g, f):
    # α shared (lr_grad reduced), α_next per element
    return m.backward_step(p, g, g, torch.tensor(0.1, device=p[0].device), [torch.full_like(t, 0.3) for t in p],
                           found_inf=f)


OPS = {"sgd_update": _update, "sgd_update_per_element": _update_per_element,
       "sgd_update_shared_wd": _update_shared_wd, "sgd_update_": _update_inplace,
       "backward_step": _step_float, "backward_step_tensor_lr": _step_tensor_lr}


@pytest.mark.parametrize("repeat", [1, 55])
@pytest.mark.parametrize("pair", PAIRS, ids=["7777x77+555x555", "65537+33333"])
@pytest.mark.parametrize("where,value", POSITIONS, ids=[p for p, _ in POSITIONS])
@pytest.mark.parametrize("op", list(OPS))
def test_flag_marks_the_tensor_holding_nan_or_inf(backend, op, where, value, pair, repeat):
    if repeat == 55 and pair == PAIRS[0] and op not in ("sgd_update", "backward_step"):
        pytest.skip("the 55 × (7777×77 + 555×555) lists run for one form of each op (time on 2 cores)")
    f = OPS[op]
    params, grads = _lists(pair, repeat)
    grads, k = _poison(grads, where, value)
    n = len(params)
    per_tensor = torch.zeros(n)
    out = f(backend, params, grads, per_tensor)
    assert torch.equal(per_tensor, _expect(n, k)), (per_tensor.nonzero().flatten().tolist(), k)
    one = torch.zeros(1)
    _same(f(backend, params, grads, one), out)
    assert one.item() == 1.0
    twin = torch.zeros(n)
    _same(f(R, params, grads, twin), out)  # the pure-torch twin: same outputs, same flags
    assert torch.equal(twin, per_tensor)
    _same(f(backend, params, grads, None), out)  # the flag changes nothing else


@pytest.mark.parametrize("op", list(OPS))
def test_finite_data_leaves_the_flag_alone_and_a_set_flag_stays_set(backend, op, device):
    params, grads = _lists(PAIRS[1], 3, device=device)
    flag = torch.zeros(len(params), device=device)
    OPS[op](backend, params, grads, flag)
    assert not flag.any()
    flag[4] = 1.0
    OPS[op](backend, params, grads, flag)
    assert flag.tolist() == [0.0] * 4 + [1.0] + [0.0] * (len(params) - 5)


@pytest.mark.parametrize("op", list(OPS))
def test_flag_is_a_view_into_a_per_step_record(backend, op, dtype, device):
    """flags[row, step] (a row of a larger tensor) receives the op's flags; the other slots stay 0.
    Every dtype: the check is made in the opmath type, an Inf of float16 data included."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (0,), (1,), (1031,), (3, 4)]
    params = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    grads[3][17] = INF
    record = torch.zeros(2, 4, len(shapes), device=device)
    OPS[op](backend, params, grads, record[1, 2])
    want = torch.zeros_like(record)
    want[1, 2, 3] = 1.0
    assert torch.equal(record, want)
    strided = torch.zeros(len(shapes), 3, device=device)  # a column: stride 3
    OPS[op](backend, params, grads, strided[:, 1])
    assert strided[:, 1].tolist() == [0, 0, 0, 1, 0] and not strided[:, [0, 2]].any()


def test_per_element_step_size_nan_is_flagged(backend):
    p, g = [torch.ones(10), torch.ones(3)], [torch.ones(10), torch.ones(3)]
    lr = [torch.full((10,), 0.1), torch.full((3,), 0.1)]
    lr[1][2] = NAN
    flag = torch.zeros(2)
    backend.sgd_update(p, g, lr, found_inf=flag)
    assert flag.tolist() == [0.0, 1.0]
    flag.zero_()
    backend.backward_step(p, g, g, lr, next_lr=[torch.full((10,), 0.1), torch.full((3,), INF)], found_inf=flag)
    assert flag.tolist() == [0.0, 1.0]


def test_lr_grad_inputs_are_checked_only_when_read(backend):
    """backward_step reads g only for a tensor α (for ∂L/∂α): a NaN there is flagged then only."""
    v, h, g = [torch.ones(4)], [torch.ones(4)], [torch.full((4,), NAN)]
    flag = torch.zeros(1)
    backend.backward_step(v, h, g, 0.1, found_inf=flag)
    assert flag.item() == 0.0
    backend.backward_step(v, h, g, torch.tensor(0.1), found_inf=flag)
    assert flag.item() == 1.0


def test_with_autograd_the_flag_comes_from_the_outputs(backend):
    """Recording autograd, the flag is still set and gradients still flow to the inputs."""
    p = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    g = [torch.randn(5), torch.tensor([1.0, INF, 2.0])]
    flag = torch.zeros(2)
    out = backend.sgd_update(p, g, 0.1, found_inf=flag)
    assert flag.tolist() == [0.0, 1.0]
    out[0].sum().backward()
    assert torch.equal(p[0].grad, torch.ones(5))
    v = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    flag.zero_()
    vo, _, u = backend.backward_step(v, g, g, 0.1, next_lr=0.5, found_inf=flag)
    assert flag.tolist() == [0.0, 1.0]
    (vo[0].sum() + u[0].sum()).backward()
    assert torch.allclose(v[0].grad, torch.full((5,), 1.5))


@pytest.mark.parametrize("op", ["sgd_update", "sgd_update_", "backward_step"])
def test_bad_flags_are_named(backend, op):
    p, g = [torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2)]

    def call(flag):
        if op == "backward_step":
            return backend.backward_step(p, g, g, 0.1, found_inf=flag)
        return getattr(backend, op)(p, g, 0.1, found_inf=flag)

    with pytest.raises(TypeError, match=rf"{op}: found_inf has dtype torch.float64; it must be torch.float32"):
        call(torch.zeros(1, dtype=torch.float64))
    name = "v" if op == "backward_step" else "params"
    with pytest.raises(ValueError, match=rf"{op}: found_inf has shape \(3,\); it must hold one number, or one per "
                                         rf"tensor of {name} \(shape \(2,\)\)"):
        call(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"{op}: found_inf has shape \(2, 1\)"):
        call(torch.zeros(2, 1))
    with pytest.raises(TypeError, match=rf"{op}: found_inf must be a Tensor or None, got float"):
        call(0.0)
    with pytest.raises(ValueError, match=rf"{op}: found_inf is on meta but {name}\[0\] is on cpu"):
        call(torch.zeros(1, device="meta"))
    assert torch.equal(p[0], torch.ones(3))  # nothing was written


def test_empty_lists_and_empty_tensors(backend):
    flag = torch.zeros(1)
    assert backend.sgd_update([], [], 0.1, found_inf=flag) == []
    empty = [torch.empty(0), torch.empty(0, 3)]
    backend.sgd_update(empty, empty, 0.1, found_inf=torch.zeros(2))
    backend.backward_step(empty, empty, empty, torch.tensor(0.1), next_lr=0.1, found_inf=flag)
    assert flag.item() == 0.0


# --------------------------------------------------------------------------- the compiled ops directly
def _kernels():
    if pymaml.backend() != "compiled":
        pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
    return torch.ops.pymaml


def test_overloads_keep_the_default_schema():
    """The flag is an overload (sgd_update.found_inf, ...) or an optional keyword (in place): the
    default overloads are unchanged and resolve as before."""
    k = _kernels()
    assert str(k.sgd_update.default._schema) == (
        "pymaml::sgd_update(Tensor[] params, Tensor[] grads, float lr, float weight_decay) -> Tensor[]")
    assert "Tensor(a!) found_inf" in str(k.sgd_update.found_inf._schema)
    assert "Tensor(b!)? found_inf=None" in str(k.sgd_update_.default._schema)
    p, g = [torch.ones(3)], [torch.full((3,), INF)]
    flag = torch.zeros(1)
    out = k.sgd_update(p, g, 0.5, 0.0, found_inf=flag)  # the packet picks the overload by its arguments
    assert flag.item() == 1.0 and torch.isinf(out[0]).all()
    k.sgd_update(p, g, 0.5, 0.0)  # the default overload


@pytest.mark.parametrize("name", ["sgd_update.found_inf", "sgd_update_lrs.found_inf", "backward_step.found_inf",
                                  "sgd_update_", "sgd_update_lrs_"])
def test_opcheck(name):
    k = _kernels()
    op = getattr(getattr(k, name.split(".")[0]), name.split(".")[1] if "." in name else "default")
    p = [torch.randn(3, 4), torch.randn(5)]
    g = [torch.randn(3, 4), torch.tensor([1.0, NAN, 0.0, 1.0, 2.0])]
    flag = torch.zeros(2)
    if name.startswith("backward_step"):
        args = (p, g, g, [torch.tensor(0.1)], [torch.full((3, 4), 0.2), torch.full((5,), 0.2)], 0.0, True)
    elif "lrs" in name:
        args = ([t.clone() for t in p], g, [torch.full((3, 4), 0.2), torch.tensor(0.3)], 0.0)
    else:
        args = ([t.clone() for t in p], g, 0.2, 0.01)
    torch.library.opcheck(op, args, {"found_inf": flag}, test_utils=("test_schema", "test_faketensor"))


HOST = None
try:
    import pymaml._C  # noqa: F401
    HOST = torch.ops.pymaml_testing
    HOST.tables  # noqa: B018
except Exception:  # noqa: BLE001 - not built here
    HOST = None


@pytest.mark.skipif(HOST is None, reason="needs the compiled extension's test-only ops")
@pytest.mark.parametrize("where,value", POSITIONS, ids=[p for p, _ in POSITIONS])
def test_cuda_host_prep_points_each_table_entry_at_its_flag(where, value):
    """The CUDA ops' host side (device_plan.h) run on CPU tensors: each table entry's flag pointer is
    its tensor's entry, with empty tensors skipped and a list longer than one kernel table."""
    params, grads = _lists(PAIRS[1], 55, seed=1)
    grads, k = _poison(grads, where, value)
    n = len(params)
    flag = torch.zeros(n)
    out = HOST.sgd_update(params, grads, [], 0.25, 0.0, False, flag)
    assert torch.equal(flag, _expect(n, k))
    _same(out, R.sgd_update(params, grads, 0.25))
    flag = torch.zeros(n)
    HOST.backward_step(params, grads, params, [torch.tensor(0.1)], [], 0.5, True, flag)
    assert torch.equal(flag, _expect(n, k))
    one = torch.zeros(1)
    HOST.backward_step(params, grads, params, [], [], 0.0, False, one)
    assert one.item() == 1.0
