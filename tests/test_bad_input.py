"""Bad input: every case raises an error that names the op (or loader) and the offending values.

Ops run on both backends (``pymaml.ops`` on the compiled path and ``pymaml.reference``); the
engines, the BatchNorm and head ops through their public wrappers; Omniglot on tiny fake folders.
A second device is the ``meta`` device when no GPU is present. Non-finite *numbers* (step sizes,
weight decay, ε, max_norm) are rejected on the host; non-finite *tensor values* cannot be checked
without a host sync, so they propagate (NaN in, NaN out at the same places: tests/test_fuzz.py).
"""
import zipfile

import pytest
import torch
import torch.nn.functional as F

from pymaml import MetaOptimizer
from pymaml.batch_norm import batch_norm
from pymaml.data import Omniglot, load_images
from pymaml.data import omniglot as om
from pymaml.functional import Task, adapt, meta_gradient
from pymaml.functional.heads import linear_head_hvp
from pymaml.models import MLP

from test_data import _tiny_archive

OTHER = "cuda" if torch.cuda.is_available() else "meta"
NAN, INF = float("nan"), float("inf")


def one(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


# (call(m) with m the ops module under test, exception, message pattern)
OPS_BAD = {
    "lengths": (lambda m: m.sgd_update([one(3), one(2)], [one(3)], 0.1), ValueError,
                r"sgd_update: params and grads differ in length: 2 vs 1"),
    "lengths_step": (lambda m: m.backward_step([one(3)], [one(3)], [], 0.1), ValueError,
                     r"backward_step: v and grads differ in length: 1 vs 0"),
    "shapes": (lambda m: m.sgd_update([one(3)], [one(4)], 0.1), ValueError,
               r"sgd_update: params\[0\] and grads\[0\] differ in shape: \(3,\) vs \(4,\)"),
    "shapes_fd": (lambda m: m.fd_quotient([one(2, 3)], [one(3, 2)], 1e-3), ValueError,
                  r"fd_quotient: grads_plus\[0\] and grads_minus\[0\] differ in shape: \(2, 3\) vs \(3, 2\)"),
    "integer": (lambda m: m.sgd_update([one(3, dtype=torch.int64)], [one(3, dtype=torch.int64)], 0.1), TypeError,
                r"sgd_update: params\[0\] has dtype torch.int64; only floating-point"),
    "complex": (lambda m: m.fd_perturb([one(3, dtype=torch.complex64)], [one(3, dtype=torch.complex64)], 0.1),
                TypeError, r"fd_perturb: params\[0\] has dtype torch.complex64; only floating-point"),
    "integer_grads": (lambda m: m.sgd_update([one(3)], [one(3, dtype=torch.int32)], 0.1), TypeError,
                      r"sgd_update: params\[0\] has dtype torch.float32 but grads\[0\] has dtype torch.int32"),
    "integer_norm": (lambda m: m.global_norm([one(3), one(2, dtype=torch.uint8)]), TypeError,
                     r"global_norm: tensors\[1\] has dtype torch.uint8"),
    "two_devices": (lambda m: m.sgd_update([one(3)], [one(3, device=OTHER)], 0.1), ValueError,
                    rf"sgd_update: params\[0\] is on cpu but grads\[0\] is on {OTHER}"),
    "two_devices_step": (lambda m: m.backward_step([one(3)], [one(3)], [one(3, device=OTHER)], 0.1), ValueError,
                         rf"backward_step: v\[0\] is on cpu but grads\[0\] is on {OTHER}"),
    "lr_bool": (lambda m: m.sgd_update([one(3)], [one(3)], True), TypeError, r"sgd_update: lr must be a float.*got bool"),
    "lr_str": (lambda m: m.sgd_update([one(3)], [one(3)], "0.1"), TypeError, r"sgd_update: lr must be a float.*got str"),
    "lr_none": (lambda m: m.sgd_update([one(3)], [one(3)], None), TypeError, r"sgd_update: lr must be a float.*got NoneType"),
    "lr_two_numbers": (lambda m: m.sgd_update([one(3), one(3)], [one(3), one(3)], torch.ones(2)), ValueError,
                       r"sgd_update: a single Tensor lr must hold one number, got shape \(2,\)"),
    "lr_list_length": (lambda m: m.sgd_update([one(3), one(2)], [one(3), one(2)], [one(1)]), ValueError,
                       r"sgd_update: lr has 1 entries but there are 2 params"),
    "lr_entry_shape": (lambda m: m.sgd_update([one(3)], [one(3)], [one(2)]), ValueError,
                       r"sgd_update: lr\[0\] has shape \(2,\); expected one number or the shape of params\[0\], \(3,\)"),
    "lr_integer": (lambda m: m.sgd_update([one(3)], [one(3)], torch.tensor(1)), TypeError,
                   r"sgd_update: lr has dtype torch.int64"),
    "lr_device": (lambda m: m.sgd_update([one(3)], [one(3)], torch.tensor(0.1, device=OTHER)), ValueError,
                  rf"sgd_update: lr is on {OTHER} but params\[0\] is on cpu"),
    "lr_entry_device": (lambda m: m.sgd_update([one(3)], [one(3)], [one(3, device=OTHER)]), ValueError,
                        rf"sgd_update: lr\[0\] is on {OTHER} but params\[0\] is on cpu"),
    "lr_nan": (lambda m: m.sgd_update([one(3)], [one(3)], NAN), ValueError, r"sgd_update: lr must be finite, got nan"),
    "lr_inf_in_place": (lambda m: m.sgd_update_([one(3)], [one(3)], INF), ValueError,
                        r"sgd_update_: lr must be finite, got inf"),
    "next_lr_nan": (lambda m: m.backward_step([one(3)], [one(3)], [one(3)], 0.1, NAN), ValueError,
                    r"backward_step: next_lr must be finite, got nan"),
    "next_lr_length": (lambda m: m.backward_step([one(3), one(2)], [one(3), one(2)], [one(3), one(2)], 0.1, [one(1)]),
                       ValueError, r"backward_step: next_lr has 1 entries but there are 2 params"),
    "weight_decay_nan": (lambda m: m.sgd_update([one(3)], [one(3)], 0.1, NAN), ValueError,
                         r"sgd_update: weight_decay must be finite, got nan"),
    "weight_decay_str": (lambda m: m.sgd_update([one(3)], [one(3)], 0.1, "0.1"), TypeError,
                         r"sgd_update: weight_decay must be a real number, got str '0.1'"),
    "eps_zero": (lambda m: m.fd_perturb([one(3)], [one(3)], 0.0), ValueError, r"fd_perturb: eps must be non-zero"),
    "eps_nan": (lambda m: m.fd_perturb([one(3)], [one(3)], NAN), ValueError,
                r"fd_perturb: eps must be finite, got nan"),
    "eps_inf": (lambda m: m.fd_quotient([one(3)], [one(3)], INF), ValueError,
                r"fd_quotient: eps must be finite, got inf"),
    "eps_bool": (lambda m: m.fd_quotient([one(3)], [one(3)], True), TypeError, r"fd_quotient: eps must be a float"),
    "eps_shape": (lambda m: m.fd_perturb([one(3)], [one(3)], torch.ones(2)), ValueError,
                  r"fd_perturb: eps must hold one number, got shape \(2,\)"),
    "norm_empty": (lambda m: m.global_norm([]), ValueError, r"global_norm: tensors is empty"),
    "clip_max_norm": (lambda m: m.clip_grad_norm_([one(3)], 0.0), ValueError,
                      r"clip_grad_norm_: max_norm must be positive, got 0.0"),
    "clip_max_norm_nan": (lambda m: m.clip_grad_norm_([one(3)], NAN), ValueError,
                          r"clip_grad_norm_: max_norm must be positive, got nan"),
    "clip_eps_nan": (lambda m: m.clip_grad_norm_([one(3)], 1.0, NAN), ValueError,
                     r"clip_grad_norm_: eps must be a finite number >= 0, got nan"),
    "single_tensor": (lambda m: m.sgd_update(one(3), [one(3)], 0.1), TypeError,
                      r"sgd_update: params must be a list or tuple of tensors, got a single Tensor"),
}


@pytest.mark.parametrize("case", list(OPS_BAD))
def test_ops_reject_bad_input(backend, case):
    call, exc, pattern = OPS_BAD[case]
    with pytest.raises(exc, match=pattern):
        call(backend)


def test_ops_leave_nothing_half_done_after_bad_input(backend):
    """A rejected in-place call has not written anything."""
    params = [one(3), one(2)]
    with pytest.raises(ValueError):
        backend.sgd_update_(params, [one(3), one(3)], 0.1)
    with pytest.raises(ValueError):
        backend.clip_grad_norm_(params, 1.0, NAN)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)


