"""Property-based tests (hypothesis) of every pymaml op and of the meta-gradient engines.

Each op, called through its public wrapper (``pymaml.ops``, ``pymaml.batch_norm.batch_norm``,
``pymaml.functional.heads.linear_head_hvp``), is compared with a plain-torch computation written in
this file, so the test means the same on the compiled path and under ``PYMAML_BACKEND=torch``.
Generated inputs: 0 to 300 tensors per list, shapes with 0-size and 1-element dimensions and
occasionally long 1-D tensors (across the kernels' vector and chunk boundaries), strides
(transposed, sliced, misaligned storage offset, channels-last, other dense permutations, and
expanded where the operand is read-only), every floating dtype mixed within a list, every step-size
form (float, int, shared one-element Tensor, per-tensor and per-element lists mixing dtypes), and
NaN/Inf in some tensors. The engines are compared with the inner loop written with
``torch.autograd.grad(create_graph=True)``.

Tolerances (docs/design.md: both paths compute half types in float32 and round once):
* element-wise outputs (sgd_update, backward_step's v_out/u_next/per-element lr_grad, fd_perturb,
  fd_quotient, clip_grad_norm_'s scale of 1) are compared bit for bit (NaN where NaN, sign of zero);
* sums (global_norm, lr_grad of a shared or per-tensor step size) against float64 within
  ACC_ROUNDINGS roundings of the accumulation type over the sum of the absolute terms, plus one
  rounding of the output dtype; exactly (one rounding of the output) when the terms are small
  integers, as in a quarter of the examples, whose float32 sums are exact;
* BatchNorm and head HVPs against float64 autograd, no worse than 8x torch's own error in the same
  dtype or a fixed normwise tolerance per dtype (relative to max(1, the output's largest value));
  engines to 1e-9 relative in float64, 2e-4 in float32 (at least 1e-5 with finite-difference HVPs,
  on a smooth model), compared as whole gradient vectors.

Profiles, chosen with ``PYMAML_HYPOTHESIS_PROFILE``: ``ci`` (the default: 1,000 examples per op
test, derandomized), ``long`` (20,000, random) and ``dev`` (50); the engine test runs a fifth of
those. ``pytest --hypothesis-show-statistics`` reports the examples run per test.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import pymaml  # noqa: E402
from pymaml import ops  # noqa: E402
from pymaml.batch_norm import batch_norm as pm_batch_norm  # noqa: E402
from pymaml.functional import Task, meta_gradient  # noqa: E402
from pymaml.functional.heads import linear_head_hvp  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=1000, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=20000, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)  # a quick look while editing
PROFILE = os.environ.get("PYMAML_HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))
# The engines run a whole inner loop per example: a fifth of the examples.
FUZZ_ENGINE = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 5))

pytestmark = pytest.mark.usefixtures("one_thread")

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LOW = (F16, BF16)
FLOATS = (F32, F64, F16, BF16)
MAX_TENSORS = 300


def opmath(dtype):
    return F32 if dtype in LOW else dtype


# ------------------------------------------------------------------------------ generating tensors
# 0-size and 1-element tensors, odd sizes (vector tails), 4-D and 5-D (channels-last) ones
SHAPES = ((), (0,), (1,), (2,), (3,), (5,), (8,), (9,), (17,), (33,), (0, 3), (3, 0), (1, 1), (2, 3), (3, 2),
          (7, 5), (1, 9), (9, 1), (16, 16), (2, 3, 4), (1, 1, 1), (3, 0, 2), (5, 1, 7), (4, 4, 4), (2, 3, 4, 5),
          (1, 3, 1, 3), (2, 0, 3, 3), (3, 2, 3, 3), (1, 1, 1, 1), (2, 5, 3, 1), (2, 3, 2, 2, 3))
# across the CPU kernels' 16384-element chunks; about one list index in 150
LONG = ((1031,), (16385,), (40000,), (65537,))
SPECIALS = (None,) * 14 + ("nan", "inf", "-inf")
LAYOUTS = ("contiguous", "contiguous", "transposed", "sliced", "offset", "channels_last", "permuted", "expanded")


def random_spec(rng: random.Random, dtype=None) -> dict:
    """One list index: shape, dtype, and whether a NaN/Inf goes into its first operand."""
    shape = rng.choice(LONG) if rng.randrange(150) == 0 else rng.choice(SHAPES)
    return dict(shape=shape, dtype=dtype or rng.choice(FLOATS), special=rng.choice(SPECIALS))


def spec_strategy(dtype):
    """About random_spec's distribution as a hypothesis strategy: three draws, shrinking towards a
    0-d float32 tensor without NaN/Inf."""
    return st.fixed_dictionaries(dict(shape=st.sampled_from(SHAPES * 20 + LONG),
                                      dtype=st.just(dtype) if dtype else st.sampled_from(FLOATS),
                                      special=st.sampled_from(SPECIALS)))


def realize(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with the values of ``t`` (except 'expanded', which repeats one slice) in the given strides."""
    d = t.dim()
    if layout == "transposed" and d >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and d >= 1:
        big = t.new_zeros(t.shape[:-1] + (2 * t.shape[-1] + 1,))
        big[..., 1::2] = t
        return big[..., 1::2]
    if layout == "offset":  # storage offset of one element: misaligned for vector loads
        buf = t.new_zeros(t.numel() + 1)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    if layout == "channels_last" and d in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if d == 4 else torch.channels_last_3d)
    if layout in ("channels_last", "permuted") and d >= 2:
        perm = list(range(d))[::-1]
        inv = [perm.index(i) for i in range(d)]
        return t.permute(perm).contiguous().permute(inv)
    if layout == "expanded":
        dims = [i for i, s in enumerate(t.shape) if s > 1]
        if dims:
            return t.narrow(dims[0], 0, 1).expand(t.shape)
    return t.clone()


