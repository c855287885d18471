"""ImportanceSampling + ImportanceSampler under a real Trainer: PA&DA score table, refresh, floor, unbiasing
weights, checkpoint round trip, 2-process DDP."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.importance import ImportanceSampling
from lightning_reweight.rules.importance import importance_probabilities
from lightning_reweight.samplers.importance import ImportanceSampler
from tests.helpers import run_ddp_script

N = 40
SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "importance_sampling_ddp.py"


class Tiny(pl.LightningModule):
    def __init__(self, proxy=True):
        super().__init__()
        torch.manual_seed(0)  # identical initial models across runs (the draws depend on the scores)
        self.net = torch.nn.Linear(4, 3)
        self.proxy = proxy
        self.log_rows = []  # (epoch, index, proxy, loss)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        z = self.net(x)
        losses = F.cross_entropy(z, y, reduction="none")
        extras = {}
        if self.proxy:
            extras["grad_norm_proxy"] = (z.softmax(-1) - F.one_hot(y, 3).float()).norm(dim=-1).detach()
            self.log_rows.append((self.current_epoch, index.clone(), extras["grad_norm_proxy"].clone(),
                                  losses.detach().clone()))
        return reduce_loss(self, losses, index, target=y, **extras)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(IndexedDataset(TensorDataset(torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g))),
                      batch_size=8, shuffle=True)


def _trainer(root, callbacks, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, **kw)


class Snapshot(ImportanceSampling):
    """Records the table right before each refresh and the installed distribution after it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.before, self.after = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.before.append((self.table["is_score"].clone(), self.table["is_seen"].clone()))
        super().on_train_epoch_end(trainer, pl_module)
        self.after.append(self.sampler.pending_probabilities().clone())


def test_pada_rules_under_trainer(tmp_path):
    cb = Snapshot()
    model = Tiny()
    _trainer(tmp_path, [cb], max_epochs=3).fit(model, _loader())
    assert isinstance(cb.sampler, ImportanceSampler)
    for epoch in range(3):
        # reference: PA&DA's loop over the epoch's samples in draw order (first visit sets, re-draw averages)
        ref = torch.zeros(N, dtype=torch.float64)
        seen = torch.zeros(N, dtype=torch.bool)
        for e, index, proxy, _ in model.log_rows:
            if e != epoch:
                continue
            for i, s in zip(index.tolist(), proxy.double().tolist()):
                ref[i] = (ref[i] + s) / 2 if seen[i] else s
                seen[i] = True
        score, seen_col = cb.before[epoch]
        torch.testing.assert_close(score.double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(seen_col > 0, seen)  # samples not drawn this epoch score 0 (reset per epoch)
        # p = tau * s / sum s + (1 - tau) / N with tau = epoch / epochs
        tau = epoch / 3
        expected = tau * ref / ref.sum() + (1 - tau) / N
        torch.testing.assert_close(cb.after[epoch], expected, rtol=1e-5, atol=1e-8)
    assert float(cb.table["is_score"].abs().sum()) == 0  # reset after the last refresh


def test_loss_score_floor_and_no_ramp(tmp_path):
    cb = Snapshot(score="loss", floor=0.2, ramp_epochs=0, reset_scores=False, smoothing=1.0)
    model = Tiny()
    _trainer(tmp_path, [cb], max_epochs=2).fit(model, _loader())
    score, seen = cb.before[1]
    p = cb.after[1]
    torch.testing.assert_close(p, importance_probabilities(score, mixing=0.2, seen=seen > 0))
    assert float(p.min()) >= 0.2 / N - 1e-12
    # smoothing=1 keeps the last loss of each sample
    last = {}
    for _, index, _, losses in model.log_rows:
        for i, v in zip(index.tolist(), losses.tolist()):
            last[i] = v
    for i, v in last.items():
        assert float(score[i]) == pytest.approx(v, rel=1e-5)


def test_importance_weighting_is_one_over_np(tmp_path):
    seen = []

    class Spy(ImportanceSampling):
        def on_weights_computed(self, batch, weights, trainer, pl_module):
            super().on_weights_computed(batch, weights, trainer, pl_module)
            p = self.sampler.current_probabilities()[batch.index]
            seen.append((weights.clone(), p.clone()))

    _trainer(tmp_path, [Spy(importance_weighting=True, floor=0.1, ramp_epochs=0)], max_epochs=2).fit(Tiny(), _loader())
    for weights, p in seen:
        raw = 1.0 / (N * p)
        torch.testing.assert_close(weights, (raw / raw.mean()).float())
    assert any(float(w.std()) > 0 for w, _ in seen)  # epoch 1 is non-uniform


def test_refresh_every_and_step_unit(tmp_path):
    cb = Snapshot(refresh_every=2)
    _trainer(tmp_path, [cb], max_epochs=3).fit(Tiny(), _loader())
    assert cb._refreshes == 1
    cb = ImportanceSampling(refresh_unit="step", refresh_every=2)
    model = Tiny()
    _trainer(tmp_path, [cb], max_steps=6).fit(model, _loader())
    # each sampler epoch is refresh_every = 2 steps of 8 samples: 3 epochs, one refresh after each
    assert cb.sampler.num_samples == 2 * 8 and cb._refreshes == 3
    assert [e for e, *_ in model.log_rows] == [0, 0, 1, 1, 2, 2]


def test_missing_proxy_and_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="grad_norm_proxy"):
        _trainer(tmp_path, [ImportanceSampling()], max_steps=1).fit(Tiny(proxy=False), _loader())
    for kw, match in [({"score": "entropy"}, "score"), ({"smoothing": 0.0}, "smoothing"), ({"floor": 2.0}, "floor"),
                      ({"refresh_every": 0}, "refresh_every"), ({"power": -1.0}, "power"),
                      ({"refresh_unit": "step", "num_samples": 5}, "num_samples")]:
        with pytest.raises(ValueError, match=match):
            ImportanceSampling(**kw)


