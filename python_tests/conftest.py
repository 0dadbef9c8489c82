import dataclasses
import os
import random
import zlib

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It must be chosen before any @triton.jit is
# decorated, which happens when lasers_ext.triton_omp is first imported (lazily, by the first Triton call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lasers_ext  # noqa: E402  (after TRITON_INTERPRET is chosen)
from lasers_ext import backends, batch_omp  # noqa: E402
from lasers_ext.reference import batch_omp_reference  # noqa: E402

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


# ---- oracles shared by the kernel tests (test_batch_omp, test_triton, test_cuda) ------------------------------------
def relative_error(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()


def is_near_tie(x, d, prefix, a, b, dtype):
    """Whether atoms a and b correlate equally (to the precision of ``dtype``) with the residual of x on ``prefix``."""
    x, d = x.double(), d.double()
    unit = d / d.norm(dim=1, keepdim=True)
    r = x
    if len(prefix):
        sol = torch.linalg.lstsq(unit[prefix].T, x[:, None]).solution[:, 0]
        r = x - sol @ unit[prefix]
    ca, cb = (unit[a] @ r).abs(), (unit[b] @ r).abs() if b >= 0 else 0.0
    return abs(ca - cb) <= 100 * torch.finfo(dtype).eps * x.norm() * (1 + len(prefix))


def assert_matches_reference(codes, x, d, s, tol=None):
    """Same supports (up to near-ties at the compute precision, after which a row is not compared further) and
    coefficients within the backward-stable bound c * eps * cond(G_TT) per vector."""
    ref_idx, ref_coef = batch_omp_reference(x, d, s, tol)
    differ = (codes.indices != ref_idx).any(1)
    for n in differ.nonzero()[:, 0].tolist():
        t = (codes.indices[n] != ref_idx[n]).nonzero()[0, 0].item()
        a, b = codes.indices[n, t].item(), ref_idx[n, t].item()
        assert a >= 0 and is_near_tie(x[n], d, ref_idx[n, :t], a, b, x.dtype), (
            f"row {n}: slot {t} chose atom {a}, the float64 reference chose {b}, and that is no tie"
        )
    keep = ~differ
    ref_idx, ref_coef, codes = ref_idx[keep], ref_coef[keep], lasers_ext.SparseCodes(*(c[keep] for c in codes))
    valid = ref_idx >= 0
    atoms = d.double()[ref_idx.clamp(min=0)] * valid.unsqueeze(-1)
    norms = atoms.norm(dim=-1)
    atoms = atoms / norms.unsqueeze(-1).clamp_min(1e-300)
    gram = atoms @ atoms.transpose(1, 2) + torch.diag_embed((~valid).double())
    cond = torch.linalg.cond(gram) if len(gram) else torch.ones(0, dtype=torch.float64)
    # error of the unit-atom coefficients gamma: both sides solve with G_TT, so both carry eps * cond(G_TT) relative to
    # the size of the solution, ||gamma||, which exceeds ||x|| when the chosen atoms are nearly dependent
    err = ((codes.coeffs.double() - ref_coef.double()) * norms).norm(dim=1)
    size = torch.maximum(x[keep].double().norm(dim=1), (ref_coef.double() * norms).norm(dim=1))
    bound = 200 * torch.finfo(x.dtype).eps * cond * size
    assert (err <= bound).all(), f"coefficient error {err.max():.3g} above bound at row {(err / bound).argmax()}"


def share_matching_cpu_kernel(codes, x, d, s, tol=None) -> float:
    """Codes from another backend against the C++ kernel on the same input: asserts that the rows with identical
    supports have coefficients within 1e-5 (float32) / 1e-12 (float64) relative, and returns the share of those rows
    (the caller bounds it: supports may differ only on ties at rounding level)."""
    cpu = batch_omp(x, d, s, tol=tol, backend="cpu")
    same = (codes.indices == cpu.indices).all(1)
    err = (codes.coeffs - cpu.coeffs)[same].norm(dim=1) / cpu.coeffs[same].norm(dim=1).clamp_min(1e-30)
    assert err.max() <= (1e-5 if x.dtype == torch.float32 else 1e-12)
    return same.float().mean().item()


def sklearn_codes(x, d, s, tol=None):
    """scikit-learn's Gram OMP over the normalised atoms, mapped to (N, K) coefficients of the given atoms."""
    from sklearn.linear_model import orthogonal_mp_gram

    x64, d64 = x.double().numpy(), d.double().numpy()
    norms = np.linalg.norm(d64, axis=1)
    unit = d64 / norms[:, None]
    kwargs = dict(tol=tol) if tol is not None else dict(n_nonzero_coefs=s)
    coef = orthogonal_mp_gram(unit @ unit.T, unit @ x64.T, norms_squared=(x64**2).sum(1), **kwargs)
    return torch.from_numpy(np.atleast_2d(coef.T) / norms)  # (N, K)


# ---- the kernels under test: every backend on every device this machine has -----------------------------------------
_RAW_OPS = {"cpu": "batch_omp", "cuda": "batch_omp", "reference": "batch_omp_reference", "triton": "batch_omp_triton"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One backend on one device. Calling it codes CPU tensors there and returns the codes on the CPU."""

    backend: str
    device: str

    def __call__(self, x, d, s, tol=None) -> lasers_ext.SparseCodes:
        codes = batch_omp(x.to(self.device), d.to(self.device), s, tol=tol, backend=self.backend)
        return lasers_ext.SparseCodes(codes.indices.cpu(), codes.coeffs.cpu())

    @property
    def op(self):
        """The backend's raw torch.library op (no argument or NaN checks)."""
        return getattr(torch.ops.lasers_ext, _RAW_OPS[self.backend])

    def __str__(self) -> str:
        return self.backend if self.device == "cpu" or self.backend == "cuda" else f"{self.backend}-{self.device}"


def _targets(with_reference: bool) -> list[Target]:
    gpu = torch.cuda.is_available()
    found = [Target("cpu", "cpu")] + ([Target("reference", "cpu")] if with_reference else [])
    if backends.HAS_TRITON and (gpu or backends.triton_interpreting()):
        found.append(Target("triton", "cuda" if gpu else "cpu"))  # compiled on a GPU, interpreted without one
    if gpu and backends.WITH_CUDA:
        found.append(Target("cuda", "cuda"))
    if gpu and with_reference:
        found.append(Target("reference", "cuda"))
    return found


KERNELS = _targets(with_reference=False)  # the compiled kernels: C++, Triton, CUDA where present
ALL_KERNELS = _targets(with_reference=True)  # and the float64 reference on each device
