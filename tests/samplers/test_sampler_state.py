"""SamplerState under a real Trainer: mid-epoch resume via ``trainer.fit(ckpt_path=...)`` continues the
exact index sequence; DDP wiring mistakes raise; draw statistics are logged."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.callbacks.sampling import SamplerState, find_samplers
from lightning_reweight.data import IndexedDataset
from lightning_reweight.samplers import WeightedSampler
from lightning_reweight.state.validate import CheckpointStateError

N, BATCH = 40, 4  # 10 batches per epoch


class Recorder(pl.LightningModule):
    def __init__(self, workers=0):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen = []
        self.workers = workers
        g = torch.Generator().manual_seed(0)
        self.x, self.w = torch.randn(N, 3, generator=g), torch.rand(N, generator=g) + 0.1

    def train_dataloader(self):
        ds = IndexedDataset(TensorDataset(self.x, torch.arange(N) % 3), targets=torch.arange(N) % 3)
        return DataLoader(ds, batch_size=BATCH, sampler=WeightedSampler(self.w, seed=7),
                          num_workers=self.workers)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.current_epoch, batch_idx, index.tolist()))
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    kw.setdefault("callbacks", [SamplerState()])
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_yields_identical_remaining_sequence(tmp_path, workers):
    full = Recorder(workers)
    _trainer(tmp_path / "full", max_epochs=3).fit(full)

    first = Recorder(workers)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    _trainer(tmp_path / "a", max_epochs=3, max_steps=13, callbacks=[SamplerState(), ckpt]).fit(first)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))

    second = Recorder(workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)  # Lightning's "not resumable" warning is silenced
        _trainer(tmp_path / "b", max_epochs=3).fit(second, ckpt_path=path)

    assert [s[2] for s in first.seen + second.seen] == [s[2] for s in full.seen]
    # the resumed epoch continues at batch 3 of epoch 1 and ends at the epoch's length
    assert second.seen[0][:2] == (1, 3) and len(second.seen) == 30 - 13
    assert len({tuple(s[2]) for s in full.seen}) > 20  # epochs differ


def test_without_callback_lightning_replays_the_epoch_head(tmp_path):
    """Documents the failure SamplerState fixes: a plain resume restarts the sampler."""
    full = Recorder()
    _trainer(tmp_path / "full", max_epochs=2, callbacks=[]).fit(full)
    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    _trainer(tmp_path / "a", max_epochs=2, max_steps=13, callbacks=[ckpt]).fit(first)
    second = Recorder()
    with pytest.warns(UserWarning, match="resum"):
        _trainer(tmp_path / "b", max_epochs=2, callbacks=[]).fit(second, ckpt_path=next((tmp_path / "ckpt").glob("*.ckpt")))
    assert [s[2] for s in first.seen + second.seen] != [s[2] for s in full.seen]


def test_cursor_and_state_dict(tmp_path):
    model = Recorder()
    cb = SamplerState()
    _trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model)
    (sampler,) = cb.samplers
    state = cb.state_dict()["samplers"][0]
    assert sampler.cursor == 3 * BATCH and state["cursor"] == 12 and state["epoch"] == 0


def test_wrapped_by_lightning_raises():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = WeightedSampler(torch.ones(10))
    loader = DataLoader(range(10), sampler=DistributedSamplerWrapper(sampler, num_replicas=2, rank=0))
    with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
        find_samplers(loader)
    assert find_samplers({"a": DataLoader(range(10), sampler=sampler, batch_size=2)})[0][1] is sampler


def test_sampler_world_mismatch_raises(tmp_path):
    class Bad(Recorder):
        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.x), batch_size=BATCH,
                              sampler=WeightedSampler(self.w, num_replicas=2, rank=1))

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

    with pytest.raises(RuntimeError, match="num_replicas=2"):
        _trainer(tmp_path, max_steps=1).fit(Bad())


def test_draw_stats_logged(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    model = Recorder()
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, enable_progress_bar=False,
                         logger=logger, callbacks=[SamplerState()], enable_checkpointing=False)
    trainer.fit(model)
    rows = [r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("sampler/max")]
    assert [int(r["step"]) for r in rows] == [1, 11]  # once per epoch, after its first batch
    w = model.w / model.w.mean()
    assert abs(float(rows[0]["sampler/max"]) - float(w.max())) < 1e-4
    ess = float(w.sum() ** 2 / (w**2).sum())
    assert abs(float(rows[0]["sampler/ess"]) - ess) < 1e-3
    mass = float(w[torch.arange(N) % 3 == 2].sum() / w.sum())  # class 2's share of the draws
    assert abs(float(rows[0]["sampler/group_2/mass"]) - mass) < 1e-4


# ---------------------------------------------------------------- a mid-epoch checkpoint without sampler state
def _mid_epoch_checkpoint(tmp_path, callbacks, steps=13):
    """Train ``steps`` steps (epoch 1, batch 3 at 13) and return the checkpoint written there."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_top_k=-1)
    first = Recorder()
    _trainer(tmp_path / "a", max_epochs=3, max_steps=steps, callbacks=[*callbacks, ckpt]).fit(first)
    return next((tmp_path / "ckpt").glob("*.ckpt")), first


