"""The one backend decision: compiled kernels (``pymaml._C``) or the pure-torch reference.

Decided once, at import: ``PYMAML_BACKEND=torch`` forces the reference; otherwise ``pymaml._C`` is
imported, its Python-side registrations (:mod:`pymaml._registration`) run, and a tiny probe is run
on the CPU. CUDA kernels are probed the first time a CUDA tensor reaches an op. Why a compiled path
is missing is recorded (not built, built for another torch, failed probe) and reported by
``pymaml.backend_reason()`` and ``python -m pymaml.info``; a fallback warns once through
``warnings``.

:func:`compiled_available` is the one question every op wrapper asks ("does this op run compiled
for tensors of this device type?"); its answer is fixed per (op, device type) once asked. When the
package runs compiled but a call has to take the pure-torch path (a device type without kernels),
:func:`note_fallback` counts it and warns once per op and device type; ``python -m pymaml.info``
prints the counts (:func:`fallback_counts`).
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

# device type -> (compiled usable?, reason)
_DEVICE_STATE: Dict[str, tuple] = {}
# (op, device type) -> compiled usable?
_OP_STATE: Dict[Tuple[str, str], bool] = {}
# (op, device type) -> calls that ran on the pure-torch ops although the package runs compiled
_FALLBACKS: Dict[Tuple[str, str], int] = {}
_STATE = {"backend": "torch", "reason": "", "loaded": False, "error": None}


def build_info() -> dict:
    """What setup.py recorded at build time (empty when the package was never built)."""
    try:
        from . import _build_info as b
    except ImportError:
        return {}
    return {k: getattr(b, k) for k in dir(b) if k.isupper()}


_REBUILD = "rebuild it against the running torch with `pip install --no-build-isolation -e .` in the source tree"


def _binaries() -> list:
    return glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd"))


def _why_stale() -> Optional[str]:
    """Why the built pymaml._C must not be loaded (it was built for another torch or CUDA), or None.
    Checked before importing it: a binary built against another torch can crash the process."""
    info = build_info()
    if not _binaries() or not info.get("BUILT", True):
        return None
    built_for = info.get("TORCH_VERSION")
    if built_for and built_for != torch.__version__:
        return (f"built for another torch: pymaml._C was built against torch {built_for} but torch "
                f"{torch.__version__} is running; {_REBUILD}")
    cuda = info.get("CUDA_VERSION", torch.version.cuda)
    if cuda != torch.version.cuda:
        return (f"built for another CUDA: pymaml._C was built with torch for CUDA {cuda} but the running torch "
                f"is for CUDA {torch.version.cuda}; {_REBUILD}")
    return None


def _why_import_failed(err: Exception) -> str:
    info = build_info()
    binaries = _binaries()
    if not binaries:
        if info.get("BUILT") is False and info.get("BUILD_ERROR"):
            return (f"not built: compiling failed at install time ({info['BUILD_ERROR']}); fix that error "
                    f"(a C++ compiler, the CUDA toolkit) and reinstall with `pip install --no-build-isolation -e .`")
        if os.environ.get("PYMAML_NO_EXTENSION"):
            return ("not built: installed with PYMAML_NO_EXTENSION=1; reinstall without it, with "
                    "`pip install --no-build-isolation -e .`")
        return ("not built: pymaml._C is missing (install with `pip install --no-build-isolation -e .`, "
                "without PYMAML_NO_EXTENSION)")
    if "undefined symbol" in str(err):
        return (f"built for another torch: pymaml._C does not link against torch {torch.__version__} "
                f"({err}); rebuild with `pip install --no-build-isolation -e .`")
    return f"failed to load pymaml._C: {type(err).__name__}: {err}; {_REBUILD}"


def _probe(device: str) -> Optional[str]:
    """Runs one fused update on a tiny tensor; returns None if right, else why not."""
    try:
        p = torch.full((3,), 1.0, device=device)
        g = torch.full((3,), 2.0, device=device)
        out = torch.ops.pymaml.sgd_update.default([p], [g], 0.25, 0.0)[0]
        if not torch.equal(out.cpu(), torch.full((3,), 0.5)):
            return f"probe on {device} returned a wrong result: {out.tolist()}"
    except Exception as e:  # noqa: BLE001 - any failure means the compiled path is unusable here
        return f"probe on {device} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True  # cannot tell (not Linux): trust the build
    return not flags or (" avx2" in flags and " fma" in flags)


def _init() -> None:
    forced = os.environ.get("PYMAML_BACKEND", "").strip().lower()
    if forced not in ("", "auto", "compiled", "torch"):
        warnings.warn(f"pymaml: PYMAML_BACKEND={forced!r} is not one of 'torch', 'compiled', 'auto'; using auto")
        forced = ""
    if forced == "torch":
        _STATE.update(backend="torch", reason="forced by PYMAML_BACKEND=torch")
        return
    if build_info().get("CPU_AVX2") and not _cpu_has_avx2():
        _STATE.update(backend="torch", reason="pymaml._C was built with AVX2/FMA, which this CPU lacks; "
                                              "rebuild with PYMAML_NO_AVX2=1")
        warnings.warn(f"pymaml: using the pure-torch ops (slower): {_STATE['reason']}", RuntimeWarning, stacklevel=3)
        return
    stale = _why_stale()
    try:
        if stale:
            raise ImportError(stale)
        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except Exception as e:  # noqa: BLE001
        _STATE.update(backend="torch", reason=stale or _why_import_failed(e), error=e)
    else:
        _STATE["loaded"] = True
        from . import _registration  # noqa: F401  (fake kernels and autograd)
        bad = _probe("cpu")
        if bad is None:
            _STATE.update(backend="compiled", reason="pymaml._C loaded and its CPU probe passed")
        else:
            _STATE.update(backend="torch", reason=bad)
    if _STATE["backend"] != "compiled":
        msg = f"pymaml: using the pure-torch ops (slower): {_STATE['reason']}"
        if forced == "compiled":
            raise ImportError(msg + " (PYMAML_BACKEND=compiled was requested)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def extension_loaded() -> bool:
    return _STATE["loaded"]


def backend() -> str:
    """'compiled' when the C++ kernels serve CPU tensors, 'torch' for the pure-torch reference."""
    return _STATE["backend"]


def backend_reason() -> str:
    return _STATE["reason"]


def cuda_kernels_built() -> bool:
    return bool(build_info().get("WITH_CUDA")) and _STATE["loaded"]


def compiled_for(device_type: str) -> bool:
    """Whether tensors of this device type run on compiled kernels (decided once per type)."""
    state = _DEVICE_STATE.get(device_type)
    if state is None:
        state = _decide(device_type)
        _DEVICE_STATE[device_type] = state
    return state[0]


def device_reason(device_type: str) -> str:
    compiled_for(device_type)
    return _DEVICE_STATE[device_type][1]


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def compiled_available(op: str, device) -> bool:
    """Whether ``torch.ops.pymaml.<op>`` serves tensors on ``device`` (a ``torch.device`` or a device
    type string): the backend decision says compiled for that device type and the loaded extension
    holds a kernel of ``op`` for it. Decided once per (op, device type)."""
    typ = device if isinstance(device, str) else device.type
    key = (op, typ)
    ok = _OP_STATE.get(key)
    if ok is None:
        ok = _OP_STATE[key] = _op_decide(op, typ)
    return ok


def _op_decide(op: str, typ: str) -> bool:
    if not compiled_for(typ):
        return False
    dk = _DISPATCH_KEY.get(typ)
    if dk is None or not hasattr(torch.ops.pymaml, op):
        return False
    if typ == "meta":  # fake kernels (pymaml._registration) serve meta tensors
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pymaml::{op}", dk)


def note_fallback(op: str, device_type: str, why: str = "") -> None:
    """Counts a call of ``op`` that ran on the pure-torch ops while the package runs compiled, and
    warns the first time for each (op, device type)."""
    key = (op, device_type)
    n = _FALLBACKS.get(key, 0)
    _FALLBACKS[key] = n + 1
    if n == 0:
        why = why or device_reason(device_type)
        warnings.warn(f"pymaml: {op} on {device_type} tensors runs on the pure-torch ops (slower): {why}",
                      RuntimeWarning, stacklevel=3)


def fallback_counts() -> Dict[str, int]:
    """``"op on device"`` -> number of calls that took the pure-torch path although the package runs
    compiled (empty when none did)."""
    return {f"{op} on {dev}": n for (op, dev), n in sorted(_FALLBACKS.items())}


def _decide(device_type: str) -> tuple:
    if _STATE["backend"] != "compiled":
        return False, _STATE["reason"]
    if device_type == "cpu":
        return True, _STATE["reason"]
    if device_type == "meta":
        return True, "fake (meta) kernels registered"
    if device_type == "cuda":
        if not cuda_kernels_built():
            why = "pymaml._C was built without CUDA kernels"
        else:
            why = _probe("cuda")
        if why is None:
            return True, "CUDA kernels built and their probe passed"
        warnings.warn(f"pymaml: CUDA tensors use the pure-torch ops (slower): {why}", RuntimeWarning, stacklevel=4)
        return False, why
    return False, f"no compiled kernels for device type {device_type!r}"


_init()
