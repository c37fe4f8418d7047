import pytest
import torch


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
