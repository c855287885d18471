"""TemperatureSampler and GroupBalancing (upsample / upweight, Cooldown) on tiny synthetic data."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.balancing import GroupBalancing
from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.rules.balance import TemperatureSchedule, temperature_distribution, upweight_factors
from lightning_reweight.samplers.balanced import TemperatureSampler

LABELS = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)


def _chi2_pvalue(counts, probs):
    counts = counts.double()
    probs = probs.double()
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 0
    return stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0, math.inf])
def test_group_draw_frequencies_chi_square(tau):
    sampler = TemperatureSampler(LABELS, tau=tau, num_samples=20_000, seed=3)
    draws = sampler.global_indices(0)
    counts = torch.bincount(LABELS[draws], minlength=3)
    assert _chi2_pvalue(counts, temperature_distribution([80, 15, 5], tau)) > 1e-3
    # within a group the draw is uniform
    within = torch.bincount(draws[LABELS[draws] == 1] - 80, minlength=15)
    assert _chi2_pvalue(within, torch.full((15,), 1 / 15)) > 1e-3
    torch.testing.assert_close(sampler.draw_frequencies(draws).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_cooldown_over_epochs():
    sampler = TemperatureSampler(LABELS, schedule=TemperatureSchedule("cooldown"), num_epochs=4, num_samples=20_000)
    assert [sampler.tau_for_epoch(e) for e in range(4)] == [5.0, 5.0, 1.0, 1.0]
    for epoch, tau in [(0, 5.0), (3, 1.0)]:
        counts = torch.bincount(LABELS[sampler.global_indices(epoch)], minlength=3)
        assert _chi2_pvalue(counts, temperature_distribution([80, 15, 5], tau)) > 1e-3
    with pytest.raises(ValueError, match="num_epochs"):
        TemperatureSampler(LABELS, schedule=TemperatureSchedule("cooldown")).global_indices(0)


def test_cooldown_over_steps_switches_inside_an_epoch():
    n = 10_000
    # 3 epochs of n draws; switch at 0.5 -> position n/2 of epoch 1
    sampler = TemperatureSampler(LABELS, schedule=TemperatureSchedule("cooldown", tau_start=math.inf),
                                 unit="step", total_draws=3 * n, num_samples=n)
    first = sampler.global_indices(0)
    mid = sampler.global_indices(1)
    before, after = LABELS[mid[: n // 2]], LABELS[mid[n // 2:]]
    assert _chi2_pvalue(torch.bincount(LABELS[first], minlength=3), torch.full((3,), 1 / 3)) > 1e-3
    assert _chi2_pvalue(torch.bincount(before, minlength=3), torch.full((3,), 1 / 3)) > 1e-3
    assert _chi2_pvalue(torch.bincount(after, minlength=3), torch.tensor([0.8, 0.15, 0.05])) > 1e-3
    assert torch.equal(mid, sampler.global_indices(1))  # deterministic
    with pytest.raises(ValueError, match="replacement=True"):
        TemperatureSampler(LABELS, unit="step", replacement=False)


def test_shards_disjoint_and_complete_and_resume():
    a = TemperatureSampler(LABELS, tau=2.0, num_replicas=2, rank=0, seed=5)
    b = TemperatureSampler(LABELS, tau=2.0, num_replicas=2, rank=1, seed=5)
    glob = a.global_indices(0)
    ia, ib = list(a), list(b)
    assert ia == glob[0::2].tolist() and ib == glob[1::2].tolist()
    # mid-epoch resume continues the same sequence
    a.cursor = 7
    state = a.state_dict()
    c = TemperatureSampler(LABELS, tau=2.0, num_replicas=2, rank=0, seed=5)
    c.load_state_dict(state)
    assert list(c) == ia[7:]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Expected argument `tau` to be a positive number"):
        TemperatureSampler(LABELS, tau=0.0)
    with pytest.raises(ValueError, match="ids >= 0"):
        TemperatureSampler(torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="mode"):
        GroupBalancing(mode="resample")
    with pytest.raises(ValueError, match="tau_start"):
        GroupBalancing(schedule="cooldown", tau_start=-5.0)
    with pytest.raises(ValueError, match="unit"):
        GroupBalancing(unit="batch")


# ----------------------------------------------------------------------------- Lightning
class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.seen, self.weights = [], []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.clone())
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(labels=LABELS, targets=True, batch_size=10):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(labels.numel(), 4, generator=g), labels)
    return DataLoader(IndexedDataset(ds, targets=labels if targets else None), batch_size=batch_size, shuffle=True)


def _trainer(tmp_path, callbacks, **kw):
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, **kw)


def test_upsample_installs_sampler_and_draws_balanced(tmp_path):
    cb = GroupBalancing(mode="upsample", tau=math.inf, num_samples=1500)
    model = Tiny()
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, _loader())
    assert isinstance(trainer.train_dataloader.sampler, TemperatureSampler)
    assert any(isinstance(c, SamplerState) for c in trainer.callbacks)
    drawn = torch.cat(model.seen)
    assert drawn.numel() == 1500
    assert _chi2_pvalue(torch.bincount(LABELS[drawn], minlength=3), torch.full((3,), 1 / 3)) > 1e-3
    freq = [float(trainer.callback_metrics[f"balance/draw_freq/group_{g}"]) for g in range(3)]
    assert all(abs(f - 1 / 3) < 0.05 for f in freq)


def test_upweight_gives_group_weights_and_keeps_shuffling(tmp_path):
    seen = []

    class Spy(GroupBalancing):
        def on_weights_computed(self, batch, weights, trainer, pl_module):
            super().on_weights_computed(batch, weights, trainer, pl_module)
            seen.append((trainer.current_epoch, weights.clone(), LABELS[batch.index]))

    cb = Spy(mode="upweight", schedule="cooldown", log_every_n_steps=1)
    model = Tiny()
    trainer = _trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model, _loader())
    assert not isinstance(trainer.train_dataloader.sampler, TemperatureSampler)
    assert cb.normalized is False  # expectation-exact scalarization, no per-batch renormalisation
    # epoch 0: tau 5, epoch 1: tau 1 (weights 1)
    w5 = upweight_factors([80, 15, 5], 5.0)
    torch.testing.assert_close(cb.group_weights(5.0), w5)
    assert float(trainer.callback_metrics["balance/tau"]) == 1.0
    assert float(trainer.callback_metrics["balance/w/group_2"]) == pytest.approx(1.0)
    for epoch, weights, labels in seen:
        expected = (w5 if epoch == 0 else torch.ones(3, dtype=torch.float64))[labels].float()
        torch.testing.assert_close(weights, expected)


def test_upweight_loss_equals_weighted_mean(tmp_path):
    captured = {}

    class Check(Tiny):
        def training_step(self, batch, batch_idx):
            x, y, index = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            loss = reduce_loss(self, losses, index, target=y)
            w = upweight_factors([80, 15, 5], 3.0)[LABELS[index]].float()
            captured.setdefault("pairs", []).append((float(loss.detach()), float((w * losses.detach()).mean())))
            return loss

    _trainer(tmp_path, [GroupBalancing(mode="upweight", tau=3.0)], max_steps=3).fit(Check(), _loader())
    for got, expected in captured["pairs"]:
        assert got == pytest.approx(expected, rel=1e-5)


def test_missing_ids_raise_clear_error(tmp_path):
    ds = IndexedDataset(TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="IndexedDataset"):
        _trainer(tmp_path, [GroupBalancing()], max_steps=1).fit(Tiny(), DataLoader(ds, batch_size=5))
    with pytest.raises(ValueError, match="max_epochs"):
        _trainer(tmp_path, [GroupBalancing(schedule="cooldown")], max_steps=2, max_epochs=-1).fit(Tiny(), _loader())


def test_checkpoint_round_trip_resumes_the_same_draws(tmp_path):
    full = Tiny()
    pl.Trainer(default_root_dir=tmp_path / "f", accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, max_epochs=4,
               callbacks=[GroupBalancing(schedule="cooldown", seed=1)]).fit(full, _loader())
    first = Tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=23, save_top_k=-1)
    pl.Trainer(default_root_dir=tmp_path / "a", accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, max_epochs=4, max_steps=23,
               callbacks=[GroupBalancing(schedule="cooldown", seed=1), ckpt]).fit(first, _loader())
    second = Tiny()
    pl.Trainer(default_root_dir=tmp_path / "b", accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, max_epochs=4,
               callbacks=[GroupBalancing(schedule="cooldown", seed=1)]).fit(
        second, _loader(), ckpt_path=next((tmp_path / "ckpt").glob("*.ckpt")))
    resumed = [t.tolist() for t in first.seen + second.seen]
    assert resumed == [t.tolist() for t in full.seen]


def test_group_statistics_logged(tmp_path):
    cb = GroupBalancing(mode="upsample", schedule="cooldown")
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=2, log_every_n_steps=1,
                         logger=pl.loggers.CSVLogger(tmp_path), callbacks=[cb])
    trainer.fit(Tiny(), _loader())
    m = trainer.callback_metrics
    assert float(m["balance/tau"]) == 1.0  # epoch 1 of 2 is past the switch
    torch.testing.assert_close(torch.tensor([float(m[f"balance/p/group_{g}"]) for g in range(3)]),
                               torch.tensor([0.8, 0.15, 0.05]))
    assert sum(float(m[f"balance/draw_freq/group_{g}"]) for g in range(3)) == pytest.approx(1.0)
    # SamplerState's per-group sampling mass of each epoch's distribution: tau 5, then 1
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    mass = [float(r["sampler/group_2/mass"]) for r in rows if r.get("sampler/group_2/mass")]
    expected = temperature_distribution([80, 15, 5], 5.0)[2]
    assert mass[0] == pytest.approx(float(expected), rel=1e-4) and mass[-1] == pytest.approx(0.05, rel=1e-4)


def test_datamodule_source_and_plugin_adoption(tmp_path):
    from lightning_reweight.data.plugin import SamplingDataModule

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return _loader()

    cb = GroupBalancing(mode="upsample", tau=math.inf, num_samples=600)
    model = Tiny()
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, datamodule=DM())
    assert isinstance(trainer.train_dataloader.sampler, TemperatureSampler) and cb.sampler is trainer.train_dataloader.sampler
    # the DataModule plugin's own TemperatureSampler is adopted, not replaced
    ds = TensorDataset(torch.randn(100, 4), LABELS)
    plugin = SamplingDataModule(ds, sampler="temperature", sampler_kwargs={"tau": 2.0}, batch_size=10, targets=LABELS)
    cb = GroupBalancing(mode="upsample")
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(Tiny(), datamodule=plugin)
    assert cb.sampler is plugin.sampler and cb.sampler.tau_for_epoch(0) == 2.0
    assert sum(isinstance(c, SamplerState) for c in trainer.callbacks) == 1


def test_schedule_by_name():
    s = TemperatureSampler(LABELS, schedule="cooldown", tau_start=3.0, num_epochs=2)
    assert [s.tau_for_epoch(0), s.tau_for_epoch(1)] == [3.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        TemperatureSampler(LABELS, schedule="warmup")
    with pytest.raises(TypeError, match="TemperatureSchedule"):
        TemperatureSampler(LABELS, schedule=5)
