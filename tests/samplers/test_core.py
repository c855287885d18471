"""The weighted draw core: exactness, validation, sharding, reproducibility, mid-epoch resume."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_reweight.samplers import (
    WeightedSampler,
    build_alias_table,
    draw_weighted,
    epoch_generator,
    uniform_indices,
)


def _implied_probs(table):
    n = table.prob.numel()
    p = table.prob.clone()
    p.index_add_(0, table.alias, 1.0 - table.prob)
    return p / n


@pytest.mark.parametrize("kind", ["rand", "skewed", "zeros", "onehot", "uniform", "int"])
@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
def test_alias_table_is_exact(kind, n):
    g = torch.Generator().manual_seed(n)
    w = {"rand": lambda: torch.rand(n, generator=g),
         "skewed": lambda: torch.rand(n, generator=g, dtype=torch.float64) ** 20,
         "zeros": lambda: torch.rand(n, generator=g) * (torch.arange(n) % 3 != 0),
         "onehot": lambda: torch.zeros(n).index_fill_(0, torch.tensor([n // 2]), 1.0),
         "uniform": lambda: torch.ones(n),
         "int": lambda: torch.randint(0, 5, (n,), generator=g)}[kind]()
    if float(w.sum()) == 0:
        w[0] = 1
    table = build_alias_table(w)
    target = w.double() / w.double().sum()
    torch.testing.assert_close(_implied_probs(table), target, rtol=0, atol=1e-12)
    assert float(_implied_probs(table)[w == 0].sum()) == 0.0  # zero weight: never drawn


@pytest.mark.parametrize("replacement", [True, False])
def test_draw_frequencies_chi_square(replacement):
    w = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.5, 8.0, 3.0])
    g = torch.Generator().manual_seed(0)
    if replacement:
        draws = draw_weighted(w, 200_000, g)
        counts = torch.bincount(draws, minlength=w.numel()).double()
        expected = w.double() / w.sum() * draws.numel()
    else:  # first draw of each successive sample is proportional to the weights
        firsts = torch.stack([draw_weighted(w, 2, g, replacement=False) for _ in range(6000)])
        assert bool((firsts[:, 0] != firsts[:, 1]).all())
        counts = torch.bincount(firsts[:, 0], minlength=w.numel()).double()
        expected = w.double() / w.sum() * firsts.shape[0]
    assert counts[2] == 0
    keep = expected > 0
    p = stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue
    assert p > 1e-3, p


def test_without_replacement_is_a_permutation_and_heavy_first():
    n = 10_000
    w = torch.ones(n)
    w[:100] = 1000.0
    g = torch.Generator().manual_seed(1)
    perm = draw_weighted(w, n, g, replacement=False)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    assert (perm[:200] < 100).float().mean() > 0.4  # heavies come early


def test_large_n_beyond_2_pow_24():
    n = (1 << 24) + 5
    w = torch.zeros(n)
    w[-1], w[0] = 3.0, 1.0
    draws = draw_weighted(w, 40_000, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {0, n - 1}
    assert abs(float((draws == n - 1).float().mean()) - 0.75) < 0.02


def test_bucket_indices_have_no_modulo_bias():
    # torch.randint(n) for n < 2^32 takes 32 random bits modulo n: values below 2^32 mod n are over-drawn
    # (here P would be 0.343 instead of 0.295); floor(u * n) with a 53-bit u is uniform
    n = 10**9
    j = uniform_indices(n, 400_000, torch.Generator().manual_seed(0))
    assert int(j.min()) >= 0 and int(j.max()) < n
    share = float((j < 2**32 % n).double().mean())
    assert abs(share - (2**32 % n) / n) < 0.004


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([1.0, -1.0]), "non-negative"),
    (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([1.0, float("inf")]), "finite"),
    (torch.zeros(3), "at least one positive"),
    (torch.ones(2, 2), "1-D"),
    (torch.ones(0), "non-empty"),
    ("abc", "1-D tensor"),
    (torch.tensor([True, False]), "real-valued"),
])
def test_bad_weights_raise(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        draw_weighted(bad, 3, torch.Generator())
    with pytest.raises((ValueError, TypeError), match=match):
        WeightedSampler(bad)


def test_bad_arguments_raise():
    g = torch.Generator()
    with pytest.raises(ValueError, match="num_draws"):
        draw_weighted(torch.ones(3), -1, g)
    with pytest.raises(ValueError, match="at most the number of positive"):
        draw_weighted(torch.tensor([1.0, 0.0, 1.0]), 3, g, replacement=False)
    with pytest.raises(TypeError, match="torch.Generator"):
        draw_weighted(torch.ones(3), 3, 0)
    with pytest.raises(ValueError, match="rank"):
        WeightedSampler(torch.ones(3), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_samples"):
        WeightedSampler(torch.ones(3), num_samples=0)
    with pytest.raises(ValueError, match="at most the number of positive"):
        WeightedSampler(torch.tensor([1.0, 0.0]), replacement=False)
    s = WeightedSampler(torch.ones(3))
    with pytest.raises(ValueError, match="one entry per item"):
        s.set_weights(torch.ones(4))


def test_weights_not_modified_and_numpy_list_accepted():
    w = torch.tensor([1.0, 2.0, 3.0])
    build_alias_table(w)
    assert w.tolist() == [1.0, 2.0, 3.0]
    a = draw_weighted(np.array([1.0, 2.0, 3.0]), 10, torch.Generator().manual_seed(3))
    b = draw_weighted([1, 2, 3], 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_epoch_generator_distinct_streams():
    seqs = {tuple(torch.rand(4, generator=epoch_generator(s, e)).tolist()) for s in range(3) for e in range(3)}
    assert len(seqs) == 9


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("replacement", [True, False])
def test_rank_shards_disjoint_and_complete(drop_last, replacement):
    w = torch.rand(103, generator=torch.Generator().manual_seed(0)) + 0.1
    ranks = [WeightedSampler(w, replacement=replacement, seed=5, num_replicas=3, rank=r, drop_last=drop_last)
             for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == len(ranks[0])
    assert len(ranks[0]) == (103 // 3 if drop_last else math.ceil(103 / 3))
    g = ranks[0].global_indices()
    # positions are disjoint and together give exactly the global draw
    rebuilt = torch.empty_like(g)
    for r, shard in enumerate(shards):
        rebuilt[r::3] = torch.tensor(shard)
    assert torch.equal(rebuilt, g)
    unpadded = draw_weighted(w, 103, epoch_generator(5, 2), replacement=replacement)
    n = min(103, g.numel())
    assert torch.equal(g[:n], unpadded[:n])
    if not drop_last:
        assert torch.equal(g[103:], unpadded[: g.numel() - 103])  # padded with the head
    if not replacement and not drop_last:
        assert set(g[:103].tolist()) == set(range(103))


def test_same_seed_same_sequence_new_epoch_new_sequence():
    w = torch.rand(500) + 0.01
    a, b, c = WeightedSampler(w, seed=1), WeightedSampler(w, seed=1), WeightedSampler(w, seed=2)
    assert list(a) == list(b) and list(a) != list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first


def test_set_weights_applies_to_next_iter():
    s = WeightedSampler(torch.tensor([1.0, 0.0]), num_samples=50)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    s.set_weights(torch.tensor([0.0, 1.0]))
    assert head + list(it) == [0] * 50  # running epoch keeps its draw
    assert list(s) == [1] * 50


@pytest.mark.parametrize("replacement", [True, False])
def test_mid_epoch_resume_continues_exact_sequence(replacement):
    w = torch.rand(300, generator=torch.Generator().manual_seed(0)) + 0.05

    class Dynamic(WeightedSampler):  # per-epoch weights that change after the draw
        def epoch_weights(self, epoch):
            return self.weights * (1 + epoch)

    full = Dynamic(w, replacement=replacement, seed=3, num_replicas=2, rank=1)
    full.set_epoch(4)
    expected = list(full)

    run = Dynamic(w, replacement=replacement, seed=3, num_replicas=2, rank=1)
    run.set_epoch(4)
    it = iter(run)
    consumed = [next(it) for _ in range(37)]
    run.cursor = 37
    run.set_weights(torch.rand(300) + 1)  # changes after the draw must not leak into the resumed epoch
    state = run.state_dict()

    resumed = Dynamic(torch.ones(300), replacement=replacement, seed=0, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # Lightning calls this with the same epoch: keeps the resume
    assert consumed + list(resumed) == expected
    assert len(resumed) == len(full)
    # the next epoch uses the restored (new) weights and a fresh cursor
    resumed.set_epoch(5)
    assert resumed.cursor == 0 and torch.equal(resumed.weights, state["weights"])


def test_resume_under_other_world_size_loses_and_repeats_nothing():
    w = torch.rand(101) + 0.1
    old = [WeightedSampler(w, seed=9, num_replicas=2, rank=r) for r in range(2)]
    consumed = []
    for s in old:
        consumed += list(iter(s))[:10]
        s.cursor = 10
    state = old[0].state_dict()
    new = [WeightedSampler(w, num_replicas=3, rank=r) for r in range(3)]
    rest = []
    for s in new:
        s.load_state_dict(state)
        rest += list(s)
    g = old[0].global_indices()
    assert sorted(consumed + rest[: g.numel() - 20]) == sorted(g.tolist())