# ----------------------------------------------------------------------------- BatchNorm and the head
HEAD = dict(x=one(4, 3), weight=one(2, 3), bias=one(2), target=torch.zeros(4, dtype=torch.long),
            v_weight=one(2, 3), v_bias=one(2))
OTHER_BAD = {
    "bn_1d": (lambda: batch_norm(one(5)), ValueError, r"batch_norm: x must be \[N, C, \*\] with at least 2 dims, got shape \[5\]"),
    "bn_integer": (lambda: batch_norm(one(4, 3, dtype=torch.int64)), TypeError, r"batch_norm: x has dtype torch.int64"),
    "bn_weight_shape": (lambda: batch_norm(one(4, 3), one(4)), ValueError,
                        r"batch_norm: weight must have shape \[3\] \(C of x \[4, 3\]\), got \[4\]"),
    "bn_weight_device": (lambda: batch_norm(one(4, 3), one(3, device=OTHER)), ValueError,
                         rf"batch_norm: weight is on {OTHER} but x is on cpu"),
    "bn_one_value": (lambda: batch_norm(one(1, 3)), ValueError,
                     r"batch_norm: expected more than 1 value per channel, got x of shape \[1, 3\]"),
    "head_loss": (lambda: linear_head_hvp(**HEAD, loss="hinge"), ValueError, r"linear_head_hvp: loss must be one of"),
    "head_target": (lambda: linear_head_hvp(**dict(HEAD, target=torch.zeros(3, dtype=torch.long))), ValueError,
                    r"linear_head_hvp: cross_entropy needs target as int64 class indices of shape \[N\] = \[4\], "
                    r"got shape \[3\]"),
    "head_class": (lambda: linear_head_hvp(**dict(HEAD, target=torch.tensor([0, 1, 2, 0]))), IndexError,
                   r"linear_head_hvp: target holds class 2 outside \[0, 2\)"),
    "head_direction": (lambda: linear_head_hvp(**dict(HEAD, v_weight=one(3, 3))), ValueError,
                       r"linear_head_hvp: v_weight must have weight's shape \[2, 3\], got \[3, 3\]"),
    "head_dtype": (lambda: linear_head_hvp(**dict(HEAD, weight=one(2, 3, dtype=torch.float64))), TypeError,
                   r"linear_head_hvp: weight has dtype torch.float64 but x has dtype torch.float32"),
    "head_device": (lambda: linear_head_hvp(**dict(HEAD, v_bias=one(2, device=OTHER))), ValueError,
                    rf"linear_head_hvp: v_bias is on {OTHER} but x is on cpu"),
}


