"""StreamMixture: temperature shares, counter-based draws, the Cooldown switch, cycling, shards, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import IterableDataset

from lightning_reweight.data.text import CharWindows
from lightning_reweight.rules.balance import TemperatureSchedule, temperature_distribution
from lightning_reweight.samplers.mixture import StreamMixture, draw_domains, schedule_taus, uniform01
from lightning_reweight.state.validate import CheckpointStateError


def _windows(n: int, seq_len: int = 4, seed: int = 0) -> CharWindows:
    g = torch.Generator().manual_seed(seed)
    return CharWindows(torch.randint(0, 256, (n * seq_len + 1,), generator=g, dtype=torch.uint8), seq_len)


def _mixture(sizes=(40, 12, 3), batch_size=4, tau=5.0, **kw) -> StreamMixture:
    kw.setdefault("schedule", TemperatureSchedule("constant", tau=tau))
    return StreamMixture([_windows(n, seed=k) for k, n in enumerate(sizes)], batch_size=batch_size, **kw)


def _take(mix: StreamMixture, steps: int, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1):
    it = mix.iter_batches(rank, world, worker, workers)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("tau", [1.0, 5.0, float("inf")])
def test_domain_shares_match_the_temperature_distribution(tau):
    sizes = torch.tensor([1000, 100, 10, 1])
    n = 200_000
    pos = torch.arange(n)
    dom = draw_domains(sizes, torch.full((n,), tau, dtype=torch.float64), uniform01(pos, seed=3))
    share = torch.bincount(dom, minlength=4).double() / n
    torch.testing.assert_close(share, temperature_distribution(sizes.double(), tau), atol=4e-3, rtol=0)


def test_draws_are_counter_based_in_seed_and_position_only():
    mix = _mixture()
    full = mix.domains(0, 1000)
    assert torch.equal(full[300:700], mix.domains(300, 400))  # any window of the run, computed alone
    other = _mixture(seed=1).domains(0, 1000)
    assert not torch.equal(full, other)


def test_cooldown_switches_the_draw_temperature_at_half_the_run():
    mix = _mixture(schedule=TemperatureSchedule("cooldown"), total_sequences=1000)
    taus = mix.taus(torch.arange(1000))
    assert torch.all(taus[:500] == 5.0) and torch.all(taus[500:] == 1.0)
    hot, cold = _mixture(tau=5.0).domains(0, 1000), _mixture(tau=1.0).domains(0, 1000)
    dom = mix.domains(0, 1000)
    assert torch.equal(dom[:500], hot[:500]) and torch.equal(dom[500:], cold[500:])  # the same u_i, another τ
    batches = _take(mix, 250)  # 4 per step: the switch lies between step 124 and 125
    assert float(batches[124]["tau"]) == 5.0 and float(batches[125]["tau"]) == 1.0
    with pytest.raises(ValueError, match="total_sequences"):
        _mixture(schedule=TemperatureSchedule("cooldown")).domains(0, 4)


@pytest.mark.parametrize("shape", ["step", "linear", "cosine"])
@pytest.mark.parametrize("switch", [0.5, 0.3])
def test_vectorised_schedule_equals_the_scalar_one(shape, switch):
    schedule = TemperatureSchedule("cooldown", tau_start=5.0, tau_end=1.0, switch_fraction=switch, shape=shape)
    progress = torch.linspace(-0.1, 1.1, 241, dtype=torch.float64)
    expected = torch.tensor([schedule(float(p)) for p in progress], dtype=torch.float64)
    torch.testing.assert_close(schedule_taus(schedule, progress), expected)


def test_a_small_stream_cycles_with_a_fresh_shuffle_and_its_passes_are_counted():
    mix = _mixture(sizes=(40, 3), tau=float("inf"))  # uniform over domains: the 3-window domain repeats a lot
    batches = _take(mix, 60)
    keys = torch.cat([b["key"][b["domain"] == 1] for b in batches]) - 40
    counts = batches[-1]["counts"]
    assert int(counts[1]) == keys.numel()
    passes = [keys[i:i + 3] for i in range(0, keys.numel() - 2, 3)]
    assert all(sorted(p.tolist()) == [0, 1, 2] for p in passes)  # every pass visits each window once
    assert len({tuple(p.tolist()) for p in passes}) > 1  # ... in a fresh order
    mix.advance(int(batches[-1]["end"]), counts)
    torch.testing.assert_close(mix.passes, counts.double() / torch.tensor([40.0, 3.0]))
    assert float(mix.passes[1]) > 30


def test_ranks_and_workers_hold_disjoint_shares_whose_union_is_the_global_sequence():
    mix = _mixture(batch_size=4)
    single = _take(_mixture(batch_size=8), 10)
    ranks = [_take(mix, 10, rank=r, world=2) for r in range(2)]
    for s in range(10):
        glued = torch.cat([ranks[0][s]["key"], ranks[1][s]["key"]])
        assert torch.equal(glued, single[s]["key"])  # rank r holds rows [rB, (r+1)B) of the global step
        assert torch.equal(torch.cat([ranks[0][s]["x"], ranks[1][s]["x"]]), single[s]["x"])
    # two workers of rank 1 build alternate steps; together they give the rank's batches in order
    w0, w1 = _take(mix, 5, 1, 2, 0, 2), _take(mix, 5, 1, 2, 1, 2)
    merged = [b for pair in zip(w0, w1) for b in pair]
    assert all(torch.equal(a["key"], b["key"]) for a, b in zip(merged, ranks[1]))


def _resume(steps_before: int, world_before: int, world_after: int, total: int = 12):
    """Keys of the global steps after a resume at ``steps_before`` (global batch 8 on both sides)."""
    before = _mixture(batch_size=8 // world_before)
    last = _take(before, steps_before, world=world_before)[-1]
    before.advance(int(last["end"]), last["counts"])
    after = _mixture(batch_size=8 // world_after)
    after.load_state_dict(before.state_dict())
    ranks = [_take(after, total - steps_before, rank=r, world=world_after) for r in range(world_after)]
    return [torch.cat([r[s]["key"] for r in ranks]) for s in range(total - steps_before)]


@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_continues_exactly_on_any_number_of_processes(world_before, world_after):
    full = [b["key"] for b in _take(_mixture(batch_size=8), 12)]
    rest = _resume(5, world_before, world_after)
    assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))


class _Shuffled(IterableDataset):
    """A plain iterable stream of dict items that reshuffles per ``set_epoch``."""

    def __init__(self, n: int):
        self.n, self.epoch, self.epochs_seen = n, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield {"x": torch.full((3,), i), "key": torch.tensor(100 + i)}


def test_iterable_streams_cycle_with_set_epoch_and_resume_by_reading_forward():
    def make():
        return StreamMixture([_Shuffled(20), _Shuffled(2)], sizes=[20, 2], batch_size=4,
                             schedule=TemperatureSchedule("constant", tau=float("inf")))

    mix = make()
    batches = _take(mix, 12)
    small = torch.cat([b["key"][b["domain"] == 1] for b in batches])
    assert set(small.tolist()) == {20 + 100, 20 + 101}  # offset 20 + the stream's own key
    assert int(batches[-1]["counts"][1]) == small.numel() > 4  # passes of 2 items: cycled
    resumed = make()
    mid = batches[5]
    state = dict(mix.state_dict(), position=int(mid["end"]), counts=mid["counts"])
    resumed.load_state_dict(state)
    rest = _take(resumed, 6)
    assert all(torch.equal(a["key"], b["key"]) for a, b in zip(rest, batches[6:]))


def test_refusals_name_the_fix():
    mix = _mixture()
    state = mix.state_dict()
    with pytest.raises(CheckpointStateError, match="same streams"):
        _mixture(sizes=(40, 12, 4)).load_state_dict(state)
    with pytest.raises(CheckpointStateError, match="same seed"):
        _mixture(seed=9).load_state_dict(state)
    with pytest.raises(CheckpointStateError, match="summing to position"):
        mix.load_state_dict(dict(state, position=5))
    with pytest.raises(ValueError, match="sizes="):
        StreamMixture([_Shuffled(4)])
    short = StreamMixture([_Shuffled(3)], sizes=[5], batch_size=4)
    with pytest.raises(ValueError, match="true length in `sizes=`"):
        _take(short, 2)
    with pytest.raises(TypeError, match="dict"):
        _take(StreamMixture([[1, 2, 3]], batch_size=2), 1)
    with pytest.raises(ValueError, match="distinct names"):
        _mixture(names=["a", "a", "b"])
    with pytest.raises(ValueError, match="positive size"):
        StreamMixture([_Shuffled(3)], sizes=[0])
    with pytest.raises(ValueError, match="batch_size"):
        _mixture(batch_size=0)
    with pytest.raises(ValueError, match="total_sequences"):
        _mixture(total_sequences=0)
    with pytest.raises(ValueError, match="at least one stream"):
        StreamMixture([])
