"""Shared fixtures and the test session's setup.

Without a CUDA device the Triton kernels run on CPU tensors through the Triton interpreter,
which ``@triton.jit`` chooses when a kernel is *defined*: so ``TRITON_INTERPRET=1`` is set here,
before any test module can import Triton. Tests marked ``gpu`` need a CUDA device and are
skipped without one; on a GPU machine ``pytest -m gpu`` selects exactly them.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (the project's comparison metric)."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """One intra-op thread for training tests: the CI machine has two small cores shared with
    other jobs, and two OpenMP threads competing there run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