@pytest.mark.parametrize("case", list(OTHER_BAD))
def test_batch_norm_and_head_reject_bad_input(case):
    call, exc, pattern = OTHER_BAD[case]
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------- engines
def mlp_tasks(n=2, rows=(5, 5)):
    torch.manual_seed(0)
    model = MLP((1, 4, 1))
    tasks = [Task((torch.randn(rows[i % len(rows)], 1), torch.randn(rows[i % len(rows)], 1)),
                  (torch.randn(5, 1), torch.randn(5, 1))) for i in range(n)]
    return model, tasks


ENGINE_BAD = {
    "all_frozen": (lambda m, t: meta_gradient(m.requires_grad_(False), t, F.mse_loss), ValueError,
                   r"meta_gradient: no parameters to meta-learn: none of the model's parameters requires grad "
                   r"\(\['body.0.weight', 'body.0.bias', 'head.weight', 'head.bias'\]\)"),
    "constant_loss": (lambda m, t: meta_gradient(m, t, lambda out, y: torch.tensor(2.5)), ValueError,
                      r"meta_gradient: the support loss \([0-9.]+\) does not depend on the parameters"),
    "detached_loss": (lambda m, t: meta_gradient(m, t, lambda out, y: F.mse_loss(out.detach(), y), steps=0),
                      ValueError, r"meta_gradient: the query loss \([0-9.e+-]+\) does not depend on the parameters"),
    "non_scalar_loss": (lambda m, t: meta_gradient(m, t, lambda o, y: F.mse_loss(o, y, reduction="none"),
                                                   task_batching="loop"), ValueError,
                        r"meta_gradient: loss_fn\(output, target\) must return a scalar Tensor .*got shape \(5, 1\)"),
    "non_scalar_loss_vmap": (lambda m, t: meta_gradient(m, t, lambda o, y: F.mse_loss(o, y, reduction="none"),
                                                        task_batching="vmap"), ValueError,
                             r"meta_gradient: loss_fn\(output, target\) must return a scalar Tensor .*got shape \(5, 1\)"),
    "vmap_shapes": (lambda m, t: meta_gradient(m, [t[0], Task((t[1].support[0][:4], t[1].support[1][:4]), t[1].query)],
                                               F.mse_loss, task_batching="vmap"), ValueError,
                    r"meta_gradient: task_batching='vmap' needs tasks of equal shapes; task 1 has x_s of shape "
                    r"\(4, 1\) but task 0 has \(5, 1\)"),
    "stacked_shapes": (lambda m, t: meta_gradient(m, Task((torch.zeros(3, 5, 1), torch.zeros(2, 5, 1)),
                                                          (torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))), F.mse_loss),
                       ValueError, r"meta_gradient: a stacked Task needs a leading task dim on every tensor; y_s has "
                                   r"shape \(2, 5, 1\) but x_s has 3 tasks"),
    "no_tasks": (lambda m, t: meta_gradient(m, [], F.mse_loss), ValueError, r"meta_gradient: tasks is empty"),
    "lr_nan": (lambda m, t: meta_gradient(m, t, F.mse_loss, lr=NAN), ValueError, r"meta_gradient: lr must be finite, got nan"),
    "lr_step_inf": (lambda m, t: meta_gradient(m, t, F.mse_loss, steps=2, lr=[0.1, INF]), ValueError,
                    r"meta_gradient: lr\[1\] must be finite, got inf"),
    "lr_shape": (lambda m, t: meta_gradient(m, t, F.mse_loss, lr=torch.ones(2)), ValueError,
                 r"meta_gradient: lr is a Tensor of shape \(2,\); a shared step size holds one number"),
    "lr_dict_missing": (lambda m, t: meta_gradient(m, t, F.mse_loss, lr={"head.bias": torch.ones(1)}), ValueError,
                        r"meta_gradient: lr has no step size for adapted params \['body.0.weight'"),
    "lr_steps": (lambda m, t: meta_gradient(m, t, F.mse_loss, steps=3, lr=[0.1, 0.1]), ValueError,
                 r"meta_gradient: a per-step lr list must have one entry per inner step: got 2 entries for steps=3"),
    "adapt_unknown": (lambda m, t: meta_gradient(m, t, F.mse_loss, adapt=["head.weight", "tail.bias"]), ValueError,
                      r"meta_gradient: adapt names \['tail.bias'\] are not in params"),
    "integer_param": (lambda m, t: meta_gradient(m, t, F.mse_loss, params={"head.bias": torch.zeros(1, dtype=torch.long)}),
                      TypeError, r"meta_gradient: params\['head.bias'\] has dtype torch.int64"),
    "steps": (lambda m, t: meta_gradient(m, t, F.mse_loss, steps=-1), ValueError,
              r"meta_gradient: steps must be a non-negative int, got -1"),
    "engine": (lambda m, t: meta_gradient(m, t, F.mse_loss, engine="fast"), ValueError,
               r"meta_gradient: engine must be one of"),
    "adapt_lr_nan": (lambda m, t: adapt(m, t[0].support, F.mse_loss, lr=NAN), ValueError, r"inner_loop: lr must be finite, got nan"),
}