def test_checkpoint_round_trip(tmp_path):
    def fit(root, model, cb, ckpt_path=None, **kw):
        _trainer(root, [cb] + kw.pop("extra", []), max_epochs=3, **kw).fit(model, _loader(), ckpt_path=ckpt_path)

    full, cb_full = Tiny(), ImportanceSampling(seed=4)
    fit(tmp_path / "f", full, cb_full)
    first = Tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    fit(tmp_path / "a", first, ImportanceSampling(seed=4), max_steps=8, extra=[ckpt], enable_checkpointing=True)
    second, cb_second = Tiny(), ImportanceSampling(seed=4)
    fit(tmp_path / "b", second, cb_second, ckpt_path=next((tmp_path / "ckpt").glob("*.ckpt")))
    resumed = [r[1].tolist() for r in first.log_rows + second.log_rows]
    assert resumed == [r[1].tolist() for r in full.log_rows]  # identical draws, epochs 1-2 importance-driven
    torch.testing.assert_close(cb_second.sampler.pending_probabilities(), cb_full.sampler.pending_probabilities())
    for name in ("is_score", "is_seen", "count"):
        torch.testing.assert_close(cb_second.table[name], cb_full.table[name])


def test_ddp_identical_tables_and_draws(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for key in ("is_score", "is_seen", "count"):
        torch.testing.assert_close(r0["table"][key], r1["table"][key], rtol=0, atol=0)
    for snap0, snap1 in zip(r0["snapshots"], r1["snapshots"]):
        torch.testing.assert_close(snap0, snap1, rtol=0, atol=0)
    assert len(r0["snapshots"]) == 3 and not torch.allclose(r0["snapshots"][-1], torch.full_like(r0["snapshots"][-1], 1 / 45))
    for g0, g1 in zip(r0["globals"], r1["globals"]):
        assert torch.equal(g0, g1)
    for epoch, glob in enumerate(r0["globals"]):
        mine0 = [i for e, idx in r0["seen"] if e == epoch for i in idx]
        mine1 = [i for e, idx in r1["seen"] if e == epoch for i in idx]
        assert mine0 == glob[0::2].tolist() and mine1 == glob[1::2].tolist()  # disjoint, complete shards
    # GroupBalancing under DDP: the same global (segmented) draw on both ranks, disjoint complete shards
    b0, b1 = r0["balance"], r1["balance"]
    assert b0["total_steps"] == 3 * 6 and b0["batch_size"] == 4  # 3 epochs x 6 real batches per rank
    for epoch, (g0, g1) in enumerate(zip(b0["globals"], b1["globals"])):
        assert torch.equal(g0, g1)
        mine0 = [i for e, idx in b0["seen"] if e == epoch for i in idx]
        mine1 = [i for e, idx in b1["seen"] if e == epoch for i in idx]
        assert mine0 == g0[0::2].tolist() and mine1 == g0[1::2].tolist()


def test_draw_statistics_logged_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (N,), generator=g)
    ds = IndexedDataset(TensorDataset(torch.randn(N, 4, generator=g), y), targets=y)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=2, log_every_n_steps=1,
                         logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[ImportanceSampling(log_every_n_steps=1)])
    trainer.fit(Tiny(), DataLoader(ds, batch_size=8, shuffle=True))
    metrics = trainer.callback_metrics
    freq = [float(metrics[f"importance/draw_freq/class_{c}"]) for c in range(3)]
    assert sum(freq) == pytest.approx(1.0)
    mass = [float(metrics[f"importance/next/class_{c}/mass"]) for c in range(3)]
    assert sum(mass) == pytest.approx(1.0)
    assert 0 < float(metrics["importance/next/ess_frac"]) <= 1
    acc = EventAccumulator(str(next((tmp_path / "tb").glob("version_*")))).Reload()
    assert "importance/next/np" in acc.Tags()["histograms"] and "sampler/weights" in acc.Tags()["histograms"]
    assert {"importance/draw_freq/class_0", "sampler/ess_frac", "sampler/group_2/mass"} <= set(acc.Tags()["scalars"])