def operands(specs, rng, read_only=True, scale=1.0, specials=False, dtypes=None):
    """One tensor per spec, N(0, scale²) values in a random layout (expanded only when
    ``read_only``); with ``specials`` the NaN/Inf of the specs; ``dtypes`` overrides the specs'."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    sizes = [math.prod(s["shape"]) for s in specs]
    if specs and specs[0].get("integers"):  # small integers: float32 sums of them are exact
        flat = torch.randint(-3, 4, (sum(sizes),), generator=g).to(F64) * scale
    else:
        flat = torch.randn(sum(sizes), generator=g, dtype=F64) * scale
    layouts = LAYOUTS if read_only else LAYOUTS[:-1]
    out, off = [], 0
    for i, (s, n) in enumerate(zip(specs, sizes)):
        t = flat[off:off + n]
        off += n
        if specials and s["special"] and n:
            t[rng.randrange(n)] = float(s["special"])
        dt = s["dtype"] if dtypes is None else dtypes[i]
        out.append(realize(t.view(s["shape"]).to(dt), rng.choice(layouts)))
    return out


def seeded(shape, seed, salt=0):
    """float64 N(0, 1) values for the single-tensor tests."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7 + salt), dtype=F64)


@st.composite
def tensor_lists(draw, max_tensors=MAX_TENSORS, min_tensors=0):
    """(specs, rng): up to 8 list entries chosen by hypothesis (shrinkable), then in one example
    of 16 up to ``max_tensors`` in all, else up to 12 more, from a seeded generator; one dtype
    for the whole list or a mix; in one example of four, integer values (exact sums)."""
    dtype = draw(st.sampled_from((None, None, F32, F64, F16, BF16)))
    specs = draw(st.lists(spec_strategy(dtype), min_size=min_tensors, max_size=8))
    room = max_tensors - len(specs)
    many = draw(st.integers(0, 15)) == 0
    n_extra = draw(st.integers(0, room if many else min(12, room)))
    integers = draw(st.integers(0, 3)) == 0
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    specs += [random_spec(rng, dtype) for _ in range(n_extra)]
    return [dict(s, integers=integers) for s in specs], rng


# ------------------------------------------------------------------------------ step sizes
def one_number(rng, value):
    shape = rng.choice(((), (1,), (1, 1)))
    return torch.full(shape, value, dtype=F64).to(rng.choice(FLOATS))


@st.composite
def step_sizes(draw, specs, rng, allow_int=True):
    """An lr in one of the forms of docs/design.md for params shaped by ``specs``."""
    kinds = ["float", "shared", "list", "list"] + (["int"] if allow_int else [])
    kind = draw(st.sampled_from(kinds))
    value = draw(st.floats(-2.0, 2.0, allow_nan=False, width=32))
    if kind == "float":
        return value
    if kind == "int":
        return draw(st.sampled_from((0, 1, -1, 2)))
    if kind == "shared":
        return one_number(rng, value)
    per_element = [i for i in range(len(specs)) if rng.random() < 0.5]
    tensors = operands([specs[i] for i in per_element], rng, dtypes=[rng.choice(FLOATS) for _ in per_element])
    out = [one_number(rng, rng.uniform(-1, 1)) for _ in specs]
    for i, t in zip(per_element, tensors):
        out[i] = t
    return out