@pytest.mark.parametrize("how", ["written without SamplerState", "entry removed"])
def test_mid_epoch_checkpoint_without_sampler_state_is_refused(tmp_path, how):
    """Such a resume would restart the sampler while Lightning skips the epoch's first batches (repeats and
    drops): refused at load, naming the epoch, the batches done and both fixes; nothing trained or assigned."""
    path, _ = _mid_epoch_checkpoint(tmp_path, [] if how == "written without SamplerState" else [SamplerState()])
    if how == "entry removed":
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint["callbacks"]["SamplerState"]
        torch.save(checkpoint, path)
    second, state = Recorder(), SamplerState()
    with pytest.raises(CheckpointStateError, match=r"interrupted epoch 1 \(3 batches done\).*"
                                                   r"`SamplerState\(restart_epoch=True\)`") as err:
        _trainer(tmp_path / "b", max_epochs=3, callbacks=[state]).fit(second, ckpt_path=path)
    assert err.value.key == "samplers"
    assert second.seen == [] and state._pending is None and not state._restart_pending


def test_restart_epoch_starts_the_interrupted_epoch_afresh(tmp_path):
    """``restart_epoch=True``: the interrupted epoch runs all its batches in the sampler's order for that
    epoch (its first 3 batches trained twice, none dropped); later epochs are the uninterrupted run's."""
    full = Recorder()
    _trainer(tmp_path / "full", max_epochs=3).fit(full)
    path, first = _mid_epoch_checkpoint(tmp_path, [])
    second = Recorder()
    _trainer(tmp_path / "b", max_epochs=3, callbacks=[SamplerState(restart_epoch=True)]).fit(second, ckpt_path=path)
    epoch = lambda run, e: [s[2] for s in run.seen if s[0] == e]  # noqa: E731
    assert epoch(second, 1) == epoch(full, 1) and epoch(second, 2) == epoch(full, 2)


def test_end_of_epoch_checkpoint_without_sampler_state_resumes(tmp_path):
    """Nothing of the epoch is lost at an epoch boundary: no refusal."""
    path, _ = _mid_epoch_checkpoint(tmp_path, [], steps=10)  # the last batch of epoch 0
    second = Recorder()
    _trainer(tmp_path / "b", max_epochs=2, callbacks=[SamplerState()]).fit(second, ckpt_path=path)
    assert [s[:2] for s in second.seen][0] == (1, 0) and len(second.seen) == 10


class PlainRecorder(Recorder):
    def train_dataloader(self):
        return DataLoader(IndexedDataset(TensorDataset(self.x, torch.arange(N) % 3)), batch_size=BATCH)


def test_mid_epoch_checkpoint_of_a_run_without_managed_samplers_resumes(tmp_path):
    """``SamplerState`` attached to a plain loader records that it managed no sampler: no refusal."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    _trainer(tmp_path / "a", max_epochs=2, max_steps=13, callbacks=[SamplerState(), ckpt]).fit(PlainRecorder())
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    assert torch.load(path, weights_only=False)["callbacks"]["SamplerState"] == {"samplers": []}
    second = PlainRecorder()
    with pytest.warns(UserWarning, match="resum"):  # Lightning's own warning: a plain loader is not resumable
        _trainer(tmp_path / "b", max_epochs=2, callbacks=[SamplerState()]).fit(second, ckpt_path=path)
    assert second.seen[0][:2] == (1, 3)
