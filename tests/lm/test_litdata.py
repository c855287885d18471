"""LitData streams: chunks with stable keys, exact resume (1 process here, 2 processes in the DDP test), and the
stream mistakes (a data set built before the DDP processes, SamplerState / resampling on a stream)."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("litdata")

from litdata import StreamingDataLoader  # noqa: E402

from lightning_reweight import LossReweighting  # noqa: E402
from lightning_reweight.callbacks import (  # noqa: E402
    GroupBalancing,
    ImportanceSampling,
    SamplerState,
    StreamShardCheck,
    StreamShardingError,
)
from lightning_reweight.data import LitDataTextModule, TextWindowDataset, optimize_text_windows  # noqa: E402
from lightning_reweight.data.text import load_text  # noqa: E402
from lightning_reweight.models.lm import CharTransformerLM  # noqa: E402
from lightning_reweight.state import CheckpointStateError  # noqa: E402
from tests.helpers import make_trainer, run_ddp_script  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_scripts" / "litdata_ddp.py"


class KeyRecorder(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(batch["key"].clone())


def _dm(text_file, tmp_path, **kw):
    args = dict(path=str(text_file), data_dir=str(tmp_path / "chunks"), seq_len=16, batch_size=4, seed=1)
    args.update(kw)
    return LitDataTextModule(**args)


def _fit(text_file, tmp_path, max_steps, ckpt=None, save=None, num_workers=0, callbacks=(), **kw):
    pl.seed_everything(0)
    dm = _dm(text_file, tmp_path, num_workers=num_workers)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, lr=1e-2, sample_keys="exact")
    rec = KeyRecorder()
    cb = LossReweighting("linupper", warmup_steps=1, log_every_n_steps=0)  # table sized by the stream's keys
    trainer = make_trainer([rec, cb, *callbacks], tmp_path, max_steps=max_steps, max_epochs=-1,
                           limit_val_batches=0, num_sanity_val_steps=0, **kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return rec.keys, cb, trainer


def test_chunks_hold_the_text_windows_with_their_keys(text_file, tmp_path):
    n = optimize_text_windows(text_file, tmp_path / "c", seq_len=16, span=(0, 5400), windows_per_task=50)
    assert n == (5400 - 1) // 16 == 337
    assert optimize_text_windows(text_file, tmp_path / "c", seq_len=16, span=(0, 5400)) == n  # reused
    data = load_text(text_file)
    ds = TextWindowDataset(str(tmp_path / "c"), shuffle=False)
    assert ds.num_keys == n and len(ds) == n
    items = list(StreamingDataLoader(ds, batch_size=64))
    keys = torch.cat([b["key"] for b in items])
    assert keys.tolist() == list(range(n))  # every window once, its key = its number
    x, y = torch.cat([b["x"] for b in items]), torch.cat([b["y"] for b in items])
    for k in (0, 1, 200, n - 1):
        assert x[k].tolist() == data[k * 16:k * 16 + 16].tolist()
        assert y[k].tolist() == data[k * 16 + 1:k * 16 + 17].tolist()


def test_chunk_folder_of_other_settings_is_refused(text_file, tmp_path):
    optimize_text_windows(text_file, tmp_path / "c", seq_len=16)
    with pytest.raises(ValueError, match="overwrite=True"):
        optimize_text_windows(text_file, tmp_path / "c", seq_len=8)
    assert optimize_text_windows(text_file, tmp_path / "c", seq_len=8, overwrite=True) == (6000 - 1) // 8


def test_index_free_run_on_litdata(text_file, tmp_path):
    dm = _dm(text_file, tmp_path)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16)  # sample_keys="none"
    cb = LossReweighting("linupper", track_samples=False, warmup_steps=0, log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=5, limit_val_batches=2, num_sanity_val_steps=0,
                           val_check_interval=5)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 5 and cb.table is None and "val/bpc" in trainer.callback_metrics


@pytest.mark.parametrize("num_workers,part", [(0, 30), (2, 30), (0, 76)])
def test_resume_continues_exactly_and_keeps_the_table(text_file, tmp_path, num_workers, part):
    # 5 400 training bytes (the 90/10 split of 6 000): (5400 - 1) // 16 = 337 windows, 85 steps of 4 per epoch;
    # 100 steps cross an epoch
    full, full_cb, t = _fit(text_file, tmp_path / "a", 100, num_workers=num_workers)
    epoch = t.num_training_batches
    ckpt = str(tmp_path / "mid.ckpt")
    first, _, _ = _fit(text_file, tmp_path / "a", part, save=ckpt, num_workers=num_workers)
    rest, cb, _ = _fit(text_file, tmp_path / "a", 100, ckpt=ckpt, num_workers=num_workers)
    assert len(first) + len(rest) == len(full) == 100
    assert all(torch.equal(a, b) for a, b in zip(first + rest, full))  # no window skipped or replayed
    assert sorted(torch.cat(full[:epoch]).tolist()) == list(range(full_cb.table.num_samples))  # one epoch: all
    for name, col in full_cb.table.state_dict()["columns"].items():
        torch.testing.assert_close(cb.table.state_dict()["columns"][name], col, equal_nan=True, rtol=0, atol=0)


def test_resume_from_the_end_of_an_epoch_starts_the_next_one(text_file, tmp_path):
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    full, _, t = _fit(text_file, tmp_path, 100, callbacks=[every_epoch], enable_checkpointing=True)
    epoch = t.num_training_batches
    ckpt = str(tmp_path / "end.ckpt")
    first, _, _ = _fit(text_file, tmp_path, epoch, save=ckpt)  # stops on the epoch's last batch
    rest, _, _ = _fit(text_file, tmp_path, 100, ckpt=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, full)) and len(first + rest) == 100
    # the checkpoint ModelCheckpoint writes at the end of the epoch resumes the same way
    (end_of_epoch,) = (tmp_path / "ck").glob("epoch=0-*.ckpt")
    rest, _, _ = _fit(text_file, tmp_path, 100, ckpt=str(end_of_epoch))
    assert len(rest) == 100 - epoch and all(torch.equal(a, b) for a, b in zip(rest, full[epoch:]))


def test_resume_on_another_world_size_is_refused(text_file, tmp_path):
    dm = _dm(text_file, tmp_path)
    state = dm.state_dict()
    assert state["world_size"] == 1
    with pytest.raises(CheckpointStateError, match="same number of processes") as err:
        dm.load_state_dict({**state, "world_size": 2})
    assert "world_size=2" in str(err.value) and "world_size=1" in str(err.value)
    with pytest.raises(CheckpointStateError, match="batch_size=8"):
        dm.load_state_dict({**state, "batch_size": 8})
    dm.load_state_dict(state)  # the same world size loads


def test_dataset_built_for_another_rank_is_refused_before_the_first_step(text_file, tmp_path, monkeypatch):
    optimize_text_windows(text_file, tmp_path / "c", seq_len=16)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what a re-launched DDP rank sees before the process group exists
    early = TextWindowDataset(str(tmp_path / "c"))
    monkeypatch.delenv("WORLD_SIZE")
    assert early.distributed_env.world_size == 2

    class Early(pl.LightningDataModule):
        def train_dataloader(self):
            return StreamingDataLoader(early, batch_size=4)

    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16)
    for cb in (StreamShardCheck(), LossReweighting("linupper", track_samples=False)):
        trainer = make_trainer([cb], tmp_path, max_steps=2)
        with pytest.raises(StreamShardingError, match="inside the DataModule's `setup\\(\\)` or `train_dataloader"):
            trainer.fit(model, datamodule=Early())
        assert trainer.global_step == 0


def test_sampler_state_on_a_stream_names_the_streams_own_checkpoint(text_file, tmp_path):
    with pytest.raises(RuntimeError, match="Remove `SamplerState`") as err:
        _fit(text_file, tmp_path, 2, callbacks=[SamplerState()])
    assert "StreamingDataLoader" in str(err.value) and "map-style" in str(err.value)


@pytest.mark.parametrize("make", [lambda: ImportanceSampling(), lambda: GroupBalancing(mode="upsample")],
                         ids=["importance", "upsample"])
def test_resampling_a_stream_names_a_fix_that_works(text_file, tmp_path, make):
    with pytest.raises(TypeError, match="mode=\"upweight\"") as err:
        _fit(text_file, tmp_path, 2, callbacks=[make()])
    assert "no random access" in str(err.value) and "LossReweighting" in str(err.value)


def test_group_upweighting_on_a_stream(text_file, tmp_path):
    """The fix the resampling error names: upweight groups of the stream's keys."""
    dm = _dm(text_file, tmp_path)
    dm.setup("fit")
    dm.train_set.groups = (torch.arange(dm.num_keys) % 3 == 0).long()  # one group id per stable key
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, sample_keys="exact")
    cb = GroupBalancing(mode="upweight", log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3


def test_two_processes_shard_disjointly_resume_exactly_and_refuse_an_early_dataset(text_file, tmp_path):
    optimize_text_windows(text_file, tmp_path / "chunks", seq_len=16, span=(0, 5400))
    for phase in ("early", "full", "part", "resume"):
        run_ddp_script(SCRIPT, tmp_path, str(text_file), phase)
    for r in range(2):  # the early data set: both ranks refuse before step 0, naming the fix
        early = torch.load(tmp_path / f"early_rank{r}.pt", weights_only=False)
        assert early["steps"] == 0 and early["error"].startswith("StreamShardingError")
        assert "setup()" in early["error"] and f"global_rank={r}" in early["error"]
    full, part, resume = ([torch.load(tmp_path / f"{p}_rank{r}.pt", weights_only=False) for r in range(2)]
                          for p in ("full", "part", "resume"))
    for r in range(2):
        keys = part[r]["keys"] + resume[r]["keys"]
        assert len(keys) == len(full[r]["keys"]) == 50
        assert all(torch.equal(a, b) for a, b in zip(keys, full[r]["keys"]))  # exact continuation per rank
        for name, col in full[r]["table"]["columns"].items():
            torch.testing.assert_close(resume[r]["table"]["columns"][name], col, equal_nan=True, rtol=0, atol=0)
    # epoch 0 (42 steps of 4 per rank): disjoint ranks, together every window but the one dropped (337 = 2*168 + 1)
    ranks = [set(torch.cat(full[r]["keys"][:42]).tolist()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 168 and not ranks[0] & ranks[1]
    assert len(ranks[0] | ranks[1]) == 336
    for name, col in full[0]["table"]["columns"].items():  # both ranks hold the same per-sample table
        torch.testing.assert_close(col, full[1]["table"]["columns"][name], equal_nan=True, rtol=0, atol=0)
    # the 2-process checkpoint is refused on 1 process, naming both world sizes
    with pytest.raises(CheckpointStateError, match="world_size=2") as err:
        _fit(text_file, tmp_path / "one", 30, ckpt=str(tmp_path / "part.ckpt"))
    assert "world_size=1" in str(err.value)


def test_docs_litdata_example_runs(tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "lm.md").read_text()
    section = doc.split("## 5. LitData streams", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/lm.md", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "True 4"
