"""Lost builds: with the compiled extension missing, built for another torch or CUDA, or unloadable,
pymaml runs on the pure-torch ops, warns once saying why and how to fix it, and
``python -m pymaml.info`` says the same.

Each case runs in a subprocess on a temporary copy of the package in which the fault is simulated:
no ``_C*.so``; a ``_build_info.py`` naming another torch or CUDA version; a ``.so`` that is not a
shared library. A copy of the binary is never loaded in these cases, so they hold whether or not the
extension was built here.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import pymaml

PKG = os.path.dirname(pymaml.__file__)
FIX = "pip install --no-build-isolation -e ."

# An editable install (pip install -e) adds an import hook that would find the installed package's
# own pymaml._C when the copy has none: the subprocesses drop it and import only the copy.
ISOLATE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f).lower()]\n"
PROBE = ISOLATE + r"""
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import pymaml, pymaml.info
    p = [torch.ones(3)]
    out = pymaml.ops.sgd_update(p, [torch.ones(3)], 0.5)       # works on the pure-torch ops
    pymaml.ops.global_norm(p)
    from pymaml.batch_norm import batch_norm
    batch_norm(torch.randn(4, 3))
ours = [str(w.message) for w in caught if str(w.message).startswith("pymaml")]
print(json.dumps({"file": pymaml.__file__, "backend": pymaml.backend(), "reason": pymaml.backend_reason(),
                  "warnings": ours, "out": out[0].tolist(), "info": pymaml.info.report()}))
