"""StreamMixing under the Trainer: upweight factors, the Cooldown switch, per-domain metrics, exact resume, refusals;
MultilingualDataModule on a tiny corpus."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_reweight import StreamMixing
from lightning_reweight.callbacks.mixing import effective_tau
from lightning_reweight.data import MultilingualDataModule
from lightning_reweight.data.text import CharWindows
from lightning_reweight.models import CharTransformerLM
from lightning_reweight.rules.balance import temperature_distribution, upweight_factors
from lightning_reweight.samplers.mixture import StreamMixture
from lightning_reweight.state.validate import CheckpointStateError
from tests.helpers import make_trainer

SIZES = (30, 9, 3)


def _mixture(sizes=SIZES, seed=0) -> StreamMixture:
    sources = [CharWindows(torch.randint(0, 256, (n * 8 + 1,), generator=torch.Generator().manual_seed(k),
                                         dtype=torch.uint8), 8) for k, n in enumerate(sizes)]
    return StreamMixture(sources, names=["big", "mid", "tiny"][:len(sizes)], batch_size=4, seed=seed)


def _model() -> CharTransformerLM:
    torch.manual_seed(0)
    return CharTransformerLM(d_model=8, n_layers=1, n_heads=2, max_len=8, lr=1e-2)


class Recorder(pl.Callback):
    def __init__(self):
        self.batches, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append({k: batch[k].clone() for k in ("key", "domain", "tau")})
        mix = next(c for c in trainer.callbacks if isinstance(c, StreamMixing))
        self.weights.append(None if mix.last_weights is None else mix.last_weights.clone())


class Stop(pl.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:
            trainer.should_stop = True


def _fit(mix_cb, tmp_path, max_steps=10, mixture=None, ckpt_path=None, stop_at=None, **kw):
    rec = Recorder()
    mixture = mixture or _mixture()
    trainer = make_trainer([mix_cb, rec] + ([Stop(stop_at)] if stop_at else []), tmp_path, max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                           num_sanity_val_steps=0, **kw)
    trainer.fit(_model(), train_dataloaders=DataLoader(mixture, batch_size=None), ckpt_path=ckpt_path)
    return trainer, rec, mixture


def test_upweight_trains_on_the_natural_mixture_with_the_paper_factors(tmp_path):
    cb = StreamMixing(mode="upweight", tau=5.0, log_every_n_steps=5)
    trainer, rec, mixture = _fit(cb, tmp_path)
    assert mixture.schedule.tau == 1.0  # draws: the natural mixture
    factors = upweight_factors(torch.tensor(SIZES, dtype=torch.float64), 5.0).float()
    for batch, w in zip(rec.batches, rec.weights):
        torch.testing.assert_close(w, factors[batch["domain"]])
    assert float((torch.tensor(SIZES) / sum(SIZES) * factors.double()).sum()) == pytest.approx(1.0)
    m = trainer.callback_metrics
    assert float(m["mix/tau"]) == 5.0 and float(m["mix/draw_tau"]) == 1.0
    assert float(m["mix/w/tiny"]) == pytest.approx(float(factors[2]), rel=1e-5)
    for name in ("big", "mid", "tiny"):
        assert f"mix/p/{name}" in m and f"mix/passes/{name}" in m
    assert "mix/train_loss/big" in m and "mix/share/big" in m and "mix/tau_effective" in m


def test_cooldown_upsample_switches_at_half_the_run(tmp_path):
    cb = StreamMixing(mode="upsample", schedule="cooldown", log_every_n_steps=1)
    trainer, rec, mixture = _fit(cb, tmp_path, max_steps=10)
    assert mixture.total_sequences == 40  # max_steps x batch x world
    taus = [float(b["tau"]) for b in rec.batches]
    assert taus == [5.0] * 5 + [1.0] * 5
    assert all(w is None for w in rec.weights)  # upsampling: no loss weights
    assert float(trainer.callback_metrics["mix/tau"]) == 1.0


def test_effective_tau_recovers_the_temperature():
    sizes = torch.tensor([1000.0, 100.0, 10.0])
    for tau in (1.0, 5.0):
        assert effective_tau(sizes, temperature_distribution(sizes, tau)) == pytest.approx(tau)
    assert effective_tau(sizes, torch.ones(3)) == math.inf
    assert math.isnan(effective_tau(torch.tensor([5.0, 5.0]), torch.ones(2)))


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    full_cb = StreamMixing(mode="upsample", schedule="cooldown", log_every_n_steps=0)
    _, full, _ = _fit(full_cb, tmp_path / "a", max_steps=12)
    part_cb = StreamMixing(mode="upsample", schedule="cooldown", log_every_n_steps=0)
    trainer, part, _ = _fit(part_cb, tmp_path / "b", max_steps=12, stop_at=5)  # a 12-step run stopped at 5
    trainer.save_checkpoint(tmp_path / "part.ckpt")
    res_cb = StreamMixing(mode="upsample", schedule="cooldown", log_every_n_steps=0)
    _, rest, mixture = _fit(res_cb, tmp_path / "c", max_steps=12, ckpt_path=str(tmp_path / "part.ckpt"))
    seen = part.batches + rest.batches
    assert len(seen) == 12 and all(torch.equal(a["key"], b["key"]) for a, b in zip(seen, full.batches))
    assert [float(b["tau"]) for b in seen] == [float(b["tau"]) for b in full.batches]
    assert mixture.position == 48 and mixture.total_sequences == 48
    # other streams: refused before the first step, naming the fix
    with pytest.raises(CheckpointStateError, match="same streams"):
        _fit(StreamMixing(), tmp_path / "d", max_steps=12, mixture=_mixture(sizes=(30, 9, 4)),
             ckpt_path=str(tmp_path / "part.ckpt"))


def test_refusals_name_the_fix(tmp_path):
    class NoGroup(CharTransformerLM):
        def training_step(self, batch, batch_idx):
            return super().training_step({k: v for k, v in batch.items() if k != "domain"}, batch_idx)

    trainer = make_trainer([StreamMixing(mode="upweight")], tmp_path, max_steps=2, max_epochs=-1,
                           limit_val_batches=0)
    with pytest.raises(ValueError, match=r'group=batch\["domain"\]'):
        trainer.fit(NoGroup(d_model=8, n_layers=1, n_heads=2, max_len=8),
                    train_dataloaders=DataLoader(_mixture(), batch_size=None))
    trainer = make_trainer([StreamMixing()], tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0)
    plain = DataLoader([{"x": torch.zeros(8, dtype=torch.long), "y": torch.zeros(8, dtype=torch.long)}] * 4,
                       batch_size=2)
    with pytest.raises(TypeError, match="StreamMixture"):
        trainer.fit(_model(), train_dataloaders=plain)
    trainer = make_trainer([StreamMixing(schedule="cooldown")], tmp_path, max_steps=-1, max_epochs=1,
                           limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(_model(), train_dataloaders=DataLoader(_mixture(), batch_size=None))
    class WrongGroup(CharTransformerLM):
        def training_step(self, batch, batch_idx):
            return super().training_step(dict(batch, domain=batch["domain"] + 5), batch_idx)

    trainer = make_trainer([StreamMixing()], tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"domain ids in \[0, 3\)"):
        trainer.fit(WrongGroup(d_model=8, n_layers=1, n_heads=2, max_len=8),
                    train_dataloaders=DataLoader(_mixture(), batch_size=None))
    from lightning_reweight import Reweighter

    with pytest.raises(RuntimeError, match="drive the `StreamMixture` yourself"):
        Reweighter([StreamMixing()]).reduce(torch.ones(2, requires_grad=True), group=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="'upsample' or 'upweight'"):
        StreamMixing(mode="resample")
    with pytest.raises(ValueError, match="total_sequences"):
        StreamMixing(total_sequences=0)


def _corpus(root: Path) -> Path:
    for lang, n in (("aa", 40), ("bb", 12), ("cc", 4)):
        (root / lang).mkdir(parents=True)
        dialogs = "\n".join(f"- - hello {lang} {i}\n  - fine {i}, thanks" for i in range(n))
        (root / lang / "talk.yml").write_text(f"categories:\n- talk\nconversations:\n{dialogs}\n")
    return root


def test_multilingual_module_reports_per_language_validation_a_checkpoint_can_monitor(tmp_path):
    root = _corpus(tmp_path / "corpus")
    dm = MultilingualDataModule(root=str(root), languages=["aa", "bb", "cc"], seq_len=8, batch_size=4,
                                min_val_windows=1)
    dm.setup()
    assert dm.domain_names == ["aa", "bb", "cc"] and dm.sizes[0] > dm.sizes[1] > dm.sizes[2] >= 1
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/bpc_worst", mode="min")
    trainer = make_trainer([StreamMixing(tau=5.0, log_every_n_steps=2), ckpt], tmp_path, max_steps=4, max_epochs=-1,
                           val_check_interval=2, check_val_every_n_epoch=None, enable_checkpointing=True,
                           num_sanity_val_steps=0)
    trainer.fit(_model(), datamodule=dm)
    m = trainer.callback_metrics
    per = torch.tensor([float(m[f"val/bpc/{lang}"]) for lang in ("aa", "bb", "cc")])
    assert float(m["val/bpc_worst"]) == pytest.approx(float(per.max()), rel=1e-5)
    assert float(m["val/bpc_mean"]) == pytest.approx(float(per.mean()), rel=1e-5)
    assert ckpt.best_model_score is not None and ckpt.best_model_path
    assert "mix/train_loss/cc" in m or "mix/train_loss/aa" in m


def test_multilingual_module_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pass `root=`"):
        MultilingualDataModule(root=str(tmp_path / "nowhere")).setup()
    root = _corpus(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match=r"Choose `languages=` from \['aa', 'bb', 'cc'\]"):
        MultilingualDataModule(root=str(root), languages=["aa", "zz"]).setup()
    with pytest.raises(ValueError, match="Lower `seq_len`"):
        MultilingualDataModule(root=str(root), languages=["cc"], seq_len=64).setup()
    dm = MultilingualDataModule(root=str(root), languages=["aa", "bb"], seq_len=8, batch_size=2)
    trainer = make_trainer([], tmp_path, max_steps=1, max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match="Add `StreamMixing"):
        trainer.fit(_model(), datamodule=dm)
    with pytest.raises(ValueError, match="val_frac"):
        MultilingualDataModule(val_frac=1.5)
    with pytest.raises(ValueError, match="distinct languages"):
        MultilingualDataModule(languages=["aa", "aa"])
    with pytest.raises(ValueError, match="seq_len, batch_size"):
        MultilingualDataModule(seq_len=0)


def test_domain_ids_and_keys_compose_with_group_dro_febs_and_keyed_rules(tmp_path):
    from lightning_reweight import GroupDRO, LossReweighting
    from lightning_reweight.callbacks import FairErrorBoundScaling

    mixture = _mixture()
    dro = GroupDRO(num_groups=3, step_size=0.1, log_every_n_steps=0)
    trainer = make_trainer([StreamMixing(mode="upweight"), dro], tmp_path, max_steps=4, max_epochs=-1,
                           limit_val_batches=0)
    trainer.fit(_model(), train_dataloaders=DataLoader(mixture, batch_size=None))  # group = domain, no index
    assert dro.q.numel() == 3 and not torch.allclose(dro.q, torch.full((3,), 1 / 3, dtype=dro.q.dtype))
    # per-sample state keyed by the mixture's stable keys: FEBS (groups = domains) and a keyed LinUpper table
    febs = FairErrorBoundScaling(num_groups=3, log_every_n_steps=0)
    keyed = LossReweighting("linupper", warmup_steps=1, num_samples=mixture.num_keys, log_every_n_steps=0)
    model = CharTransformerLM(d_model=8, n_layers=1, n_heads=2, max_len=8, sample_keys="exact")
    trainer = make_trainer([StreamMixing(tau=5.0), febs, keyed], tmp_path, max_steps=4, max_epochs=-1,
                           limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(mixture, batch_size=None))
    assert keyed.table.num_samples == sum(SIZES) and int(keyed.table.state_dict()["columns"]["count"].sum()) == 16