def lr_at(lr, i, like):
    """α for parameter i in the opmath dtype of ``like`` (a float stays a Python float)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    a = (lr if isinstance(lr, torch.Tensor) else lr[i]).to(opmath(like.dtype))
    return a.reshape(()) if a.numel() == 1 else a


def up(t):
    return t.to(opmath(t.dtype))


# ------------------------------------------------------------------------------ comparisons
def _bits_equal(a, b, signed_zeros=True) -> bool:
    an, bn = a.isnan(), b.isnan()
    a, b = torch.where(an, 0, a), torch.where(bn, 0, b)
    return torch.equal(an, bn) and torch.equal(a, b) and (
        not signed_zeros or torch.equal(torch.signbit(a), torch.signbit(b)))


def same_bits(got, want, what, signed_zeros=True):
    """Tensors, or lists of them, equal bit for bit up to NaN payloads: equal values, NaN at the
    same places, the same sign of zero (unless not ``signed_zeros``), the same shapes and dtypes."""
    if isinstance(want, torch.Tensor):
        got, want = [got], [want]
    assert len(got) == len(want), f"{what}: {len(got)} tensors, expected {len(want)}"
    by_dtype = {}
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, torch.Tensor), f"{what}[{i}]: got {type(g).__name__}"
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} vs {w.dtype}"
        by_dtype.setdefault(g.dtype, []).append(i)
    for idx in by_dtype.values():  # one comparison per dtype over the concatenated tensors
        if _bits_equal(torch.cat([got[i].reshape(-1) for i in idx]), torch.cat([want[i].reshape(-1) for i in idx]),
                       signed_zeros):
            continue
        for i in idx:
            g, w = got[i], want[i]
            if _bits_equal(g, w, signed_zeros):
                continue
            gn, wn = g.isnan(), w.isnan()
            diff = (gn != wn) | (~(gn | wn) & ((g != w) | (signed_zeros & (torch.signbit(g) != torch.signbit(w)))))
            at = tuple(diff.nonzero()[0].tolist())
            raise AssertionError(f"{what}[{i}]: {int(diff.sum())} of {g.numel()} elements differ (dtype {g.dtype}, "
                                 f"shape {tuple(g.shape)}, strides {g.stride()}); first at {list(at)}: "
                                 f"{g[at].item()!r} vs {w[at].item()!r}")


# The CPU kernels add up to 2048 terms in sequence per vector lane (16384-element chunks over 8
# lanes) before combining the chunks in float64: recursive summation's worst case is about that many
# roundings, and constant data comes close (17,393 float16 1000s: 2.5e-5 relative in the norm's
# square). Sums of small integers are exact and compared without it.
ACC_ROUNDINGS = 4096


def exact_terms(terms) -> bool:
    """Whether every partial sum of these terms is exact in float32: integers, |Σ| < 2^24."""
    return all(torch.equal(t, t.round()) for t in terms) and \
        float(sum((t.double().abs().sum() for t in terms), torch.zeros((), dtype=F64))) < 2**24


def check_sum(got, ref64, eps_abs_sum, what, exact=False):
    """``got`` (any float dtype) against a float64 sum: within ACC_ROUNDINGS·Σ eps·|term|
    (``eps_abs_sum``; nothing when ``exact``) plus one rounding of got's dtype; a non-finite sum must
    be reproduced exactly (NaN, or the same infinity)."""
    g, r = float(got.double()), float(ref64)
    fi = torch.finfo(got.dtype)
    if not math.isfinite(r):
        assert (math.isnan(g) and math.isnan(r)) or g == r, f"{what}: {g!r}, expected {r!r}"
        return
    bound = (0.0 if exact else ACC_ROUNDINGS * float(eps_abs_sum)) + fi.eps * abs(r) + fi.tiny
    if math.isinf(g):
        assert abs(r) + bound >= fi.max, f"{what}: {g!r}, expected {r!r} (finite in {got.dtype})"
        return
    assert abs(g - r) <= bound, f"{what}: {g!r} vs {r!r}: error {abs(g - r):.3g} > bound {bound:.3g}"


def unchanged(before, after, what):
    same_bits(after, before, f"{what} (modified by the op)")


def clones(ts):
    return [t.clone() for t in ts]


# ------------------------------------------------------------------------------ sgd_update
def oracle_update(params, grads, lr, wd):
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        P, G = up(p), up(g)
        d = G + wd * P if wd else G
        out.append((P - lr_at(lr, i, p) * d).to(p.dtype))
    return out


weight_decays = st.sampled_from((0.0, 0.0, 1e-4, 0.5, -0.25))


def check_sgd_update(params, grads, lr, wd):
    before = clones(params) + clones(grads)
    out = ops.sgd_update(params, grads, lr, wd)
    assert isinstance(out, list) and len(out) == len(params)
    same_bits(out, oracle_update(params, grads, lr, wd), "sgd_update out")
    for i, (o, p) in enumerate(zip(out, params)):
        assert o.numel() == 0 or o.data_ptr() != p.data_ptr(), f"sgd_update: out[{i}] aliases params[{i}]"
    unchanged(before, params + grads, "sgd_update inputs")


def check_sgd_update_(params, grads, lr, wd):
    want = oracle_update(clones(params), clones(grads), lr, wd)
    strides = [p.stride() for p in params]
    g_before = [g.clone() for g, p in zip(grads, params) if g is not p]
    with torch.no_grad():
        assert ops.sgd_update_(params, grads, lr, wd) is None
    same_bits(params, want, "sgd_update_ params")
    assert [p.stride() for p in params] == strides
    unchanged(g_before, [g for g, p in zip(grads, params) if g is not p], "sgd_update_ grads")


@FUZZ
@given(data=st.data(), lists=tensor_lists())
def test_sgd_update(data, lists):
    specs, rng = lists
    params, grads = operands(specs, rng, specials=True), operands(specs, rng)
    check_sgd_update(params, grads, data.draw(step_sizes(specs, rng)), data.draw(weight_decays))


@FUZZ
@given(data=st.data(), lists=tensor_lists())
def test_sgd_update_in_place(data, lists):
    specs, rng = lists
    params = operands(specs, rng, read_only=False, specials=True)
    # sometimes a gradient is the parameter itself (θ ← θ − α(θ + wd θ))
    grads = [p if rng.random() < 0.05 else g for p, g in zip(params, operands(specs, rng))]
    check_sgd_update_(params, grads, data.draw(step_sizes(specs, rng)), data.draw(weight_decays))


# ------------------------------------------------------------------------------ backward_step
def weighted_abs_sum(terms):
    """Σ_i eps_i·Σ|terms_i|, eps_i the rounding unit of tensor i's accumulation type (float32 for
    all but float64: both paths accumulate float32 tensors in float32 even next to float64 ones)."""
    return sum((torch.finfo(opmath(t.dtype)).eps * t.double().abs().sum() for t in terms), torch.zeros((), dtype=F64))


def lr_sum_check(got, lr, terms, what):
    ref = sum((t.double().sum() for t in terms), torch.zeros((), dtype=F64))
    assert got.shape == lr.shape and got.dtype == lr.dtype, f"{what}: {got.shape}/{got.dtype} vs {lr.shape}/{lr.dtype}"
    check_sum(got.reshape(()), ref, weighted_abs_sum(terms), what, exact_terms(terms))


def check_backward_step(v, hvp, grads, lr, next_lr):
    before = clones(v) + clones(hvp) + clones(grads)
    v_out, lr_grad, u_next = ops.backward_step(v, hvp, grads, lr, next_lr)
    vo = [up(vi) - up(hi) for vi, hi in zip(v, hvp)]
    same_bits(v_out, [o.to(vi.dtype) for o, vi in zip(vo, v)], "backward_step v_out")
    if next_lr is None:
        assert u_next is None
    else:
        same_bits(u_next, [(lr_at(next_lr, i, vi) * o).to(vi.dtype) for i, (o, vi) in enumerate(zip(vo, v))],
                  "backward_step u_next")
    terms = [-(up(gi) * up(vi)) for vi, gi in zip(v, grads)]
    if isinstance(lr, float):
        assert lr_grad is None
    elif isinstance(lr, torch.Tensor):
        lr_sum_check(lr_grad, lr, terms, "backward_step lr_grad (shared)")
    else:
        assert len(lr_grad) == len(lr)
        elementwise = [i for i, a in enumerate(lr) if a.numel() != 1]
        # the compiled kernels return +0.0 where −(g·v) is −0.0: the same gradient
        same_bits([lr_grad[i] for i in elementwise], [terms[i].to(lr[i].dtype) for i in elementwise],
                  "backward_step lr_grad (per element)", signed_zeros=False)
        for i, (a, g) in enumerate(zip(lr, lr_grad)):
            if a.numel() == 1:
                lr_sum_check(g, a, [terms[i]], f"backward_step lr_grad[{i}] (per tensor)")
    unchanged(before, v + hvp + grads, "backward_step inputs")


@FUZZ
@given(data=st.data(), lists=tensor_lists())
def test_backward_step(data, lists):
    specs, rng = lists
    v, hvp, grads = operands(specs, rng, specials=True), operands(specs, rng), operands(specs, rng)
    lr = data.draw(step_sizes(specs, rng, allow_int=False))
    check_backward_step(v, hvp, grads, lr, data.draw(st.one_of(st.none(), step_sizes(specs, rng))))


# ------------------------------------------------------------------------------ finite differences
@st.composite
def epsilons(draw, rng):
    value = draw(st.sampled_from((1e-3, -1e-2, 0.5, 3.0, 1e-6)))
    if draw(st.booleans()):
        return value
    return one_number(rng, value)


def eps_at(eps, like):
    if isinstance(eps, torch.Tensor):
        return eps.to(opmath(like.dtype)).reshape(())
    return float(eps)


def check_fd_perturb(params, direction, eps):
    before = clones(params) + clones(direction)
    plus, minus = ops.fd_perturb(params, direction, eps)
    steps = [eps_at(eps, p) * up(u) for p, u in zip(params, direction)]
    same_bits(plus, [(up(p) + s).to(p.dtype) for p, s in zip(params, steps)], "fd_perturb plus")
    same_bits(minus, [(up(p) - s).to(p.dtype) for p, s in zip(params, steps)], "fd_perturb minus")
    unchanged(before, params + direction, "fd_perturb inputs")


def check_fd_quotient(gp, gm, eps):
    before = clones(gp) + clones(gm)
    out = ops.fd_quotient(gp, gm, eps)
    same_bits(out, [((up(a) - up(b)) / (2 * eps_at(eps, a))).to(a.dtype) for a, b in zip(gp, gm)], "fd_quotient")
    unchanged(before, gp + gm, "fd_quotient inputs")


@FUZZ
@given(data=st.data(), lists=tensor_lists())
def test_fd_perturb(data, lists):
    specs, rng = lists
    check_fd_perturb(operands(specs, rng, specials=True), operands(specs, rng), data.draw(epsilons(rng)))


@FUZZ
@given(data=st.data(), lists=tensor_lists())
def test_fd_quotient(data, lists):
    specs, rng = lists
    check_fd_quotient(operands(specs, rng, specials=True), operands(specs, rng), data.draw(epsilons(rng)))


# ------------------------------------------------------------------------------ norms
def oracle_norm(tensors):
    """(float64 norm, float64 sum of squares): the sum of squares is also Σ|terms|."""
    sq = sum((t.double().square().sum() for t in tensors), torch.zeros((), dtype=F64))
    return sq.sqrt(), sq


def check_norm(got, tensors, what):
    want_dtype = F64 if any(t.dtype == F64 for t in tensors) else F32
    assert got.dim() == 0 and got.dtype == want_dtype and got.device == tensors[0].device, \
        f"{what}: shape {tuple(got.shape)}, dtype {got.dtype}, device {got.device}"
    norm64, sq = oracle_norm(tensors)
    if not torch.isfinite(norm64):
        check_sum(got, norm64, 0.0, what)
        return
    # compared as a sum of squares (the squared result carries twice the norm's rounding)
    squares = [t.to(opmath(t.dtype)).square() for t in tensors]
    if exact_terms(squares):  # then only the square root rounds: got = rnd(√sq)
        check_sum(got, norm64, 0.0, what, exact=True)
    else:
        check_sum(got.double().square(), sq, weighted_abs_sum(squares) + torch.finfo(got.dtype).eps / 4096 * sq,
                  what)


def check_global_norm(tensors):
    before = clones(tensors)
    check_norm(ops.global_norm(tensors), tensors, "global_norm")
    unchanged(before, tensors, "global_norm inputs")


def check_clip_grad_norm_(tensors, max_norm, eps):
    before = clones(tensors)
    norm = ops.clip_grad_norm_(tensors, max_norm, eps)
    check_norm(norm, before, "clip_grad_norm_ norm")
    norm64, _ = oracle_norm(before)
    ratio = max_norm / (norm64 + eps)
    if not torch.isfinite(ratio) or ratio == 0 or ratio > 1 + 1e-4:
        # NaN (a NaN norm), 0 (an infinite norm) or clearly clamped to 1: no rounding involved
        c = 1.0 if ratio > 1 + 1e-4 else ratio.item()
        same_bits(tensors, [(up(b) * c).to(b.dtype) for b in before], f"clip_grad_norm_ tensors (scale {c})")
    else:
        coef = ratio.clamp(max=1.0)
        close(tensors, [(b.double() * coef).to(b.dtype) for b in before],
              lambda dt: 2 * torch.finfo(dt).eps + 64 * torch.finfo(F32).eps, "clip_grad_norm_ tensors")


@FUZZ
@given(lists=tensor_lists(min_tensors=1), scale=st.sampled_from((1.0, 1.0, 1e-3, 300.0)))
def test_global_norm(lists, scale):
    specs, rng = lists
    check_global_norm(operands(specs, rng, scale=scale, specials=True))


@FUZZ
@given(lists=tensor_lists(min_tensors=1), scale=st.sampled_from((1.0, 1e-3, 300.0)),
       max_norm=st.sampled_from((1e-3, 0.5, 2.0, 1e3, 1e9)), eps=st.sampled_from((1e-6, 0.0, 1e-2)))
def test_clip_grad_norm(lists, scale, max_norm, eps):
    specs, rng = lists
    check_clip_grad_norm_(operands(specs, rng, read_only=False, scale=scale, specials=True), max_norm, eps)


def close(got, want, rtol, what):
    """|got − want| ≤ rtol(dtype)·|want| + the dtype's smallest normal, NaN and ±Inf where want has them."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        if not g.numel():
            continue
        g, w = g.double(), w.double()
        fin = torch.isfinite(w)
        bad = (fin & ((g - w).abs() > rtol(want[i].dtype) * w.abs() + torch.finfo(want[i].dtype).tiny)) | \
            (~fin & ~((g == w) | (g.isnan() & w.isnan())))
        if bad.any():
            at = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(f"{what}[{i}]: {int(bad.sum())} of {g.numel()} elements off; first at {list(at)}: "
                                 f"{g[at].item()!r} vs {w[at].item()!r}")


