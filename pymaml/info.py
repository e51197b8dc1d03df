"""``python -m pymaml.info``: what was built, what is active, and why a compiled path is missing."""
from __future__ import annotations

import sys

import torch


def report() -> str:
    from . import _backend, backend, backend_reason

    info = _backend.build_info()
    lines = [
        f"pymaml          {__import__('pymaml').__version__}",
        f"python          {sys.version.split()[0]}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"GPU visible: {torch.cuda.is_available()})",
        f"_C built        {info.get('BUILT', 'unknown (no build record)')}"
        + (f" for torch {info['TORCH_VERSION']}" if info.get("TORCH_VERSION") else ""),
        f"_C loaded       {_backend.extension_loaded()}",
        f"CUDA kernels    {'built' if info.get('WITH_CUDA') else 'not built'}"
        + (f" for arch {info['CUDA_ARCH_LIST']}" if info.get("CUDA_ARCH_LIST") else ""),
    ]
    if info.get("BUILD_ERROR"):
        lines.append(f"build error     {info['BUILD_ERROR']}")
    lines.append(f"backend         {backend()} ({backend_reason()})")
    lines.append(f"  cpu tensors   {'compiled' if _backend.compiled_for('cpu') else 'torch'}")
    if torch.cuda.is_available():
        lines.append(f"  cuda tensors  {'compiled' if _backend.compiled_for('cuda') else 'torch'} "
                     f"({_backend.device_reason('cuda')})")
    counts = _backend.fallback_counts()
    lines.append("fallbacks       " + (", ".join(f"{k}: {n}" for k, n in counts.items()) if counts else
                                       "none (every call in this process ran on the active backend)"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
