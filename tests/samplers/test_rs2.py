"""RS2: exactly k per round, the whole data set before any repeat, sharding, resume, exact step counts."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.samplers.rs2 import RS2Sampler, rs2_cosine_schedule


@pytest.mark.parametrize("n,fraction", [(100, 0.1), (103, 0.3), (10, 1.0), (37, 0.25)])
def test_rounds_have_k_and_cover_everything_before_a_repeat(n, fraction):
    s = RS2Sampler(n, fraction=fraction, seed=4)
    k = round(fraction * n)
    rounds = []
    for epoch in range(3 * math.ceil(n / k)):
        s.set_epoch(epoch)
        rounds.append(list(s))
    assert all(len(r) == k for r in rounds)
    stream = [i for r in rounds for i in r]
    full_rounds = n // k  # rounds entirely inside the first permutation: no repeats
    first = stream[: full_rounds * k]
    assert len(set(first)) == len(first)
    assert set(stream[: math.ceil(n / k) * k]) == set(range(n))  # everything seen by round ceil(N/k)
    for rounds_done in range(1, len(rounds) + 1):  # coverage stays balanced: counts differ by at most 1
        counts = torch.bincount(torch.tensor(stream[: rounds_done * k]), minlength=n)
        t = rounds_done * k
        assert int(counts.min()) >= t // n and int(counts.max()) <= math.ceil(t / n)


def test_rounds_are_shuffled_and_reproducible():
    a, b = RS2Sampler(1000, 0.1, seed=1), RS2Sampler(1000, 0.1, seed=1)
    a.set_epoch(9), b.set_epoch(9)  # round 9 spans permutations 0 and 1
    ra = list(a)
    assert ra == list(b)
    assert ra != sorted(ra)
    c = RS2Sampler(1000, 0.1, seed=2)
    c.set_epoch(9)
    assert list(c) != ra


def test_with_replacement_rounds_are_independent_subsets():
    s = RS2Sampler(50, 0.2, replacement=True, seed=0)
    seen = []
    for e in range(5):
        s.set_epoch(e)
        r = list(s)
        assert len(r) == 10 and len(set(r)) == 10
        seen += r
    assert len(set(seen)) < len(seen)  # repeats across rounds are allowed (and happen)


def test_sharded_rounds_are_disjoint_and_complete():
    ranks = [RS2Sampler(101, 0.3, seed=3, num_replicas=4, rank=r) for r in range(4)]
    for s in ranks:
        s.set_epoch(5)
    shards = [list(s) for s in ranks]
    assert {len(x) for x in shards} == {8}  # ceil(30 / 4)
    g = ranks[0].global_indices()
    rebuilt = torch.empty(32, dtype=torch.int64)
    for r, x in enumerate(shards):
        rebuilt[r::4] = torch.tensor(x)
    assert torch.equal(rebuilt, g) and torch.equal(g[30:], g[:2])  # padded with the round's head


def test_state_and_resume():
    s = RS2Sampler(200, 0.15, seed=5)
    s.set_epoch(7)
    expected = list(s)
    it = iter(s)
    head = [next(it) for _ in range(11)]
    s.cursor = 11
    state = s.state_dict()
    assert state["weights"] is None and state["rs2"]["permutation"] == 7 * 30 // 200
    assert state["rs2"]["stream_offset"] == 7 * 30 % 200
    t = RS2Sampler(200, 0.15, seed=0)
    t.load_state_dict(state)
    t.set_epoch(7)
    assert head + list(t) == expected
    with pytest.raises(ValueError, match="cover 100 items"):
        RS2Sampler(100, 0.15).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        RS2Sampler(10, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        RS2Sampler(10, 1.5)
    with pytest.raises(ValueError, match="at least 1"):
        RS2Sampler(10, 0.01)
    with pytest.raises(TypeError, match="num_items"):
        RS2Sampler(object())
    with pytest.raises(ValueError, match="batch_size"):
        RS2Sampler(10, 0.5).steps_per_epoch(0)


class _Counter(pl.LightningModule):
    def __init__(self, sampler):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.sampler = sampler
        self.lrs = []

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(self.sampler.num_items, 1)), batch_size=7, sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = int(self.trainer.estimated_stepping_batches)
        assert total == self.sampler.total_steps(4, batch_size=7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": rs2_cosine_schedule(opt, total), "interval": "step"}}


def test_exact_step_count_drives_a_full_cosine(tmp_path):
    sampler = RS2Sampler(95, 0.2, seed=0)  # k = 19 -> 3 batches of 7 per round
    model = _Counter(sampler)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=4, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, callbacks=[SamplerState()])
    trainer.fit(model)
    assert trainer.global_step == sampler.total_steps(4, 7) == 12
    assert model.lrs[0] == pytest.approx(0.1)
    opt_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert opt_lr == pytest.approx(1e-4)  # the cosine reached eta_min exactly at the last step