# ------------------------------------------------------------------------------ BatchNorm
NORMWISE = {F64: 1e-10, F32: 2e-4, F16: 2e-2, BF16: 1e-1}


def assert_no_worse(got, want64, same_dtype, what):
    """max|got − want64| ≤ max(tol·max(1, max|want64|), 8·max|torch in the same dtype − want64|)."""
    tol = NORMWISE[got.dtype]
    got, same = got.detach().double(), same_dtype.detach().double()
    scale = want64.abs().max().item() if want64.numel() else 0.0
    own = (same - want64).abs().max().item() if want64.numel() else 0.0
    err = (got - want64).abs().max().item() if want64.numel() else 0.0
    # the floor: inputs are O(1), so rounding errors are O(tol) even where an output cancels to ~0
    bound = max(tol * max(scale, 1.0), 8 * own)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (scale {scale:.3g}, torch's own {own:.3g})"


def bn_derivatives(fn, x, w, b, gy, ggx, ggw):
    ins = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    first = torch.autograd.grad(y, ins, gy.to(y.dtype), create_graph=True)
    outs = [first[0]] + ([first[1]] if w is not None else [])
    dirs = [ggx.to(x.dtype)] + ([ggw.to(w.dtype)] if w is not None else [])
    second = torch.autograd.grad(outs, ins, dirs, allow_unused=True)
    return [y, *first, *(s if s is not None else torch.zeros_like(t) for s, t in zip(second, ins))]


@FUZZ
@given(rnd=st.randoms(use_true_random=False), dtype=st.sampled_from((F64, F32, F32, F16, BF16)),
       affine=st.sampled_from(("both", "weight", "none")), eps=st.sampled_from((1e-5, 1e-3, 0.1)))
def test_batch_norm(rnd, dtype, affine, eps):
    n, c = rnd.choice((1, 2, 3, 5)), rnd.choice((1, 2, 3, 4))
    shape = (n, c) + tuple(rnd.choice((1, 2, 3, 4)) for _ in range(rnd.randrange(4)))
    if math.prod(shape) // c <= 1:
        with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel"):
            pm_batch_norm(torch.zeros(shape, dtype=dtype), None, None, eps)
        return
    seed = rnd.randrange(2**31)
    x64 = seeded(shape, seed, 0) * rnd.choice((1.0, 3.0)) + rnd.choice((0.0, 2.0))
    w64 = seeded((c,), seed, 1) + 1 if affine != "none" else None
    b64 = seeded((c,), seed, 2) if affine == "both" else None
    gy, ggx, ggw = seeded(shape, seed, 3), seeded(shape, seed, 4), seeded((c,), seed, 5)
    layout = rnd.choice(LAYOUTS[:-1])

    def leafs(dt, lay="contiguous"):
        x = realize(x64.to(dt), lay).requires_grad_()
        return [x] + [None if t is None else t.to(dt).requires_grad_() for t in (w64, b64)]

    native = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, eps)  # noqa: E731
    got = bn_derivatives(lambda x, w, b: pm_batch_norm(x, w, b, eps), *leafs(dtype, layout), gy, ggx, ggw)
    want = bn_derivatives(native, *leafs(F64), gy, ggx, ggw)
    same = bn_derivatives(native, *leafs(dtype), gy, ggx, ggw) if dtype != F64 else want
    names = ["y", "dx", "dw", "db", "d2x", "d2w", "d2b"]
    names = names[:1] + [n for n, t in zip(names[1:4], (x64, w64, b64)) if t is not None] + \
        [n for n, t in zip(names[4:], (x64, w64, b64)) if t is not None]
    for name, g, w, s in zip(names, got, want, same):
        assert g.shape == w.shape and g.dtype == s.dtype, f"batch_norm {name}: {g.shape}/{g.dtype}"
        assert_no_worse(g, w, s, f"batch_norm {name} (x {shape} {dtype} {layout}, eps {eps})")


