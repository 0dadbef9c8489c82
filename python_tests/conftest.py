import os
import random
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It must be chosen before any @triton.jit is
# decorated, which happens when lasers_ext.triton_omp is first imported (lazily, by the first Triton call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh inputs on every run; LASERS_TEST_SEED=<n> (printed in the header) replays a run.
SEED = int(os.environ.get("LASERS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"LASERS_TEST_SEED={SEED}"


@pytest.fixture
def gen(request):
    """A generator seeded from the run's seed and the test's name: fresh each run, replayable, independent per test."""
    return torch.Generator().manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % (2**63))


def random_problem(gen, n, m, k, dtype=torch.float32, normalise=True):
    """Gaussian signals (n, m) and a Gaussian dictionary (k, m), unit-norm atoms unless ``normalise=False``."""
    d = torch.randn(k, m, generator=gen, dtype=torch.float64)
    if normalise:
        d = d / d.norm(dim=1, keepdim=True)
    x = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return x.to(dtype), d.to(dtype)
