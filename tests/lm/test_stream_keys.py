"""Item 2: stable per-sample keys on streams — a known key range or hashed slots (splitmix64)."""

import pytest
import torch

from lightning_reweight import LossReweighting
from lightning_reweight.state import StreamKeys, expected_collision_rate, slots_for, splitmix64
from tests.helpers import make_trainer
from tests.lm.test_text_stream import KeyRecorder

_M = (1 << 64) - 1


def _splitmix64_reference(x: int, seed: int = 0) -> int:
    z = (x + 0x9E3779B97F4A7C15 * (seed + 1)) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 7])
def test_splitmix64_matches_the_64_bit_reference(seed):
    xs = [0, 1, 2, 3, 12345, 2**40 + 17, 2**62, -1, -(2**63)]
    got = splitmix64(torch.tensor(xs), seed=seed)
    assert [int(v) & _M for v in got] == [_splitmix64_reference(x & _M, seed) for x in xs]


def test_hashed_slots_follow_the_documented_collision_rate():
    slots, n = 2**12, 3000
    rows = StreamKeys(slots=slots)(torch.arange(10**9, 10**9 + n))  # consecutive keys, far above the table
    assert int(rows.min()) >= 0 and int(rows.max()) < slots
    counts = torch.bincount(rows, minlength=slots)
    shared = float((counts[rows] > 1).float().mean())  # fraction of keys sharing their slot
    expected = expected_collision_rate(n, slots)  # 1 - (1 - 1/S)^(K-1) = 0.518
    assert abs(expected - (1 - (1 - 1 / slots) ** (n - 1))) < 1e-12
    assert abs(shared - expected) < 0.04
    assert torch.equal(rows, StreamKeys(slots=slots)(torch.arange(10**9, 10**9 + n)))  # stable
    assert not torch.equal(rows, StreamKeys(slots=slots, seed=1)(torch.arange(10**9, 10**9 + n)))
    assert expected_collision_rate(n, slots_for(n, 0.01)) <= 0.01 < expected_collision_rate(n, slots_for(n, 0.01) // 2)


def test_known_key_range_is_exact_and_refuses_keys_outside_it():
    keys = StreamKeys(num_keys=10)
    assert keys.num_samples == 10 and keys.collision_rate(10) == 0.0
    assert keys(torch.tensor([0, 9, 3])).tolist() == [0, 9, 3]
    with pytest.raises(IndexError, match=r"\[0, 10\).*slots="):
        keys(torch.tensor([3, 10]))
    with pytest.raises(TypeError, match="integer"):
        keys(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="exactly one"):
        StreamKeys(num_keys=4, slots=8)


@pytest.mark.parametrize("mode", ["exact", "hashed"])
def test_stateful_table_keyed_by_stream_keys(text_file, tmp_path, mode):
    from lightning_reweight.data.text import CharStreamDataModule
    from lightning_reweight.models.lm import CharTransformerLM

    slots = 64
    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=0)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, sample_keys=mode, key_slots=slots)
    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=0,
                         num_samples=slots if mode == "hashed" else None)
    rec = KeyRecorder()
    make_trainer([cb, rec], tmp_path, max_steps=10, limit_val_batches=0, num_sanity_val_steps=0).fit(model, dm)
    keys = torch.cat(rec.keys)
    rows = keys if mode == "exact" else StreamKeys(slots=slots)(keys)
    assert cb.table.num_samples == (dm.num_keys if mode == "exact" else slots)  # key range from the stream
    expected = torch.bincount(rows, minlength=cb.table.num_samples)
    assert torch.equal(cb.table["count"], expected)  # each key's row counted once per visit


_KEYS = [0, 1, 2, 5, 12345, 2**31 - 1, 2**32, 2**40 + 17, 2**62, 2**63 - 1, -1, -2, -12345, -(2**40), -(2**63)]


@pytest.mark.parametrize("slots", [1, 2, 3, 7, 10, 1000, 2**12, 2**20, 3 * 2**20, 2**31 - 1, 2**32 + 15,
                                   10**15 + 37, 2**61, 2**62])
@pytest.mark.parametrize("seed", [0, 3])
def test_hashed_slots_are_the_unsigned_splitmix64_remainder(slots, seed):
    keys = StreamKeys(slots=slots, seed=seed)
    got = keys(torch.tensor(_KEYS)).tolist()
    # the documented mapping: splitmix64(key) as an unsigned 64-bit integer, mod S (any S, power of two or not)
    assert got == [_splitmix64_reference(k & _M, seed) % slots for k in _KEYS]
    assert all(0 <= r < slots for r in got)


def test_power_of_two_slots_keep_their_rows():
    # checkpoints written with power-of-two slots keep their row mapping: the plain (signed) remainder agreed
    keys = torch.arange(-5000, 5000) * 7919 + 2**40
    for slots in (2**10, 2**20):
        assert torch.equal(StreamKeys(slots=slots)(keys), torch.remainder(splitmix64(keys), slots))


def test_slots_beyond_int64_range_are_refused():
    with pytest.raises(ValueError, match=r"at most 2\*\*62.*slots_for"):
        StreamKeys(slots=2**62 + 1)


def test_stream_without_a_size_names_keys_num_samples(tmp_path):
    """An iterable stream without ``num_keys``/``len``: the callback cannot size its table, and says
    `num_samples=keys.num_samples` (not only the map-style `len(train_dataset)`)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_reweight import reduce_loss

    class Stream(IterableDataset):
        def __iter__(self):
            for k in range(64):
                yield torch.randn(3), torch.tensor(k + 10**12)

    keys = StreamKeys(slots=2**10)

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, key = batch
            return reduce_loss(self, self.layer(x).squeeze(1) ** 2, keys(key))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match=r"num_samples=keys\.num_samples"):
        trainer.fit(Model(), DataLoader(Stream(), batch_size=8))
    assert cb.table is None


def test_hashed_keys_without_num_samples_name_keys_num_samples(text_file, tmp_path):
    """Hashed keys, no `num_samples` on the callback: the table is sized from the stream's `num_keys` (328 windows
    here), the slots (2**20) exceed it, and the error must name the stream fix, not only the map-style one."""
    from lightning_reweight.data.text import CharStreamDataModule
    from lightning_reweight.models.lm import CharTransformerLM

    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=0)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, sample_keys="hashed", key_slots=2**20)
    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(IndexError) as err:
        trainer.fit(model, dm)
    assert "num_samples=keys.num_samples" in str(err.value)