# ------------------------------------------------------------------------------ linear-head HVP
def head_oracle(x, w, b, target, vw, vb, loss, dtype):
    """Autograd in ``dtype``: (H·(vw, vb), ∂/∂x ⟨∇_{W,b} L, (vw, vb)⟩)."""
    x = x.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_() if b is not None else None
    z = F.linear(x, w, b)
    L = F.cross_entropy(z, target) if loss == "cross_entropy" else F.mse_loss(z, target.to(dtype))
    ins = [w] + ([b] if b is not None else [])
    g = torch.autograd.grad(L, ins, create_graph=True)
    dot = (g[0] * vw.to(dtype)).sum()
    if b is not None and vb is not None:
        dot = dot + (g[1] * vb.to(dtype)).sum()
    if not dot.requires_grad:  # N = 0: the loss is constant
        return [torch.zeros_like(t) for t in ins] + [torch.zeros_like(x)]
    return list(torch.autograd.grad(dot, ins + [x], allow_unused=True, materialize_grads=True))


@FUZZ
@given(rnd=st.randoms(use_true_random=False), dtype=st.sampled_from((F64, F32, F32, F16, BF16)),
       loss=st.sampled_from(("cross_entropy", "mse")), bias=st.sampled_from(("both", "bias", "none")))
def test_linear_head_hvp(rnd, dtype, loss, bias):
    n, f, c = rnd.choice((0, 1, 2, 5, 9)), rnd.choice((1, 2, 3, 8)), rnd.choice((1, 2, 3, 5))
    seed = rnd.randrange(2**31)
    spec = lambda shape, k: seeded(shape, seed, k)  # noqa: E731
    x64, w64, vw64 = spec((n, f), 0), spec((c, f), 1), spec((c, f), 2)
    b64 = spec((c,), 3) if bias != "none" else None
    vb64 = spec((c,), 4) if bias == "both" else None
    if loss == "cross_entropy":
        target = torch.randint(c, (n,), generator=torch.Generator().manual_seed(seed))
    else:
        target = spec((n, c), 5)
    lay = lambda t: realize(t.to(dtype), rnd.choice(LAYOUTS[:-1]))  # noqa: E731
    args = [lay(x64), lay(w64), None if b64 is None else lay(b64),
            target if loss == "cross_entropy" else lay(target), lay(vw64), None if vb64 is None else lay(vb64)]
    hw, hb, gx = linear_head_hvp(*args, loss)
    assert (hb is None) == (b64 is None)
    want = head_oracle(x64, w64, b64, target, vw64, vb64, loss, F64)
    same = head_oracle(x64, w64, b64, target, vw64, vb64, loss, dtype) if dtype != F64 else want
    got = [hw] + ([hb] if hb is not None else []) + [gx]
    for name, g, w, s in zip(("hvp_weight", "hvp_bias" if hb is not None else "grad_x", "grad_x"), got, want, same):
        assert g.shape == w.shape and g.dtype == dtype, f"linear_head_hvp {name}: {g.shape}/{g.dtype}"
        assert_no_worse(g, w, s, f"linear_head_hvp {name} ({loss}, N={n} F={f} C={c}, {dtype})")


