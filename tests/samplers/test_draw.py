"""The fast CPU draw path: same tables and stream as the device-agnostic definition, exact frequencies."""

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_reweight.samplers import AliasTable, build_alias_table, core, draw_alias, draw_weighted


def _weights(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rand": lambda: torch.rand(n, generator=g),
            "skewed": lambda: torch.rand(n, generator=g, dtype=torch.float64) ** 20,
            "zeros": lambda: torch.rand(n, generator=g) * (torch.arange(n) % 3 != 0),
            "ties": lambda: torch.randint(0, 4, (n,), generator=g).double(),  # many q exactly 1: tied sums
            "uniform": lambda: torch.ones(n),
            "onehot": lambda: torch.zeros(n).index_fill_(0, torch.tensor([n // 3]), 2.0),
            "heavy_tail": lambda: torch.rand(n, generator=g) ** -1.5}[kind]()


@pytest.mark.parametrize("kind", ["rand", "skewed", "zeros", "ties", "uniform", "onehot", "heavy_tail"])
@pytest.mark.parametrize("n", [3, 1500, 40_000])
def test_numpy_table_is_bit_identical_to_the_reference(kind, n):
    # the CPU (numpy) construction must reproduce the device-agnostic torch construction exactly, so the
    # stream does not depend on the device path (and is the one of earlier releases)
    w = _weights(kind, n)
    fast, ref = core._build_alias_table_numpy(w), core._build_alias_table_torch(w)
    assert torch.equal(fast.prob, ref.prob)
    assert torch.equal(fast.alias, ref.alias)
    assert fast.prob.dtype == torch.float64 and fast.alias.dtype == torch.int64
    implied = fast.prob.clone().index_add_(0, fast.alias, 1.0 - fast.prob) / n
    torch.testing.assert_close(implied, w.double() / w.double().sum(), rtol=0, atol=1e-12)
    assert float(implied[w == 0].sum()) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_count_at_most_equals_searchsorted(seed):
    rng = np.random.default_rng(seed)
    # ties in the sequence, values equal to sequence entries, values below the first and above the last,
    # and values one ulp below an entry (where the interpolated fraction rounds up to 1)
    seq = np.cumsum(rng.integers(0, 3, 5000) * rng.random(5000) ** 4)
    near = np.nextafter(rng.choice(seq, 1000), -np.inf)
    values = np.sort(np.concatenate([rng.uniform(-5, seq[-1] + 5, 3000), rng.choice(seq, 2000), near,
                                     [seq[-1]] * 3, [seq[0]] * 3]))
    got = core._count_at_most(seq, values)
    np.testing.assert_array_equal(got, np.searchsorted(seq, values, side="right"))


def _reference_draw(table, num_draws, generator, chunk):
    """The stream's definition, written plainly: per chunk, m bucket uniforms then m coins."""
    n, out = table.prob.numel(), []
    for start in range(0, num_draws, chunk):
        m = min(chunk, num_draws - start)
        bucket = torch.rand(m, dtype=torch.float64, generator=generator).mul_(n).floor_().long()
        coin = torch.rand(m, dtype=torch.float64, generator=generator)
        out.append(torch.where(coin < table.prob[bucket], bucket, table.alias[bucket]))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("num_draws", [0, 1, 999, 3500])
def test_blocked_draw_follows_the_stream_definition(monkeypatch, num_draws):
    # small chunks and blocks so the draw crosses chunk and block boundaries
    monkeypatch.setattr(core, "_CHUNK", 1000)
    monkeypatch.setattr(core, "_BLOCK", 96)
    w = _weights("heavy_tail", 777)
    table = build_alias_table(w)
    got = draw_weighted(w, num_draws, torch.Generator().manual_seed(5))
    ref_table = core._build_alias_table_torch(w)
    ref = _reference_draw(ref_table, num_draws, torch.Generator().manual_seed(5), 1000)
    assert torch.equal(got, ref)
    # a table made by hand from two separate tensors (two gathers per draw) gives the same stream
    plain = AliasTable(table.prob.contiguous(), table.alias.contiguous())
    assert torch.equal(draw_alias(plain, num_draws, torch.Generator().manual_seed(5)), ref)


def test_frequencies_match_the_target_chi_square_and_tv():
    w = _weights("heavy_tail", 60, seed=3) * (torch.arange(60) % 7 != 0)  # skewed, with zero weights
    draws = draw_weighted(w, 600_000, torch.Generator().manual_seed(11))
    counts = torch.bincount(draws, minlength=60).double()
    target = w.double() / w.double().sum()
    assert counts[w == 0].sum() == 0  # zero weight: never drawn
    keep = target > 0
    p = stats.chisquare(counts[keep].numpy(), (target[keep] * draws.numel()).numpy()).pvalue
    assert p > 1e-3, p
    tv = 0.5 * float((counts / draws.numel() - target).abs().sum())
    assert tv < 0.01, tv


def test_zero_weights_never_drawn_at_scale():
    n = 200_000
    w = torch.rand(n, generator=torch.Generator().manual_seed(0))
    w[torch.arange(n) % 2 == 1] = 0.0
    draws = draw_weighted(w, 2_000_000, torch.Generator().manual_seed(1))
    assert int((draws % 2 == 1).sum()) == 0
    assert int(draws.min()) >= 0 and int(draws.max()) < n


def test_beyond_2_pow_24_with_spread_weights():
    n = (1 << 24) + 4096
    w = torch.zeros(n)
    w[: 1 << 12] = 1.0  # head block
    w[-(1 << 12):] = 3.0  # tail block, all beyond 2^24
    draws = draw_weighted(w, 200_000, torch.Generator().manual_seed(0))
    tail = draws >= n - (1 << 12)
    assert bool((tail | (draws < (1 << 12))).all())
    assert abs(float(tail.double().mean()) - 0.75) < 0.01
    assert int(draws[tail].unique().numel()) > 4000 * 0.9  # spread over the tail, not one alias target


def test_overflowing_sum_is_refused():
    with pytest.raises(ValueError, match="finite sum"):
        draw_weighted(torch.tensor([1e308, 1e308], dtype=torch.float64), 3, torch.Generator())


def test_build_restores_numpy_huge_page_setting():
    multiarray = np._core.multiarray
    if not hasattr(multiarray, "_get_madvise_hugepage"):
        pytest.skip("this numpy has no huge-page switch")
    before = multiarray._get_madvise_hugepage()
    with core._without_numpy_huge_pages():
        assert multiarray._get_madvise_hugepage() is False
    assert multiarray._get_madvise_hugepage() == before
    build_alias_table(torch.rand(5000))
    assert multiarray._get_madvise_hugepage() == before


# --- the compiled (numba) CPU kernels: same tables and stream as the vectorised path -------------------------

def _kernels_or_skip():
    pytest.importorskip("numba", reason="numba is not installed: the vectorised path is the only one")
    kernels = core._numba_kernels()
    if kernels is None:
        pytest.skip("core.USE_NUMBA is off")
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["rand", "skewed", "zeros", "ties", "uniform", "onehot", "heavy_tail"])
@pytest.mark.parametrize("n", [1, 2, 3, 1500, 40_000])
def test_numba_table_is_bit_identical_to_numpy(kind, n, dtype):
    kernels = _kernels_or_skip()
    w = _weights(kind, n).to(dtype)
    if not bool((w > 0).any()) or not bool(w.isfinite().all()):
        pytest.skip("no positive weight at this size, or not representable in this dtype")
    fast, ref = core._build_alias_table_numba(w, kernels), core._build_alias_table_numpy(w)
    assert torch.equal(fast.prob, ref.prob)
    assert torch.equal(fast.alias, ref.alias)
    assert torch.equal(build_alias_table(w).packed, fast.packed)  # the CPU default is the compiled path
    assert bool((fast.prob[w == 0] == 0).all())  # a zero-weight bucket always passes to its alias


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_numba_table_on_strided_and_grad_weights():
    kernels = _kernels_or_skip()
    w = _weights("heavy_tail", 3001).double().requires_grad_(True)
    strided = w[::2]
    fast = core._build_alias_table_numba(core.validate_weights(strided), kernels)
    ref = core._build_alias_table_numpy(strided.detach())
    assert torch.equal(fast.packed, ref.packed)
    assert w.grad is None and torch.equal(strided.detach(), w.detach()[::2])  # weights untouched


def test_declined_sweep_falls_back_to_the_vectorised_table(monkeypatch):
    # the sweep returns False (after writing part of the table) when a light's D_a falls below the previous
    # one's from rounding; the result must then be the vectorised construction, untouched by the partial write
    kernels = _kernels_or_skip()
    real = kernels.build_alias_table

    def declining(*args):
        real(*args)
        return False

    monkeypatch.setattr(kernels, "build_alias_table", declining)
    w = _weights("skewed", 5000)
    got = core._build_alias_table(w)
    ref = core._build_alias_table_torch(w)
    assert torch.equal(got.prob, ref.prob) and torch.equal(got.alias, ref.alias)


@pytest.mark.parametrize("num_draws", [0, 1, 999, 3500])
def test_numba_draw_follows_the_stream_definition(monkeypatch, num_draws):
    _kernels_or_skip()
    monkeypatch.setattr(core, "_CHUNK", 1000)
    w = _weights("zeros", 777)
    got = draw_weighted(w, num_draws, torch.Generator().manual_seed(5))
    ref = _reference_draw(core._build_alias_table_torch(w), num_draws, torch.Generator().manual_seed(5), 1000)
    assert torch.equal(got, ref)
    monkeypatch.setattr(core, "USE_NUMBA", False)  # the module flag: the vectorised fallback, same stream
    assert core._numba_kernels() is None
    assert torch.equal(draw_weighted(w, num_draws, torch.Generator().manual_seed(5)), ref)


def test_numba_and_fallback_sampler_epochs_agree(monkeypatch):
    # WeightedSampler iterates the chunks without an output tensor (a reused buffer): same indices either way
    _kernels_or_skip()
    from lightning_reweight.samplers import WeightedSampler

    monkeypatch.setattr(core, "_CHUNK", 512)
    w = _weights("heavy_tail", 3000) * (torch.arange(3000) % 5 != 0)
    compiled = list(WeightedSampler(w, num_samples=2500, seed=3))
    monkeypatch.setattr(core, "USE_NUMBA", False)
    fallback = list(WeightedSampler(w, num_samples=2500, seed=3))
    assert compiled == fallback
    assert all(i % 5 != 0 for i in compiled)  # zero weight: never drawn


@pytest.mark.parametrize("use_numba", [True, False])
def test_zero_weights_never_drawn_on_either_path(monkeypatch, use_numba):
    if use_numba:
        _kernels_or_skip()
    monkeypatch.setattr(core, "USE_NUMBA", use_numba)
    g = torch.Generator().manual_seed(2)
    w = torch.rand(50_000, generator=g, dtype=torch.float64) ** 8  # skewed: a few heavies serve many lights
    w[torch.randperm(50_000, generator=g)[:25_000]] = 0.0
    draws = draw_weighted(w, 400_000, torch.Generator().manual_seed(3))
    assert int((w[draws] == 0).sum()) == 0
    onehot = torch.zeros(10_000, dtype=torch.float64).index_fill_(0, torch.tensor([7777]), 0.5)
    assert bool((draw_weighted(onehot, 20_000, torch.Generator().manual_seed(4)) == 7777).all())


def test_kernels_compile_without_a_cache_location(monkeypatch, recwarn):
    # a read-only install with no writable user cache: numba finds no cache locator and refuses `cache=True`;
    # the kernels must then compile in memory, silently, and still be exact
    pytest.importorskip("numba", reason="numba is not installed")
    from numba.core import caching

    from lightning_reweight.samplers import _kernels

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="cannot cache"):
        __import__("numba").njit(cache=True)(lambda x: x + 1)
    fill = _kernels._jit(_kernels._fill.py_func)
    assert type(fill._cache).__name__ == "NullCache"
    idx, q = np.empty(_kernels._BLOCK, np.int64), np.empty(_kernels._BLOCK, np.float64)
    weights = np.array([0.5, 2.0, 0.1, 3.0, 0.0])
    count, pos = fill(weights, 1.0, 0, True, idx, q)
    assert (count, pos) == (3, 5) and idx[:3].tolist() == [0, 2, 4] and q[:3].tolist() == [0.5, 0.1, 0.0]
    assert not [w for w in recwarn if "numba" in type(w.message).__module__]
