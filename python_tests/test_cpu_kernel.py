"""The C++ CPU kernel's round-2 machinery (csrc/cpu/omp_tile.h, omp_cpu.cpp): the tile of vectors whose S x S steps
run one vector per SIMD lane (vectors that stop at different steps, ties inside and across lanes), the
prepared-dictionary cache (hits, misses after in-place changes, alternating dictionaries, its memory bound) and the
Gram-free form, against hand-worked codes, the float64 reference and per-vector coding. The bit-for-bit comparison of
every SIMD level with the per-vector model host_encode is the native test (csrc/tests/test_omp_tile.cpp, ctest)."""

import gc

import pytest
import torch
from conftest import assert_matches_reference, random_problem

from lasers_ext import SparseCodes, batch_omp

OPS = torch.ops.lasers_ext
HITS, MISSES, ENTRIES, BYTES, BUDGET = range(5)


def cpu(x, d, s, tol=None):
    return batch_omp(x, d, s, tol=tol, backend="cpu")


def raw(x, d, s):
    """The op itself: unlike batch_omp, it takes non-finite rows (and codes them with every slot unused)."""
    return SparseCodes(*OPS.batch_omp(x, d, s))


def stats():
    return OPS._cpu_dictionary_cache_stats()


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts from an empty cache with the default budget and leaves it so."""
    OPS._cpu_dictionary_cache_clear()
    budget = OPS._cpu_dictionary_cache_budget(-1)
    yield
    OPS._cpu_dictionary_cache_budget(budget)
    OPS._cpu_dictionary_cache_clear()


def same_codes(a, b):
    return torch.equal(a.indices, b.indices) and torch.equal(a.coeffs, b.coeffs)


def orthonormal(gen, m, dtype):
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return q.to(dtype)


# ---- the tile: lanes that stop at different steps, ties ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanes_stop_at_different_steps_in_one_tile(gen, dtype):
    # Orthonormal atoms: OMP recovers an exactly k-sparse vector in k steps and then stops (zero residual), so
    # consecutive vectors of one tile (8 or 4 lanes) stop after 0, 1, ..., S atoms. Hand-worked oracle: the support
    # ordered by |coefficient| descending, the coefficients themselves.
    m, s, n = 24, 6, 64
    d = orthonormal(gen, m, dtype)
    x = torch.zeros(n, m, dtype=torch.float64)
    want_idx = torch.full((n, s), -1)
    want_coef = torch.zeros(n, s, dtype=torch.float64)
    for row in range(n):
        k = row % (s + 1)
        atoms = torch.randperm(m, generator=gen)[:k]
        mags = 1 + torch.arange(k, 0, -1, dtype=torch.float64) + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)
        coef = mags * torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).double()
        x[row] = coef @ d.double()[atoms]
        want_idx[row, :k] = atoms
        want_coef[row, :k] = coef
    x = x.to(dtype)
    codes = cpu(x, d, s)
    assert torch.equal(codes.indices, want_idx)
    torch.testing.assert_close(codes.coeffs.double(), want_coef, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert ((codes.indices >= 0).sum(1) == torch.arange(n) % (s + 1)).all()
    # a tol stop in some lanes only: rows whose energy is at most tol use no atom, the others go on
    energy = (x.double() ** 2).sum(1)
    ordered = energy.sort().values
    tol = float(ordered[n // 2] + ordered[n // 2 + 1]) / 2  # between two energies: no row at rounding distance
    stopped = cpu(x, d, s, tol=tol)
    small = energy <= tol
    assert (stopped.indices[small] == -1).all()
    assert (stopped.indices[~small, 0] >= 0).all()
    assert_matches_reference(stopped, x, d, s, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ties_lowest_index_in_every_lane(gen, dtype):
    # The standard basis as atoms: alpha0 = x exactly, so equal |x_k| are exact ties, and the residual updates of an
    # orthonormal basis keep them exact. Each vector of the tile has its ties elsewhere (inside one SIMD block,
    # across the 16- and 32-atom blocks, in the scalar tail after the last full block, +a against -a); the expected
    # order is by |x| descending, lowest index first among equals.
    m = 70
    d = torch.eye(m, dtype=dtype)
    pairs = [(0, 1), (3, 35), (15, 16), (31, 32), (63, 64), (65, 69), (2, 67), (40, 41), (7, 68), (33, 66), (1, 34),
             (50, 51), (0, 69), (17, 18), (30, 31), (47, 48)]
    x = torch.zeros(len(pairs), m, dtype=dtype)
    for row, (a, b) in enumerate(pairs):
        x[row] = 0.01 * torch.rand(m, generator=gen).to(dtype)  # below the tie, distinct
        x[row, a] = 2.0 if row % 2 else -2.0
        x[row, b] = 2.0
    s = 3
    codes = cpu(x, d, s)
    for row in range(len(pairs)):
        key = sorted(range(m), key=lambda k: (-abs(x[row, k].item()), k))
        assert codes.indices[row].tolist() == key[:s], f"row {row}, tie at {pairs[row]}"
        assert torch.equal(codes.coeffs[row], x[row, key[:s]])


def test_codes_do_not_depend_on_tile_or_thread_count(gen):
    x, d = random_problem(gen, 3001, 16, 300, torch.float32)
    x[5] = 0  # a zero vector and a non-finite one inside tiles whose other vectors go on
    x[10, 3] = float("nan")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = raw(x, d, 5)
        torch.set_num_threads(2)
        two = raw(x, d, 5)
    finally:
        torch.set_num_threads(threads)
    assert same_codes(one, two)
    for offset in (1, 3, 7):  # every vector in another position within its tile
        shifted = raw(x[offset:], d, 5)
        assert torch.equal(shifted.indices, one.indices[offset:])
        assert torch.equal(shifted.coeffs, one.coeffs[offset:])
    for i in (0, 5, 10, 2999, 3000):  # and alone
        alone = raw(x[i : i + 1], d, 5)
        assert torch.equal(alone.indices[0], one.indices[i]) and torch.equal(alone.coeffs[0], one.coeffs[i])
    assert (one.indices[10] == -1).all() and (one.indices[5] == -1).all()
    assert (one.indices[:5] >= 0).all()


# ---- the Gram-free form --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,k,s", [(500, 16, 512, 5), (200, 8, 37, 8), (64, 32, 100, 12)])
def test_gram_free_matches_float64_reference_and_gram_form(gen, monkeypatch, dtype, n, m, k, s):
    x, d = random_problem(gen, n, m, k, dtype, normalise=False)
    monkeypatch.setenv("LASERS_CPU_GRAM", "free")
    free = cpu(x, d, s)
    assert_matches_reference(free, x, d, s)
    monkeypatch.setenv("LASERS_CPU_GRAM", "gram")
    assert same_codes(free, cpu(x, d, s))  # the Gram rows it computes are the very numbers the matrix holds


def test_gram_mode_is_validated(monkeypatch, gen):
    x, d = random_problem(gen, 4, 8, 16)
    monkeypatch.setenv("LASERS_CPU_GRAM", "sometimes")
    with pytest.raises(RuntimeError, match="LASERS_CPU_GRAM must be auto, gram or free"):
        cpu(x, d, 2)


def test_auto_form_builds_the_gram_matrix_only_where_it_pays(gen):
    k, m = 1024, 16
    x, d = random_problem(gen, 4096, m, k)
    atoms_bytes = (m * k + k + k * m) * 4  # atoms_t, inv_norm, the copy of the values
    gram_bytes = k * k * 4
    cpu(x[:8], d, 5)  # 2 * N * S = 80 < K: Gram-free, only the atoms are prepared
    assert stats()[BYTES] == atoms_bytes
    cpu(x[:8], d, 5)  # the same dictionary again: worth its Gram matrix now
    assert stats()[BYTES] == atoms_bytes + gram_bytes
    OPS._cpu_dictionary_cache_clear()
    cpu(x, d, 5)  # 2 * N * S >= K: the Gram form at once
    assert stats()[BYTES] == atoms_bytes + gram_bytes


# ---- the prepared-dictionary cache ------------------------------------------------------------------------------


def test_cache_hit_gives_the_same_codes(gen):
    x, d = random_problem(gen, 300, 16, 128)
    first = cpu(x, d, 5)
    assert stats()[HITS] == 0 and stats()[MISSES] == 1 and stats()[ENTRIES] == 1
    second = cpu(x, d, 5)
    assert stats()[HITS] == 1 and stats()[MISSES] == 1
    assert same_codes(first, second)
    OPS._cpu_dictionary_cache_budget(0)  # caching off: a fresh preparation codes the same
    assert same_codes(first, cpu(x, d, 5))
    assert stats()[ENTRIES] == 0


@pytest.mark.parametrize("change", ["add_", "index", "view", "data", "optimizer"])
def test_cache_misses_after_an_in_place_change(gen, change):
    x, d = random_problem(gen, 300, 16, 128)
    d = d.clone().requires_grad_(change == "optimizer")
    before = cpu(x, d.detach(), 5)
    with torch.no_grad():
        if change == "add_":
            d.add_(0.3 * torch.randn(d.shape, generator=gen))
        elif change == "index":
            d[7] = -d[7] * 2 + 0.1
        elif change == "view":
            d[:, 3:5].mul_(-1.5)
        elif change == "data":  # bypasses the version counter: caught by the copy of the values
            d.data[11, 2] += 0.5
        else:
            opt = torch.optim.SGD([d], lr=0.5)
            d.grad = torch.randn(d.shape, generator=gen)
            opt.step()
    after = cpu(x, d.detach(), 5)
    OPS._cpu_dictionary_cache_clear()
    fresh = cpu(x, d.detach().clone(), 5)
    assert same_codes(after, fresh)
    assert not same_codes(before, after)


def test_two_dictionaries_alternating_both_stay_cached(gen):
    x, d1 = random_problem(gen, 200, 16, 96)
    d2 = torch.randn(80, 16, generator=gen)
    ref1, ref2 = cpu(x, d1, 4), cpu(x, d2, 4)
    assert stats()[MISSES] == 2 and stats()[ENTRIES] == 2
    for _ in range(3):
        assert same_codes(cpu(x, d1, 4), ref1)
        assert same_codes(cpu(x, d2, 4), ref2)
    assert stats()[HITS] == 6 and stats()[MISSES] == 2


def test_cache_memory_is_bounded(gen):
    x = torch.randn(200, 16, generator=gen)
    cpu(x, torch.randn(128, 16, generator=gen), 4)
    entry = stats()[BYTES]  # one entry: atoms, Gram matrix, copy of the values
    assert entry == (2 * 128 * 16 + 128 + 128 * 128) * 4
    OPS._cpu_dictionary_cache_clear()
    assert OPS._cpu_dictionary_cache_budget(3 * entry) == 1 << 30  # returns the previous budget (the default)
    dicts = [torch.randn(128, 16, generator=gen) for _ in range(5)]
    for d in dicts:
        cpu(x, d, 4)
        assert stats()[BYTES] <= 3 * entry
    assert stats()[ENTRIES] == 3 and stats()[HITS] == 0
    cpu(x, dicts[-1], 4)  # among the three most recently used
    assert stats()[HITS] == 1
    cpu(x, dicts[0], 4)  # evicted
    assert stats()[HITS] == 1 and stats()[BYTES] <= 3 * entry
    OPS._cpu_dictionary_cache_budget(entry // 2)  # smaller than one entry: everything goes, nothing is kept
    assert stats()[ENTRIES] == 0 and stats()[BYTES] == 0
    cpu(x, dicts[1], 4)
    assert stats()[ENTRIES] == 0


def test_freed_dictionary_entry_is_dropped(gen):
    x = torch.randn(100, 16, generator=gen)
    d = torch.randn(128, 16, generator=gen)
    cpu(x, d, 4)
    assert stats()[ENTRIES] == 1
    del d
    gc.collect()
    cpu(x, torch.randn(64, 16, generator=gen), 4)  # the next call drops the dead entry
    assert stats()[ENTRIES] == 1


def test_inference_mode_tensors_are_not_cached(gen):
    x = torch.randn(100, 16, generator=gen)
    with torch.inference_mode():
        d = torch.randn(128, 16, generator=gen)
        a = cpu(x, d, 4)
        b = cpu(x, d, 4)
    assert same_codes(a, b) and stats()[ENTRIES] == 0
    d2 = torch.randn(128, 16, generator=gen)  # a normal tensor is cached under inference mode too
    with torch.inference_mode():
        cpu(x, d2, 4)
        cpu(x, d2, 4)
    assert stats()[HITS] == 1
