import os

# The Triton interpreter must be chosen before any @triton.jit runs (see ../shared notes); harmless otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(torch.initial_seed() % (2**31))


def random_problem(gen, n, m, k, dtype=torch.float32, normalise=True):
    """Gaussian signals (n, m) and a Gaussian dictionary (k, m), unit-norm atoms unless ``normalise=False``."""
    d = torch.randn(k, m, generator=gen, dtype=torch.float64)
    if normalise:
        d = d / d.norm(dim=1, keepdim=True)
    x = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return x.to(dtype), d.to(dtype)
