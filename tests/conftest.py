"""Fixtures shared by the op tests: backend (compiled kernels / pure-torch reference), device, dtype."""
import pytest
import torch

import pymaml
from pymaml import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["compiled", "torch"])
def backend(request):
    """The module under test: pymaml.ops on the compiled path, or pymaml.reference."""
    if request.param == "compiled":
        if pymaml.backend() != "compiled":
            pytest.skip(f"compiled backend unavailable: {pymaml.backend_reason()}")
        return pymaml.ops
    return reference


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one intra-op thread is fastest and keeps a shared 2-core machine usable.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
