"""Checkpointed sampler / sampling-callback state is validated before use: a bad entry raises
``CheckpointStateError`` naming the key, and nothing is half restored. Also the atomic-step protocol (item 4):
a step rejected by a later callback leaves GroupBalancing's and ImportanceSampling's state unchanged."""

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.balancing import GroupBalancing
from lightning_reweight.callbacks.base import WeightingCallback
from lightning_reweight.callbacks.importance import ImportanceSampling
from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.data.plugin import SamplingDataModule
from lightning_reweight.samplers import ImportanceSampler, RS2Sampler, TemperatureSampler, WeightedSampler
from lightning_reweight.state.validate import CheckpointStateError

W = torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.1


def _state(**changes):
    s = WeightedSampler(W, seed=3)
    s.set_epoch(2)
    s.set_cursor(12)
    state = s.state_dict()
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(("key", "value", "match"), [
    ("cursor", -8, "expected an int >= 0"),
    ("cursor", 1000, "within this rank's 40 samples"),
    ("position", 41, "within the epoch's 40 samples"),
    ("position", -1, "expected an int >= 0"),
    ("epoch", -1, "expected an int >= 0"),
    ("seed", 1.5, "expected an int"),
    ("num_samples", 0, "expected an int >= 1"),
    ("weights", torch.full((40,), float("nan")), "NaN"),
    ("weights", torch.ones(39), "expected length 40"),
    ("weights", -torch.ones(40), "expected values >= 0"),
    ("epoch_weights", torch.zeros(40), "at least one positive"),
    ("epoch_total", 50, "expected 40"),
    ("replacement", "yes", "expected a bool"),
    ("seed", KeyError, "missing key"),
    ("cursor", KeyError, "missing key"),
])
def test_bad_sampler_state_names_the_key_and_restores_nothing(key, value, match):
    sampler = WeightedSampler(torch.ones(40), seed=0)
    before = (sampler.seed, sampler.epoch, sampler.cursor, sampler.weights.clone())
    with pytest.raises(CheckpointStateError, match=match) as err:
        sampler.load_state_dict(_state(**{key: value}))
    assert err.value.key == key and f"[{key!r}]" in str(err.value)
    assert (sampler.seed, sampler.epoch, sampler.cursor) == before[:3] and torch.equal(sampler.weights, before[3])
    assert sampler._resume is None
    assert list(sampler) == list(WeightedSampler(torch.ones(40), seed=0))  # untouched


def test_good_state_round_trips():
    sampler = WeightedSampler(torch.ones(40), seed=0)
    sampler.load_state_dict(_state())
    assert sampler.seed == 3 and sampler.epoch == 2 and sampler.position == 12
    full = WeightedSampler(W, seed=3)
    full.set_epoch(2)
    assert list(sampler) == list(full)[12:]


def test_rs2_stream_position_is_validated():
    s = RS2Sampler(200, 0.15, seed=5)
    s.set_epoch(7)
    state = s.state_dict()
    bad = copy.deepcopy(state)
    bad["rs2"]["stream_offset"] += 1
    fresh = RS2Sampler(200, 0.15)
    with pytest.raises(CheckpointStateError, match="stream_offset") as err:
        fresh.load_state_dict(bad)
    assert err.value.key == "stream_offset" and fresh.epoch == 0
    del bad["rs2"]["permutation"]
    with pytest.raises(CheckpointStateError, match="permutation"):
        fresh.load_state_dict(bad)
    with pytest.raises(CheckpointStateError, match="cover 100 items"):
        RS2Sampler(100, 0.15).load_state_dict(state)


def test_temperature_and_importance_sampler_state_is_validated():
    labels = torch.tensor([0] * 30 + [1] * 10)
    t = TemperatureSampler(labels, schedule="cooldown", unit="step", batch_size=4, total_steps=20)
    state = t.state_dict()
    bad = copy.deepcopy(state)
    bad["temperature"]["total_steps"] = -3
    with pytest.raises(CheckpointStateError, match="total_steps"):
        TemperatureSampler(labels, schedule="cooldown", unit="step", batch_size=4, total_steps=20).load_state_dict(bad)
    with pytest.raises(CheckpointStateError, match="num_groups"):
        TemperatureSampler(torch.tensor([0, 1, 2, 3] * 10), schedule="cooldown", unit="step", batch_size=4,
                           total_steps=20).load_state_dict(state)
    imp = ImportanceSampler(40)
    p = torch.rand(40)
    imp.set_weights(p / p.sum())
    state = imp.state_dict()
    state["weights"] = state["weights"].clone()
    state["weights"][3] = float("nan")
    fresh = ImportanceSampler(40)
    with pytest.raises(CheckpointStateError, match="NaN") as err:
        fresh.load_state_dict(state)
    assert err.value.key == "weights"
    torch.testing.assert_close(fresh.pending_probabilities(), torch.full((40,), 1 / 40, dtype=torch.float64))


