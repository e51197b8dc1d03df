"""pymaml.ops never hides a failure: a kernel's error reaches the caller (an in-place update is not
applied a second time by a silent rerun), invalid inputs get the reference's message, and a call
that runs on the pure-torch ops while the package runs compiled is counted, warned about once and
reported by ``pymaml.info``."""
import warnings

import pytest
import torch

import pymaml
import pymaml.ops._dispatch
import pymaml.ops.updates
from pymaml import _backend, info, ops, reference

COMPILED = pymaml.backend() == "compiled"
needs_compiled = pytest.mark.skipif(not COMPILED, reason=f"compiled backend unavailable: {pymaml.backend_reason()}")


class KernelFailure(RuntimeError):
    pass


def _failing_after_write(calls):
    """A stand-in for an in-place kernel that writes and then fails (a real kernel failure)."""
    def kernel(params, grads, lr, wd):
        calls.append(1)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        raise KernelFailure("sgd_update_: simulated kernel failure")
    return kernel


@needs_compiled
def test_inplace_kernel_failure_surfaces_and_is_not_rerun(monkeypatch):
    calls = []
    monkeypatch.setattr(pymaml.ops.updates, "_K_UPDATE_", _failing_after_write(calls))
    params = [torch.ones(5), torch.ones(2, 3)]
    grads = [torch.ones(5), torch.ones(2, 3)]
    with pytest.raises(KernelFailure, match="simulated kernel failure"):
        ops.sgd_update_(params, grads, 0.25)
    assert calls == [1]
    # applied once (by the failing kernel), not a second time by a fallback
    assert all(torch.equal(p, torch.full_like(p, 0.75)) for p in params)


@needs_compiled
@pytest.mark.parametrize("name,call", [
    ("_K_UPDATE", lambda: ops.sgd_update([torch.ones(3)], [torch.ones(3)], 0.5)),
    ("_K_UPDATE_LRS", lambda: ops.sgd_update([torch.ones(3)], [torch.ones(3)], [torch.tensor(0.5)])),
    ("_K_STEP", lambda: ops.backward_step([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], 0.5, 0.5)),
])
def test_out_of_place_kernel_failure_surfaces(monkeypatch, name, call):
    def boom(*args):
        raise KernelFailure(f"{name}: simulated kernel failure")
    monkeypatch.setattr(pymaml.ops.updates, name, boom)
    with pytest.raises(KernelFailure, match="simulated kernel failure"):
        call()


@needs_compiled
def test_invalid_input_on_the_direct_path_gets_the_reference_message():
    p, g = [torch.ones(3), torch.ones(2)], [torch.ones(3)]
    with pytest.raises(ValueError) as want:
        reference.sgd_update(p, g, 0.1)
    with pytest.raises(ValueError) as got:
        ops.sgd_update(p, g, 0.1)
    assert str(got.value) == str(want.value) == "sgd_update: params and grads differ in length: 2 vs 1"


def test_fallback_is_counted_warned_once_and_reported(monkeypatch):
    """A device type without kernels while the package runs compiled: simulated on the CPU."""
    monkeypatch.setattr(pymaml.ops._dispatch, "COMPILED", True)
    monkeypatch.setattr(_backend, "_FALLBACKS", {})
    monkeypatch.setattr(_backend, "compiled_available", lambda op, device: False)
    t = [torch.tensor([3.0, 4.0])]
    with pytest.warns(RuntimeWarning, match="global_norm on cpu tensors runs on the pure-torch ops"):
        first = ops.global_norm(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        second = ops.global_norm(t)
    assert float(first) == float(second) == 5.0
    assert _backend.fallback_counts() == {"global_norm on cpu": 2}
    assert "global_norm on cpu: 2" in info.report()


def test_no_fallback_is_reported_as_none(monkeypatch):
    monkeypatch.setattr(_backend, "_FALLBACKS", {})
    ops.global_norm([torch.ones(3)])
    assert _backend.fallback_counts() == {}
    assert "fallbacks       none" in info.report()


def test_compiled_available_is_decided_once(monkeypatch):
    """The answer per (op, device type) does not follow PYMAML_BACKEND changes after import."""
    before = _backend.compiled_available("sgd_update", "cpu")
    monkeypatch.setenv("PYMAML_BACKEND", "torch" if before else "compiled")
    assert _backend.compiled_available("sgd_update", "cpu") == before
    assert _backend.compiled_available("batch_norm_double_backward", torch.device("cpu")) == (
        before and torch._C._dispatch_has_kernel_for_dispatch_key("pymaml::batch_norm_double_backward", "CPU"))