@pytest.mark.parametrize("case", list(ENGINE_BAD))
def test_engines_reject_bad_input(case):
    call, exc, pattern = ENGINE_BAD[case]
    model, tasks = mlp_tasks()
    with pytest.raises(exc, match=pattern):
        call(model, tasks)


@pytest.mark.parametrize("engine", ["unrolled", "recompute", "first_order"])
def test_frozen_parameters_are_neither_adapted_nor_meta_learned(engine):
    """requires_grad=False keeps a parameter fixed: the same meta-gradient as leaving it out of params
    (the module's own value), no entry for it, and MetaOptimizer never steps it."""
    model, tasks = mlp_tasks()
    model.body[0].weight.requires_grad_(False)
    res = meta_gradient(model, tasks, F.mse_loss, steps=2, engine=engine)
    assert "body.0.weight" not in res.grads
    explicit = {n: p for n, p in model.named_parameters() if n != "body.0.weight"}
    want = meta_gradient(model, tasks, F.mse_loss, params=explicit, steps=2, engine=engine)
    for n, g in want.grads.items():
        torch.testing.assert_close(res.grads[n], g, rtol=0, atol=0)
    frozen, head = model.body[0].weight.detach().clone(), model.head.weight.detach().clone()
    opt = MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), "maml", F.mse_loss,
                        inner_steps=2, engine=engine)
    for _ in range(3):
        opt.step(tasks)
    assert model.body[0].weight.grad is None
    assert torch.equal(model.body[0].weight, frozen)
    assert not torch.equal(model.head.weight, head)  # the rest did train