def test_sampler_state_validates_every_sampler_before_restoring_any():
    a, b = WeightedSampler(torch.ones(40)), WeightedSampler(torch.ones(40))
    loaders = {"a": DataLoader(range(40), batch_size=4, sampler=a), "b": DataLoader(range(40), batch_size=4, sampler=b)}
    cb = SamplerState(log_stats=False)
    cb.load_state_dict({"samplers": [_state(), _state(cursor=-8)]})
    trainer = SimpleNamespace(train_dataloader=loaders, world_size=1, global_rank=0, current_epoch=0)
    with pytest.raises(CheckpointStateError, match="cursor"):
        cb.on_train_start(trainer, None)
    assert a._resume is None and a.seed == 0 and b._resume is None  # the good one was not restored either
    with pytest.raises(CheckpointStateError, match="samplers"):
        SamplerState().load_state_dict({"samplers": "garbage"})


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        return reduce_loss(self, F.cross_entropy(self.net(x), y, reduction="none"), index, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 24 + [1] * 12 + [2] * 4)
    return DataLoader(IndexedDataset(TensorDataset(torch.randn(40, 4, generator=g), y), targets=y), batch_size=8,
                      shuffle=True)


def _snapshot(balancing, importance):
    return {"draws": balancing._draws.clone(), "is_draws": importance._draws.clone(),
            **{k: v.clone() for k, v in importance.table.columns.items()}}


class RejectAtStep(WeightingCallback):
    """Returns negative weights at step ``step`` (after the earlier callbacks computed theirs)."""

    def __init__(self, step, watch):
        super().__init__(track_samples=False, log_every_n_steps=0)
        self.step, self.watch, self.before = step, watch, None

    def compute_weights(self, batch, trainer, pl_module):
        if trainer.global_step != self.step:
            return None
        self.before = _snapshot(*self.watch)
        return -torch.ones(len(batch))


def test_rejected_step_leaves_balancing_and_importance_state_unchanged(tmp_path):
    balancing = GroupBalancing(mode="upweight", log_every_n_steps=0)
    importance = ImportanceSampling(score="loss", importance_weighting=True, floor=0.1, log_every_n_steps=0)
    reject = RejectAtStep(7, (balancing, importance))  # step 7 = epoch 1, batch 2: scores and draws exist
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[balancing, importance, reject])
    with pytest.raises(ValueError, match="negative or non-finite"):
        trainer.fit(Model(), _loader())
    after = _snapshot(balancing, importance)
    assert float(reject.before["draws"].sum()) > 0 and float(reject.before["count"].sum()) > 0
    for key, value in reject.before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_callback_extra_state_is_validated_before_assignment():
    importance = ImportanceSampling(score="loss")
    importance._refreshes = 2
    with pytest.raises(CheckpointStateError, match="refreshes"):
        importance.load_extra_state({"refreshes": -1, "draws": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(CheckpointStateError, match="draws"):
        importance.load_extra_state({"refreshes": 5, "draws": torch.tensor([1.0, float("nan")])})
    assert importance._refreshes == 2  # nothing assigned
    balancing = GroupBalancing(mode="upweight")
    with pytest.raises(CheckpointStateError, match="draws"):
        balancing.load_extra_state({"total_steps": 10, "draws": torch.tensor([-1.0, 2.0])})
    with pytest.raises(CheckpointStateError, match="total_steps"):
        balancing.load_extra_state({"total_steps": 0, "draws": torch.zeros(2)})
    with pytest.raises(CheckpointStateError, match="expected a dict"):
        SamplingDataModule(TensorDataset(torch.zeros(4, 1)), batch_size=2).load_state_dict(["not", "a", "dict"])


@pytest.mark.parametrize("make", [lambda: GroupBalancing(mode="upsample", log_every_n_steps=0),
                                  lambda: ImportanceSampling(score="loss", log_every_n_steps=0)],
                         ids=["GroupBalancing-upsample", "ImportanceSampling"])
def test_sampler_owning_callbacks_refuse_a_mid_epoch_checkpoint_without_sampler_state(tmp_path, make):
    """They add ``SamplerState`` themselves; a mid-epoch checkpoint whose sampler entry is gone is refused at
    load, before the callback's own (good) entry is assigned."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(root, callbacks, **kw):
        return pl.Trainer(default_root_dir=tmp_path / root, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks, **kw)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    trainer("a", [make(), ckpt], max_epochs=3, max_steps=7).fit(Model(), _loader())  # epoch 1, batch 2
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["callbacks"]["SamplerState"]
    torch.save(checkpoint, path)
    resumed = make()
    draws = resumed._draws.clone()
    with pytest.raises(CheckpointStateError, match=r"interrupted epoch 1 \(2 batches done\).*restart_epoch=True"):
        trainer("b", [resumed], max_epochs=3, enable_checkpointing=False).fit(Model(), _loader(), ckpt_path=path)
    assert torch.equal(resumed._draws, draws) and resumed._pending_table_state is None
