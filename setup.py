"""Builds pymaml._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present (no GPU needed). Environment switches:

  PYMAML_NO_EXTENSION=1   pure-Python install (pymaml falls back to its pure-torch ops)
  PYMAML_NO_CUDA=1        CPU kernels only, even if CUDA is available
  PYMAML_FORCE_CUDA=1     fail loudly unless the CUDA kernels can be built
  PYMAML_NO_AVX2=1        x86-64 CPU kernels without AVX2/FMA (CPUs older than 2013)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0", i.e. sm_90)

If compiling fails the install still succeeds (pure-torch backend) with a warning, unless forced.
"""
import glob
import os
import platform
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("PYMAML_NO_EXTENSION"):
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes that
        # /usr/local, where libcudart is not, and linking fails.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from packaging.version import Version
    from torch.utils import cpp_extension as ce

    use_cuda = bool(torch.version.cuda) and ce.CUDA_HOME is not None and not _flag("PYMAML_NO_CUDA")
    if _flag("PYMAML_FORCE_CUDA") and not use_cuda:
        raise RuntimeError(f"PYMAML_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
                           f"CUDA_HOME={ce.CUDA_HOME!r}, PYMAML_NO_CUDA={os.environ.get('PYMAML_NO_CUDA')!r}")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # torch picks the C++ standard it needs (C++20 for torch 2.14). Results stay bitwise equal to
    # the reference for float32/float64: no FMA contraction.
    cxx = ["-O3", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    avx2 = platform.machine().lower() in ("x86_64", "amd64") and not _flag("PYMAML_NO_AVX2")
    if avx2:
        # at::vec::Vectorized with 256-bit AVX2 registers; pymaml._backend checks the CPU has them.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is a header template: without OpenMP it silently runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    ext = ce.CppExtension
    kwargs = {}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # one arch keeps the CI build short
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = ce.CUDAExtension
        # No --use_fast_math: it flushes subnormals to zero and approximates division and exp, so
        # results would no longer match the reference bit for bit.
        nvcc = ["-O3", "-lineinfo", "-Xfatbin", "-compress-all"]
        if Version(torch.version.cuda) >= Version("11.2"):
            nvcc += ["--threads", "2"]
        kwargs["define_macros"] = [("PYMAML_WITH_CUDA", None)]
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        extra = {"cxx": cxx}
    module = ext("pymaml._C", sources, include_dirs=[os.path.abspath("csrc/include")],
                 extra_compile_args=extra, extra_link_args=link, **kwargs)
    return [module], {"build_ext": _build_ext_class(ce.BuildExtension, use_cuda, avx2)}


def _links_libstdcxx_statically(cxx):
    """True when `cxx` puts a private copy of libstdc++ into shared libraries (a compiler wrapper
    that adds -static-libstdc++). Such an extension shares torch's C++ objects but not its copy of
    the library: formatting a number into an error message then crashes the process. None when it
    cannot be told (no readelf, or the test library does not build)."""
    import shlex
    import shutil
    import subprocess
    import tempfile
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "t.cpp"), os.path.join(d, "t.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n#include <string>\n"
                    "std::string f(unsigned long n) { std::ostringstream s; s << n; return s.str(); }\n")
        try:
            subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", "-o", lib, src], check=True,
                           capture_output=True, timeout=120)
            dyn = subprocess.run([readelf, "-d", lib], check=True, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++" not in dyn


def _check_compiler():
    cxx = os.environ.get("CXX", "c++")
    if _links_libstdcxx_statically(cxx):
        # Not built rather than built to crash: run() turns this into the pure-torch fallback.
        raise RuntimeError(f"the C++ compiler {cxx!r} links libstdc++ statically into shared libraries, so "
                           f"the extension would crash the process when it formats an error message; build "
                           f"with a compiler that links it dynamically, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc")


def _build_ext_class(base, use_cuda, avx2):
    class BuildExt(base):
        """Records what was built (pymaml/_build_info.py) and turns a failed compile into a warning."""

        def finalize_options(self):
            # `pip install -e` would compile in a fresh temporary folder each time, a full rebuild
            # per install. Objects kept in build/ let ninja recompile only what changed (it tracks
            # sources, headers and flags) and relink; an explicit --build-temp still wins.
            if self.build_temp is None:
                tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
                self.build_temp = os.path.join("build", f"temp.{tag}")
            super().finalize_options()

        def run(self):
            try:
                _check_compiler()
                super().run()
                self._write_info(built=True, error="")
            except Exception as e:  # noqa: BLE001 - any compiler failure must not break the install
                if _flag("PYMAML_FORCE_CUDA"):
                    raise
                warnings.warn(f"pymaml: compiling the C++/CUDA kernels failed ({type(e).__name__}: {e}); "
                              f"installing the pure-torch backend only. `python -m pymaml.info` will say so.")
                self._write_info(built=False, error=f"{type(e).__name__}: {e}")

        def _write_info(self, built, error):
            import torch
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
            text = (f"# Written by setup.py at build time.\n"
                    f"BUILT = {built!r}\nWITH_CUDA = {use_cuda and built!r}\nCUDA_ARCH_LIST = {arch!r}\n"
                    f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {torch.version.cuda!r}\n"
                    f"BUILD_ERROR = {error!r}\nCPU_AVX2 = {avx2!r}\n")
            for root in {os.path.join(self.build_lib, "pymaml"), "pymaml"}:
                if os.path.isdir(root):
                    with open(os.path.join(root, "_build_info.py"), "w") as f:
                        f.write(text)

    # ninja is used whenever it is installed (BuildExtension's default).
    return BuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()
setup(packages=find_packages(include=["pymaml", "pymaml.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