# ------------------------------------------------------------------------------ engines
class Smooth(nn.Module):
    """A tanh MLP: smooth, so central finite differences converge (no ReLU kinks)."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def engine_oracle(model, params, tasks, lr, steps, step_weights, adapt, wd):
    """Plain autograd through the unrolled inner loop, mean over tasks; (meta-loss, grads of θ and α)."""
    names = list(params)
    ad = [n for n in names if adapt is None or n in adapt]
    lr_leaves = []

    def collect(x):
        if isinstance(x, torch.Tensor):
            lr_leaves.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)

    collect(lr)
    total = 0.0
    for t in tasks:
        theta = dict(params)
        meta = 0.0
        for i in range(steps):
            a = lr[i] if isinstance(lr, list) else lr
            ls = F.mse_loss(torch.func.functional_call(model, theta, (t.support[0],)), t.support[1])
            g = torch.autograd.grad(ls, [theta[n] for n in ad], create_graph=True)
            for n, gi in zip(ad, g):
                ai = a[n] if isinstance(a, dict) else a
                ai = ai.reshape(()) if isinstance(ai, torch.Tensor) and ai.numel() == 1 else ai
                theta[n] = theta[n] - ai * (gi + wd * theta[n])
            if step_weights is not None:
                meta = meta + step_weights[i] * F.mse_loss(
                    torch.func.functional_call(model, theta, (t.query[0],)), t.query[1])
        if step_weights is None or steps == 0:
            meta = F.mse_loss(torch.func.functional_call(model, theta, (t.query[0],)), t.query[1])
        total = total + meta
    total = total / len(tasks)
    uniq = list({id(t): t for t in lr_leaves}.values())
    grads = torch.autograd.grad(total, [params[n] for n in names] + uniq, allow_unused=True, materialize_grads=True)
    return total, dict(zip(names, grads[:len(names)])), dict(zip(map(id, uniq), grads[len(names):]))


@FUZZ_ENGINE
@given(rnd=st.randoms(use_true_random=False),
       engine=st.sampled_from(("unrolled", "recompute", "first_order", "auto")),
       hvp=st.sampled_from(("double_backward", "jvp", "finite_difference", "auto")),
       lr_kind=st.sampled_from(("float", "shared", "per_tensor", "per_element", "per_step")),
       batching=st.sampled_from(("loop", "vmap", "auto")), weighted=st.booleans(),
       wd=st.sampled_from((0.0, 0.0, 0.01)), dtype=st.sampled_from((F64, F64, F32)))
def test_engines_vs_autograd(rnd, engine, hvp, lr_kind, batching, weighted, wd, dtype):
    torch.manual_seed(rnd.randrange(2**31))
    d_in, d_out = rnd.choice((1, 2)), rnd.choice((1, 2))
    sizes = [d_in] + [rnd.choice((1, 3, 5)) for _ in range(rnd.randrange(1, 3))] + [d_out]
    model = Smooth(sizes).to(dtype)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    names = list(params)
    adapt = None if rnd.random() < 0.7 else [n for n in names if rnd.random() < 0.5] or names[-1:]
    ad = [n for n in names if adapt is None or n in adapt]
    steps = rnd.randrange(0, 4)
    n_s, n_q = rnd.choice((1, 3, 6)), rnd.choice((1, 4))
    tasks = [Task((torch.randn(n_s, d_in, dtype=dtype), torch.randn(n_s, d_out, dtype=dtype)),
                  (torch.randn(n_q, d_in, dtype=dtype), torch.randn(n_q, d_out, dtype=dtype)))
             for _ in range(rnd.randrange(1, 4))]

    def one_lr():
        if lr_kind == "float":
            return rnd.uniform(0.01, 0.3)
        if lr_kind == "shared":
            return torch.tensor(rnd.uniform(0.01, 0.3), dtype=dtype)
        if lr_kind == "per_tensor":
            return {n: torch.full((1,), rnd.uniform(0.01, 0.3), dtype=dtype) for n in ad}
        return {n: torch.rand(params[n].shape, dtype=dtype) * 0.3 for n in ad}

    if lr_kind == "per_step":  # MAML++: one entry per step, here alternating forms
        lr = [{n: torch.rand(params[n].shape, dtype=dtype) * 0.3 for n in ad} if rnd.random() < 0.5
              else torch.tensor(rnd.uniform(0.01, 0.3), dtype=dtype) for _ in range(steps)]
    else:
        lr = one_lr()
    step_weights = [rnd.uniform(0.1, 1.0) for _ in range(steps)] if weighted and steps else None
    lr_req = _lr_requires_grad(lr)
    res = meta_gradient(model, tasks, F.mse_loss, params={n: p.detach() for n, p in params.items()}, steps=steps,
                        lr=lr, engine=engine, hvp=hvp, step_weights=step_weights, adapt=adapt,
                        task_batching=batching, weight_decay=wd)
    meta, grads, lr_grads = engine_oracle(model, params, tasks, lr_req, steps, step_weights, adapt, wd)
    if engine == "first_order":
        return _check_first_order(res, model, params, tasks, lr, steps, step_weights, adapt, wd)
    tol = {F64: 1e-9, F32: 2e-4}[dtype]
    if res.hvp == "finite_difference":
        tol = max(tol, 1e-5)
    flat = lambda d: torch.cat([d[n].reshape(-1).double() for n in names])  # noqa: E731
    a, b = flat(res.grads), flat(grads)
    assert (a - b).norm() <= tol * b.norm() + 1e-12, \
        f"{engine}/{res.hvp}/{res.task_batching}: meta-gradient off by {((a - b).norm() / b.norm()).item():.3g}"
    assert abs(res.meta_loss.item() - meta.item()) <= tol * abs(meta.item()) + 1e-12, (res.meta_loss, meta)
    _check_lr_grads(res.lr_grads, lr, lr_req, lr_grads, tol)


def _lr_requires_grad(lr):
    """The same step-size structure with every tensor a fresh leaf (identity kept per object)."""
    memo = {}

    def one(x):
        if isinstance(x, torch.Tensor):
            if id(x) not in memo:
                memo[id(x)] = x.detach().clone().requires_grad_()
            return memo[id(x)]
        if isinstance(x, dict):
            return {k: one(v) for k, v in x.items()}
        if isinstance(x, list):
            return [one(v) for v in x]
        return x

    return one(lr)


def _check_lr_grads(got, lr, lr_req, want_by_id, tol):
    if isinstance(lr, torch.Tensor):
        w = want_by_id[id(lr_req)]
        assert (got - w).abs().max() <= tol * max(w.abs().max().item(), 1e-3) + 1e-12, f"lr grad {got} vs {w}"
    elif isinstance(lr, dict):
        for k in lr:
            _check_lr_grads(got[k], lr[k], lr_req[k], want_by_id, tol)
    elif isinstance(lr, list):
        for g, a, b in zip(got, lr, lr_req):
            _check_lr_grads(g, a, b, want_by_id, tol)
    else:
        assert got is None


def _check_first_order(res, model, params, tasks, lr, steps, step_weights, adapt, wd):
    """FOMAML: the inner loop detached; the meta-gradient is Σ_i w_i ∇L_q(θ_i) (or ∇L_q(θ_K))."""
    names = list(params)
    ad = [n for n in names if adapt is None or n in adapt]
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in tasks:
        theta = {n: p.detach() for n, p in params.items()}
        fixed = {n: params[n] for n in names if n not in ad}

        def q_grad(th):
            cur = {n: th[n].detach().requires_grad_() for n in ad}
            cur.update(fixed)
            lq = F.mse_loss(torch.func.functional_call(model, cur, (t.query[0],)), t.query[1])
            return dict(zip(names, torch.autograd.grad(lq, [cur[n] for n in names], allow_unused=True,
                                                       materialize_grads=True)))
        weights = step_weights if step_weights is not None and steps else None
        for i in range(steps):
            a = lr[i] if isinstance(lr, list) else lr
            cur = {n: theta[n].requires_grad_() if n in ad else params[n] for n in names}
            ls = F.mse_loss(torch.func.functional_call(model, cur, (t.support[0],)), t.support[1])
            g = torch.autograd.grad(ls, [cur[n] for n in ad])
            for n, gi in zip(ad, g):
                ai = a[n] if isinstance(a, dict) else a
                ai = ai.reshape(()) if isinstance(ai, torch.Tensor) and ai.numel() == 1 else ai
                theta[n] = (theta[n].detach() - ai * (gi + wd * theta[n].detach())).detach()
            if weights is not None:
                for n, v in q_grad(theta).items():
                    total[n] += weights[i] * v / len(tasks)
        if weights is None:
            for n, v in q_grad(theta).items():
                total[n] += v / len(tasks)
    tol = 1e-9 if params[names[0]].dtype == F64 else 2e-4
    a = torch.cat([res.grads[n].reshape(-1).double() for n in names])
    b = torch.cat([total[n].reshape(-1).double() for n in names])
    assert (a - b).norm() <= tol * b.norm() + 1e-12, f"first_order off by {((a - b).norm() / b.norm()).item():.3g}"


# ------------------------------------------------------------------------------ fixed examples
def fixed_lr(form, shapes, rng):
    """A step size of ``form`` for tensors of ``shapes`` (positive, as a real inner loop uses)."""
    if form == "float":
        return 0.05
    if form == "shared":
        return torch.tensor(0.07)
    if form == "per_tensor":
        return [torch.full((1,), 0.01 * (i % 7 + 1)) for i in range(len(shapes))]
    specs = [dict(shape=s, dtype=F32, special=None) for s in shapes]
    return [t.abs() * 0.1 for t in operands(specs, rng, dtypes=[F32] * len(specs))]


LR_FORMS = ("float", "shared", "per_tensor", "per_element")


@pytest.mark.parametrize("form", LR_FORMS)
def test_optim_style_seven_steps(form):
    """As PyTorch's test_optim: the multi-tensor in-place update against the one-tensor-at-a-time
    update and a for-loop in plain torch, every state tensor compared after each of 7 steps; a
    gradient is None at step 3 (that tensor is left out, as optimizers do), a frozen layer never
    steps, a zero-size parameter is appended, and the list mixes every floating dtype."""
    rng = random.Random(0)
    names = ["w", "b", "frozen", "h16", "hbf", "d", "s", "empty"]
    shapes = [(5, 3), (5,), (4, 4), (2, 7), (6,), (3,), (), (0,)]
    dtypes = [F32, F32, F32, F16, BF16, F64, F32, F32]
    init = dict(zip(names, operands([dict(shape=s, dtype=d, special=None) for s, d in zip(shapes, dtypes)], rng,
                                     read_only=False)))
    trainable = [n for n in names if n != "frozen"]
    lrs = dict(zip(names, fixed_lr(form, shapes, rng))) if form.startswith("per") else fixed_lr(form, shapes, rng)
    fused, single, plain = ({n: t.clone() for n, t in init.items()} for _ in range(3))
    for step in range(7):
        grads = dict(zip(trainable, operands([dict(shape=init[n].shape, dtype=init[n].dtype, special=None)
                                              for n in trainable], rng)))
        if step == 3:
            grads["b"] = None
        active = [n for n in trainable if grads[n] is not None]
        lr_of = (lambda ns: [lrs[n] for n in ns]) if isinstance(lrs, dict) else (lambda ns: lrs)  # noqa: E731
        with torch.no_grad():
            ops.sgd_update_([fused[n] for n in active], [grads[n] for n in active], lr_of(active), 0.01)
            for n in active:
                ops.sgd_update_([single[n]], [grads[n]], lr_of([n]), 0.01)
        for n in active:
            p = plain[n]
            a = lr_at(lrs[n] if isinstance(lrs, dict) else lrs, 0, p) if not isinstance(lrs, float) else lrs
            plain[n] = (up(p) - a * (up(grads[n]) + 0.01 * up(p))).to(p.dtype)
        for n in names:
            same_bits(fused[n], single[n], f"step {step}: {n}, all tensors at once vs one at a time")
            same_bits(fused[n], plain[n], f"step {step}: {n} vs plain torch")
        same_bits(fused["frozen"], init["frozen"], "the frozen layer stepped")
        if step == 3:
            assert not torch.equal(fused["w"], init["w"])


def test_optim_style_differentiable_seven_steps():
    """Seven out-of-place steps with learned per-tensor step sizes, a None gradient at step 3, a frozen
    layer and a zero-size tensor: gradients of a loss of θ_7 with respect to θ_0, every gradient and
    every α against the same chain written with plain torch ops (float64 and float32 mixed)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (5,), (3,), (), (0,)]
    dtypes = [F64, F64, F32, F64, F64]
    theta0 = [torch.randn(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)]
    frozen = torch.randn(4, 4, dtype=F64)
    alphas = [torch.full((1,), 0.1 * (i + 1), dtype=d, requires_grad=True) for i, d in enumerate(dtypes)]
    grads = [[torch.randn(s, dtype=d, requires_grad=True) for s, d in zip(shapes, dtypes)] for _ in range(7)]

    def run(step_fn):
        th = list(theta0)
        for k in range(7):
            idx = [i for i in range(len(th)) if not (k == 3 and i == 1)]
            new = step_fn([th[i] for i in idx], [grads[k][i] for i in idx], [alphas[i] for i in idx])
            for i, t in zip(idx, new):
                th[i] = t
        loss = sum((t.double() ** 2 * (j + 1)).sum() for j, t in enumerate(th)) + frozen.sum()
        return torch.autograd.grad(loss, theta0 + alphas + [g for gs in grads for g in gs], allow_unused=True,
                                   materialize_grads=True)

    def plain(ps, gs, als):
        return [p - a.to(p.dtype) * (g + 0.01 * p) for p, g, a in zip(ps, gs, als)]

    got = run(lambda ps, gs, als: ops.sgd_update(ps, gs, als, 0.01))
    want = run(plain)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5 if g.dtype == F32 else 1e-12, atol=1e-12, msg=f"gradient {i}")


