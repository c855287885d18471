"""Elastic resume: a mid-epoch checkpoint written by W1 processes, resumed on W2, continues
with exactly the rest of the interrupted epoch (the same multiset of samples) and later epochs equal an
uninterrupted W2 run; for WeightedSampler (+ LossReweighting, whose table continues), RS2Sampler,
GroupBalancing's TemperatureSampler (step-unit Cooldown) and ImportanceSampling; 1 -> 2, 2 -> 1, 2 -> 3, and a
second resume (1 -> 2 -> 3) from a checkpoint written inside the resumed epoch. Real CPU DDP runs (gloo)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.samplers import WeightedSampler
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "elastic_resume_ddp.py"
KINDS = ("weighted", "rs2", "temperature", "importance")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs on 1, 2, 3 processes and the resumed ones (name -> per-rank records)."""
    root = tmp_path_factory.mktemp("elastic")
    plan = [("full1", 1, "20", None), ("full2", 2, "5,20", None), ("full3", 3, "", None),
            ("r1to2", 2, "23", ("full1", 20)),  # the repro: step 20 = epoch 1, 5 of 15 batches done
            ("r2to1", 1, "", ("full2", 5)),     # epoch 0, 5 of 8 batches done (40 of 60 samples)
            ("r2to3", 3, "", ("full2", 20)),    # epoch 2, 4 of 8 batches: 28 samples left -> 10, 9, 9 per rank
            ("r1to2to3", 3, "", ("r1to2", 23)),  # checkpoint written inside the resumed (rebased) epoch
            ("r1to2to2", 2, "24", ("r1to2", 23))]  # ... resumed again on the world size that wrote it
    out = {}
    for name, devices, save, source in plan:
        d = root / name
        d.mkdir()
        args = [str(devices), save] + ([str(root / source[0]), str(source[1])] if source else [])
        run_ddp_script(SCRIPT, d, *args, timeout=400)
        out[name] = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(devices)]
    out["root"] = root
    return out


def _epoch(records, kind, epoch, before=None):
    """All ranks' samples of ``epoch`` (trained at global steps < ``before``), as a sorted multiset."""
    return sorted(i for rec in records for e, step, idx in rec[kind]["seen"]
                  if e == epoch and (before is None or step < before) for i in idx)


def _per_rank(records, kind, epoch):
    return [[i for e, _, idx in rec[kind]["seen"] if e == epoch for i in idx] for rec in records]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("resumed", "source", "step", "reference"),
                         [("r1to2", "full1", 20, "full2"), ("r2to1", "full2", 5, "full1"),
                          ("r2to3", "full2", 20, "full3")])
def test_elastic_resume_is_exact(runs, kind, resumed, source, step, reference):
    first, rest, ref = runs[source], runs[resumed], runs[reference]
    epoch, start = rest[0][kind]["seen"][0][:2]
    assert start == step
    # the rest of the interrupted epoch: exactly the samples the uninterrupted W1 run had left (none skipped,
    # none replayed), spread over the W2 ranks with the same number of batches each
    assert _epoch(first, kind, epoch, before=step) + _epoch(rest, kind, epoch) != []
    assert sorted(_epoch(first, kind, epoch, before=step) + _epoch(rest, kind, epoch)) == _epoch(first, kind, epoch)
    steps = {len([1 for e, _, _ in rec[kind]["seen"] if e == epoch]) for rec in rest}
    assert len(steps) == 1
    # later epochs: identical, rank by rank, to an uninterrupted run on the new world size
    later = range(epoch + 1, 4)
    assert len(later) > 0
    for e in later:
        assert _per_rank(rest, kind, e) == _per_rank(ref, kind, e)
    # tables identical on every rank and equal to the uninterrupted run's (same samples, frozen model)
    for rec in rest:
        if "table" in rec[kind]:
            for column in ("loss", "ema_loss", "count"):
                torch.testing.assert_close(rec[kind]["table"][column], ref[0][kind]["table"][column],
                                           rtol=0, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(rec[kind]["table"]["count"], rest[0][kind]["table"]["count"], rtol=0, atol=0)
        if "probs" in rec[kind]:
            torch.testing.assert_close(rec[kind]["probs"], ref[0][kind]["probs"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "reference"), [("r1to2to3", "full3"), ("r1to2to2", "full2")])
def test_second_resume_from_a_checkpoint_written_after_a_resume_is_exact(runs, kind, name, reference):
    """1 -> 2 at step 20, that run's step-23 checkpoint (inside the resumed epoch) -> 3 or again 2 processes."""
    first, middle, last = runs["full1"], runs["r1to2"], runs[name]
    assert last[0][kind]["seen"][0][:2] == (1, 23)
    consumed = _epoch(first, kind, 1, before=20) + _epoch(middle, kind, 1, before=23) + _epoch(last, kind, 1)
    assert sorted(consumed) == _epoch(first, kind, 1)
    for e in (2, 3):
        assert _per_rank(last, kind, e) == _per_rank(runs[reference], kind, e)


def test_refuses_when_the_rest_of_the_epoch_cannot_be_split_evenly():
    """30 samples, batch 4: 2 processes stop after 2 batches each (16 samples); the 14 left give 3 processes
    5, 5 and 4 samples = 2, 2 and 1 batches: a rank would idle or replay, so resuming refuses."""
    w = torch.rand(30) + 0.1
    old = WeightedSampler(w, seed=1, num_replicas=2, rank=0)
    old.set_cursor(8)
    state = old.state_dict()
    assert state["position"] == 16
    for rank in range(3):
        sampler = WeightedSampler(w, num_replicas=3, rank=rank)
        sampler.load_state_dict(state)
        assert sampler.remaining_per_rank() == [5, 5, 4]
        cb = SamplerState()
        cb._bound = [(DataLoader(range(30), batch_size=4, sampler=sampler), sampler)]
        trainer = SimpleNamespace(world_size=3, current_epoch=0, num_training_batches=3)
        with pytest.raises(RuntimeError, match=r"on 3 processes: the checkpoint was written by 2 process"):
            cb._continue_on_new_world(trainer, 2)
    # the same checkpoint on 2 or 1 process(es) continues exactly
    rest = []
    for rank in range(2):
        sampler = WeightedSampler(w, num_replicas=2, rank=rank)
        sampler.load_state_dict(state)
        rest += list(sampler)
    glob = old.global_indices()
    assert sorted(rest) == sorted(glob[16:].tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_position_counts_the_samples_consumed(runs, kind):
    """The position a checkpoint stores is the number of samples of the epoch all ranks consumed so far, also in
    a run resumed twice (1 -> 2 -> 2, whose cursor must continue the restored batch counter)."""
    consumed = (_epoch(runs["full1"], kind, 1, before=20) + _epoch(runs["r1to2"], kind, 1, before=23)
                + _epoch(runs["r1to2to2"], kind, 1, before=24))
    for name, step, expected in (("r1to2", 23, 44), ("r1to2to2", 24, len(consumed))):
        ckpt = torch.load(runs["root"] / name / kind / f"step={step}.ckpt", weights_only=False)
        (state,) = [v for k, v in ckpt["callbacks"].items() if "SamplerState" in k]
        (sampler,) = state["samplers"]
        assert sampler["epoch"] == 1 and sampler["position"] == expected
    assert len(consumed) == 52