def test_non_finite_task_data_propagates_and_does_not_crash():
    """NaN in the data is not a host-side number: it is carried into the meta-gradient (never turned
    into finite values), without an exception or a hang."""
    model, tasks = mlp_tasks()
    tasks[1].support[0][2, 0] = NAN
    for engine in ("unrolled", "recompute", "first_order"):
        res = meta_gradient(model, tasks, F.mse_loss, steps=1, engine=engine)
        assert torch.isnan(res.grads["head.bias"]).all(), engine


# ----------------------------------------------------------------------------- Omniglot folders
def test_omniglot_folder_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"omniglot: {missing}/images_background.zip not found"):
        Omniglot(str(missing), download=False)


def test_omniglot_folder_incomplete(tmp_path):
    _tiny_archive(tmp_path / "images_background.zip", "images_background", 2)
    with pytest.raises(FileNotFoundError, match=rf"omniglot: {tmp_path}/images_evaluation.zip not found"):
        load_images(str(tmp_path), download=False, cache_dir="")


def test_omniglot_character_with_missing_drawings(tmp_path):
    for name in om.ARCHIVES:
        _tiny_archive(tmp_path / f"{name}.zip", name, 2)
    path = tmp_path / "images_evaluation.zip"
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            if not n.endswith("character02/0001_20.png"):
                z.writestr(n, data)
    with pytest.raises(RuntimeError, match=r"omniglot: .*images_evaluation.zip:images_evaluation/Alpha/character02 "
                                           r"holds 19 images, expected 20"):
        load_images(str(tmp_path), download=False, cache_dir="")


def test_omniglot_archive_without_images(tmp_path):
    for name in om.ARCHIVES:
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.writestr(f"{name}/README.txt", "no images here")
    with pytest.raises(RuntimeError, match=r"omniglot: .*images_background.zip holds no .png images"):
        load_images(str(tmp_path), download=False, cache_dir="")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped_byte", "bad_png"])
def test_omniglot_corrupt_zip(tmp_path, damage):
    for name in om.ARCHIVES:
        _tiny_archive(tmp_path / f"{name}.zip", name, 2)
    path = tmp_path / "images_background.zip"
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(b"this is not a zip archive" * 10)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped_byte":  # inside the first member's compressed data: a CRC or inflate error
        data[60] ^= 0xFF
    else:
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        first = sorted(members)[0]
        members[first] = b"\x89PNG\r\n\x1a\n but not really"
        with zipfile.ZipFile(path, "w") as z:
            for n, d in members.items():
                z.writestr(n, d)
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    pattern = (rf"omniglot: {path}:images_background/Alpha/character01/0000_01.png is not a readable image"
               if damage == "bad_png" else rf"omniglot: {path} is not a readable zip archive")
    with pytest.raises(RuntimeError, match=pattern):
        load_images(str(tmp_path), download=False, cache_dir="")
