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


@pytest.fixture
def float64_one_thread():
    """float64 throughout; one intra-op thread, because these tiny models gain nothing from more and
    on a busy 2-core machine spinning thread pools make each op ~100× slower. Use with
    ``pytestmark = pytest.mark.usefixtures("float64_one_thread")``."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)
