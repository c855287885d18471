"""Item 4: the streaming character DataModule — sharding, determinism, stable keys, exact mid-epoch resume."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_reweight import LossReweighting
from lightning_reweight.data.text import CharStreamDataModule, CharWindowStream, load_text
from lightning_reweight.models.lm import CharTransformerLM
from lightning_reweight.state import CheckpointStateError
from tests.helpers import make_trainer


def _stream(text_file, **kw):
    args = dict(seq_len=16, batch_size=5, seed=3)
    args.update(kw)
    return CharWindowStream(load_text(text_file), **args)


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_ranks_and_workers_hold_disjoint_complete_shards(text_file, world_size, num_workers):
    s = _stream(text_file)
    s.start = 7  # also from a mid-epoch position
    per_rank = []
    for rank in range(world_size):
        by_worker = [list(s.iter_batches(rank, world_size, w, num_workers)) for w in range(num_workers)]
        # the DataLoader's round-robin over workers gives the rank's batches in order
        merged = [by_worker[j % num_workers][j // num_workers] for j in range(sum(map(len, by_worker)))]
        per_rank.append(merged)
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1  # every rank runs the same number of steps (no DDP hang)
    keys = torch.cat([b["key"] for batches in per_rank for b in batches])
    order = s.order(s.epoch)[7:]
    g = s.batch_size * world_size
    used = s.num_steps(7, world_size)
    expected = order[: min(used * g, order.numel())]
    assert keys.numel() == keys.unique().numel()  # disjoint
    assert set(keys.tolist()) == set(expected.tolist())  # complete (up to < world_size dropped windows)
    assert order.numel() - expected.numel() < world_size
    # step j of every rank is chunk j of the global order, split r::W
    for j in range(len(per_rank[0])):
        chunk = order[j * g:(j + 1) * g]
        for rank in range(world_size):
            assert per_rank[rank][j]["key"].tolist() == chunk[rank::world_size].tolist()
            assert int(per_rank[rank][j]["end"]) == 7 + j * g + chunk.numel()


def test_order_is_deterministic_per_seed_and_epoch(text_file):
    a, b = _stream(text_file), _stream(text_file)
    assert torch.equal(a.order(0), b.order(0))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), _stream(text_file, seed=4).order(0))
    assert sorted(a.order(2).tolist()) == list(range(a.num_windows))


def test_windows_are_text_at_their_key_and_noise_is_fixed(text_file):
    data = load_text(text_file)
    s = _stream(text_file, noise_frac=0.25)
    keys = torch.arange(s.num_windows)
    batch = s.windows(keys)
    clean = ~batch["noisy"]
    assert int(batch["noisy"].sum()) == round(0.25 * s.num_windows)
    for k in keys[clean][:5].tolist():  # stable key = window number
        assert batch["x"][k].tolist() == data[k * 16:k * 16 + 16].tolist()
        assert batch["y"][k].tolist() == data[k * 16 + 1:k * 16 + 17].tolist()
    noisy = keys[batch["noisy"]]
    assert not torch.equal(batch["x"][noisy], s.windows(noisy)["x"][:0].new_zeros(0)) and torch.equal(
        s.windows(noisy)["x"], batch["x"][noisy])  # the same noise every time a window is drawn
    assert set(batch["x"][noisy].unique().tolist()) <= set(data.unique().tolist())


def test_dataloader_workers_keep_the_order(text_file):
    s = _stream(text_file)
    plain = [b["key"] for b in DataLoader(s, batch_size=None, num_workers=0)]
    workers = [b["key"] for b in DataLoader(s, batch_size=None, num_workers=2)]
    assert len(plain) == len(workers) and all(torch.equal(a, b) for a, b in zip(plain, workers))


def test_missing_file_names_the_expected_path(tmp_path):
    dm = CharStreamDataModule(path=str(tmp_path / "nope" / "input.txt"))
    with pytest.raises(FileNotFoundError, match="nope/input.txt"):
        dm.setup()
    assert "tinyshakespeare/input.txt" in str(__import__("lightning_reweight.data.text", fromlist=["x"])
                                              .default_text_path())


class KeyRecorder(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(batch["key"].clone())


def _fit(text_file, tmp_path, max_steps, ckpt=None, num_workers=0, save=None):
    pl.seed_everything(0)
    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=1, num_workers=num_workers,
                              max_val_windows=4)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, lr=1e-2, sample_keys="exact")
    rec = KeyRecorder()
    cb = LossReweighting("linupper", warmup_steps=1, log_every_n_steps=0)  # table sized by the stream's keys
    trainer = make_trainer([rec, cb], tmp_path, max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                           num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return rec.keys, model, cb, dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_continues_exactly(text_file, tmp_path, num_workers):
    # 5 400 training chars / 16 = 337 windows, 4 per step: 84 steps per epoch; 90 steps cross an epoch
    full_keys, full_model, full_cb, _ = _fit(text_file, tmp_path / "a", 90, num_workers=num_workers)
    ckpt = str(tmp_path / "mid.ckpt")
    part_keys, _, _, dm = _fit(text_file, tmp_path / "b", 30, num_workers=num_workers, save=ckpt)
    assert dm.state_dict()["position"] == 30 * 4  # counted in the main process, not by prefetching workers
    rest_keys, model, cb, _ = _fit(text_file, tmp_path / "c", 90, ckpt=ckpt, num_workers=num_workers)
    assert len(part_keys) + len(rest_keys) == len(full_keys) == 90
    for a, b in zip(part_keys + rest_keys, full_keys):
        assert torch.equal(a, b)  # no window skipped or replayed
    assert cb.table is not None and torch.equal(cb.table["count"], full_cb.table["count"])
    for p, q in zip(model.parameters(), full_model.parameters()):
        torch.testing.assert_close(p, q)


def test_resume_refuses_a_different_stream(text_file, tmp_path):
    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=1)
    state = dm.state_dict()
    other = CharStreamDataModule(path=str(text_file), seq_len=8, batch_size=4, seed=1)
    with pytest.raises(CheckpointStateError, match="seq_len"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointStateError, match="position"):
        dm.load_state_dict({**state, "position": state["num_windows"] + 1})
    fresh = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=1)
    fresh.load_state_dict({**state, "position": 12, "epoch": 2})
    assert fresh.state_dict()["position"] == 12 and fresh.state_dict()["epoch"] == 2