"""


def build_info_text(**over):
    info = {"BUILT": True, "WITH_CUDA": False, "CUDA_ARCH_LIST": "", "TORCH_VERSION": torch.__version__,
            "CUDA_VERSION": torch.version.cuda, "BUILD_ERROR": "", "CPU_AVX2": False}
    info.update(over)
    return "".join(f"{k} = {v!r}\n" for k, v in info.items())


def run_copy(tmp_path, so=None, build_info=None, env=None, script=PROBE):
    """Copies the package to tmp_path without its binary and build record, applies the fault, and
    runs ``script`` there; returns its JSON output (or the CompletedProcess when it failed)."""
    dest = tmp_path / "pymaml"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "_build_info.py", "__pycache__"))
    if so is not None:
        (dest / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(so)
    if build_info is not None:
        (dest / "_build_info.py").write_text(build_info)
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYMAML_")}
    full.update(PYTHONPATH=str(tmp_path), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        return proc
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(tmp_path)), result["file"]  # the copy, not the installed package
    return result


def check_fallback(result, *phrases):
    assert isinstance(result, dict), f"the subprocess failed:\n{result.stderr[-3000:]}"
    assert result["backend"] == "torch"
    assert result["out"] == [0.5, 0.5, 0.5]
    assert len(result["warnings"]) == 1, result["warnings"]  # one warning, not one per op call
    warning = result["warnings"][0]
    assert warning.startswith("pymaml: using the pure-torch ops (slower): ")
    for text in (result["reason"], *phrases):
        assert text in warning, (text, warning)
        assert text in result["info"], (text, result["info"])
    assert f"backend         torch ({result['reason']})" in result["info"]


def test_missing_extension(tmp_path):
    check_fallback(run_copy(tmp_path), "not built: pymaml._C is missing", FIX)


def test_missing_extension_after_a_failed_compile(tmp_path):
    result = run_copy(tmp_path, build_info=build_info_text(BUILT=False, BUILD_ERROR="CompileError: g++ not found"))
    check_fallback(result, "compiling failed at install time (CompileError: g++ not found)", FIX)
    assert "build error     CompileError: g++ not found" in result["info"]


def test_built_for_another_torch(tmp_path):
    result = run_copy(tmp_path, so=b"\x7fELF not loaded", build_info=build_info_text(TORCH_VERSION="2.0.0+cpu"))
    check_fallback(result, "built for another torch: pymaml._C was built against torch 2.0.0+cpu but torch "
                           f"{torch.__version__} is running", FIX)


def test_built_for_another_cuda(tmp_path):
    other = "11.8" if torch.version.cuda != "11.8" else "12.4"
    result = run_copy(tmp_path, so=b"\x7fELF not loaded", build_info=build_info_text(CUDA_VERSION=other))
    check_fallback(result, f"built for another CUDA: pymaml._C was built with torch for CUDA {other} but the "
                           f"running torch is for CUDA {torch.version.cuda}", FIX)


def test_corrupt_binary(tmp_path):
    result = run_copy(tmp_path, so=b"this is not a shared library", build_info=build_info_text())
    check_fallback(result, "failed to load pymaml._C: ImportError", FIX)


def test_forcing_the_compiled_backend_raises(tmp_path):
    result = run_copy(tmp_path, env={"PYMAML_BACKEND": "compiled"})
    assert not isinstance(result, dict), "PYMAML_BACKEND=compiled imported without the extension"
    assert "ImportError: pymaml: using the pure-torch ops (slower): not built: pymaml._C is missing" in result.stderr
    assert "(PYMAML_BACKEND=compiled was requested)" in result.stderr


def test_info_command_reports_the_reason(tmp_path):
    """``python -m pymaml.info`` itself, as a user runs it."""
    script = ISOLATE + "import runpy; runpy.run_module('pymaml.info', run_name='__main__')"
    dest = tmp_path / "pymaml"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "_build_info.py", "__pycache__"))
    (dest / "_build_info.py").write_text(build_info_text(TORCH_VERSION="1.13.0"))
    (dest / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"\x7fELF")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAML_")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(env, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend         torch (built for another torch: pymaml._C was built against torch 1.13.0" in proc.stdout
    assert FIX in proc.stdout
    assert "pymaml: using the pure-torch ops (slower): built for another torch" in proc.stderr  # the one warning


@pytest.mark.skipif(not any(f.startswith("_C") for f in os.listdir(PKG)), reason="pymaml._C is not built here")
def test_intact_build_loads(tmp_path):
    """The control: the same copy with the real binary and build record runs compiled, silently."""
    dest = tmp_path / "pymaml"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAML_")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=dict(env, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "compiled" and result["warnings"] == [], result


ROOT = os.path.dirname(PKG)


@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("g++") is None, reason="needs g++ and readelf")
def test_build_refuses_a_compiler_that_links_libstdcxx_statically(tmp_path):
    """A compiler wrapper that adds -static-libstdc++ gives the extension its own copy of libstdc++,
    and formatting a number into an error message then crashes the process. setup.py refuses such a
    compiler before compiling anything: the install falls back to pure torch and says why, or fails
    under PYMAML_FORCE_CUDA=1."""
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    (tmp_path / "pymaml").mkdir()
    (tmp_path / "pymaml" / "__init__.py").write_text("")
    env = {**os.environ, "CXX": "g++ -static-libstdc++", "PYMAML_NO_CUDA": "1"}
    env.pop("PYMAML_FORCE_CUDA", None)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "links libstdc++ statically" in run.stderr and "CXX=/usr/bin/g++" in run.stderr
    info = (tmp_path / "pymaml" / "_build_info.py").read_text()
    assert "BUILT = False" in info and "links libstdc++ statically" in info
    assert not list((tmp_path / "pymaml").glob("_C*.so"))
    if torch.version.cuda and (os.environ.get("CUDA_HOME") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        # PYMAML_FORCE_CUDA=1 turns the refusal into a failed build (it is checked before nvcc runs)
        env.pop("PYMAML_NO_CUDA")
        forced = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                                env={**env, "PYMAML_FORCE_CUDA": "1"}, capture_output=True, text=True, timeout=600)
        assert forced.returncode != 0 and "links libstdc++ statically" in forced.stderr, forced.stderr[-2000:]