SPREAD = [(3, 2), (0,), (7,), (0, 4), (1,), (), (5, 1, 3), (0,)]


@pytest.mark.parametrize("n", [600, 4000])
def test_foreach_style_many_tensors_with_empty_ones(n):
    """As PyTorch's test_foreach: 600 and 4,000 tensors with empty ones in between, every op, every
    dtype in one list."""
    rng = random.Random(n)
    specs = [dict(shape=SPREAD[i % len(SPREAD)], dtype=FLOATS[i % 4], special=None) for i in range(n)]
    shapes = [s["shape"] for s in specs]
    a, b, c = (operands(specs, rng) for _ in range(3))
    check_sgd_update(a, b, fixed_lr("per_element", shapes, rng), 0.01)
    check_backward_step(a, b, c, fixed_lr("per_tensor", shapes, rng), fixed_lr("shared", shapes, rng))
    check_global_norm(a)
    if n > 1000:  # the other ops walk the lists the same way
        return
    check_sgd_update_([t.clone() for t in a], b, fixed_lr("per_tensor", shapes, rng), 0.0)
    check_backward_step(a, b, c, torch.tensor(0.1, dtype=F64), fixed_lr("per_element", shapes, rng))
    check_fd_perturb(a, b, torch.tensor(1e-3))
    check_fd_quotient(a, b, 1e-3)
    check_clip_grad_norm_([t.clone() for t in a], 1.0, 1e-6)


@pytest.mark.parametrize("value", [300.0, 1000.0, 65504.0])
def test_float16_norms_whose_squares_overflow_stay_finite(value):
    """300² = 90,000 and 65504² overflow float16 (max 65,504); the norm must be accumulated wider."""
    tensors = [torch.full((n,), value, dtype=F16) for n in (1, 7, 1000, 0, 16385)]
    norm = ops.global_norm(tensors)
    assert torch.isfinite(norm), f"global_norm of float16 {value}s is {norm}"
    check_global_norm(tensors)
    clipped = [t.clone() for t in tensors]
    check_clip_grad_norm_(clipped, 1.0, 1e-6)
    assert all(torch.isfinite(t).all() for t in clipped)


APEX_SIZES = [(7777, 77), (555, 555), (2048 * 32 + 1,), (33333,)]


# 55 tensors of the two large sizes are 17-33 million elements per list: a minute on a 2-core CI
# machine, so they run with the slow tests (pytest -m slow); their multi-tensor chunking is that of
# the two smaller sizes.
APEX_CASES = [pytest.param(s, n, marks=[pytest.mark.slow] if n == 55 and math.prod(s) > 100000 else [])
              for s in APEX_SIZES for n in (1, 55)]


@pytest.mark.parametrize("shape,count", APEX_CASES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_apex_sizes(shape, count):
    """apex's multi_tensor_apply sizes (7777x77, 555x555, 2048*32+1, 33333) with 1 or 55 tensors."""
    rng = random.Random(count)
    g = torch.Generator().manual_seed(count)
    a, b, c = ([torch.randn(shape, generator=g) for _ in range(count)] for _ in range(3))
    check_sgd_update(a, b, 0.01, 0.0)
    check_backward_step(a, b, c, torch.tensor(0.1), 0.2)
    check_global_norm(a)
    if count == 1 or math.prod(shape) < 100000:  # the other ops go through the same kernels' loops
        check_sgd_update_([t.clone() for t in a], b, fixed_lr("per_tensor", [shape] * count, rng), 0.0)
        check_fd_perturb(a, b, 1e-3)
        check_fd_quotient(a, b, 1e-3)
        check_clip_grad_norm_([t.clone() for t in a], 1.0, 1e-6)


def test_reductions_do_not_depend_on_the_thread_count():
    """docs/design.md: reductions accumulate per fixed-size chunk and combine the chunks in a fixed
    order, so the compiled kernels give the same bits on 1 and 2 threads."""
    if pymaml.backend() != "compiled":
        pytest.skip("a property of the compiled kernels; the pure-torch path inherits torch's reductions")
    rng = random.Random(0)
    specs = [dict(shape=(555, 555), dtype=F32, special=None)] * 3 + [dict(shape=(33333,), dtype=F16, special=None)]
    a, b, c = (operands(specs, rng) for _ in range(3))
    lr = torch.tensor(0.1)
    results = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ops.global_norm(a), ops.backward_step(a, b, c, lr)[1]))
    finally:
        torch.set_num_threads(n)
    same_bits(list(results[0]), list(results[1]), "global_norm and the shared lr_grad on 1 vs 2 threads")


def test_batch_norm_gradients_with_a_layout_channels_last_only_through_size_one_dims():
    """Found by test_batch_norm: x of shape [1, 2, 1, 2] with strides [1, 1, 2, 2] (channels-last for
    ATen, as its size-1 dims do not count) and a contiguous upstream gradient made ATen's CPU batch
    norm backward return wrong grad_weight and grad_bias; pymaml passes both in x's layout."""
    torch.manual_seed(0)
    x64 = torch.randn(1, 2, 1, 2, dtype=F64) * 3 + 2
    x = x64.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0).requires_grad_()
    assert x.stride() == (1, 1, 2, 2)
    w, b = torch.randn(2, dtype=F64, requires_grad=True), torch.randn(2, dtype=F64, requires_grad=True)
    gy = torch.randn(1, 2, 1, 2, dtype=F64)
    got = torch.autograd.grad(pm_batch_norm(x, w, b, 1e-5), (x, w, b), gy)
    x2 = x64.clone().requires_grad_()
    want = torch.autograd.grad(F.batch_norm(x2, None, None, w, b, True, 0.0, 1e-5), (x2, w, b), gy)
    for name, g, r in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)
