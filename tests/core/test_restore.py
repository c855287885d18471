"""Restoring state: the training set changed (N -> M), and checkpoint entries are validated before use."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_reweight import LossReweighting, WeightingCallback
from lightning_reweight.state import CheckpointStateError, SampleStateTable, TrainingSetChangedError
from lightning_reweight.state.validate import as_int, as_tensor

from .conftest import TinyModule, make_loader, make_trainer


def _trained_state(n=32, **kw):
    cb = LossReweighting("linupper", warmup_steps=0, **kw)
    make_trainer([cb], None, max_epochs=1).fit(TinyModule(), make_loader(n=n, batch_size=8))
    return cb.state_dict()


@pytest.mark.parametrize("new_n", [16, 48])
def test_resume_onto_a_changed_training_set_raises_with_both_sizes(tmp_path, new_n):
    """32 -> 16 (shrink) and 32 -> 48 (grow), num_samples inferred from the loader, through a real ckpt_path."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    cb = LossReweighting("linupper", warmup_steps=0)
    make_trainer([cb, ckpt], tmp_path, max_epochs=1, enable_checkpointing=True).fit(TinyModule(), make_loader(n=32))
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    resumed, module = LossReweighting("linupper", warmup_steps=0), TinyModule()
    with pytest.raises(TrainingSetChangedError, match=rf"has 32 rows and the training set has {new_n} samples.*"
                                                      r"callback.fresh_table = True"):
        make_trainer([resumed], tmp_path, max_epochs=2).fit(module, make_loader(n=new_n), ckpt_path=path)
    assert module.records == []  # refused before the first step


@pytest.mark.parametrize("new_n", [16, 48])
def test_explicit_num_samples_that_differs_from_the_table_raises(new_n):
    state = _trained_state()
    cb = LossReweighting("linupper", warmup_steps=0, num_samples=new_n)
    cb.load_state_dict(state)
    with pytest.raises(TrainingSetChangedError, match=rf"32 rows.*{new_n} samples \(num_samples\)"):
        make_trainer([cb], None).fit(TinyModule(), make_loader(n=new_n))


def test_table_already_built_refuses_a_table_of_another_size():
    cb = LossReweighting("linupper", warmup_steps=0)
    make_trainer([cb], None).fit(TinyModule(), make_loader(n=16))
    before = cb.table["count"].clone()
    with pytest.raises(TrainingSetChangedError, match="16 rows.*but it has 32"):
        cb.load_state_dict(_trained_state(32))
    assert torch.equal(cb.table["count"], before) and cb.table.num_samples == 16


def test_fresh_table_starts_the_table_anew_and_restores_the_rest():
    state = _trained_state(32)
    cb = LossReweighting("linupper", warmup_steps=0)
    cb.fresh_table = True  # what the error message says
    cb.load_state_dict(state)
    make_trainer([cb], None).fit(TinyModule(), make_loader(n=16))
    assert cb.table.num_samples == 16 and cb.table["count"].tolist() == [1] * 16


def test_same_size_resume_restores_the_table():
    state = _trained_state(32)
    cb = LossReweighting("linupper", warmup_steps=0)
    cb.load_state_dict(copy.deepcopy(state))
    make_trainer([cb], None).fit(TinyModule(), make_loader(n=32))
    assert cb.table["count"].tolist() == [2] * 32


# ---------------------------------------------------------------- validation at load
class WithExtra(WeightingCallback):
    """A table plus extra state read through the validate helpers (the documented pattern)."""

    def __init__(self):
        super().__init__(num_samples=6)
        self.steps, self.scale = 0, torch.ones(3)

    def extra_state(self):
        return {"steps": self.steps, "scale": self.scale}

    def load_extra_state(self, state):
        steps = as_int(state, "steps", self.checkpoint_where, minimum=0)
        scale = as_tensor(state, "scale", self.checkpoint_where, length=3, minimum=0.0)
        self.steps, self.scale = steps, scale


def _good_state():
    t = SampleStateTable(6)
    t.update(torch.tensor([0, 1, 4]), loss=torch.tensor([1.0, 2.0, 3.0]), weight=torch.tensor([0.5, 1.0, 1.5]))
    return {"table": copy.deepcopy(t.state_dict()), "extra": {"steps": 7, "scale": torch.tensor([1.0, 2.0, 3.0])}}


def _corrupt(path, value):
    state = _good_state()
    *parents, last = path
    node = state
    for k in parents:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value(node[last]) if callable(value) else value
    return state


CASES = {
    "nan weight": ((("table", "columns", "weight")), lambda w: torch.where(torch.arange(6) == 2, float("nan"), w),
                   r"\['table'\]\['columns'\]\['weight'\]: expected finite values, but got 1 NaN"),
    "negative weight": (("table", "columns", "weight"), lambda w: w - 2, r"\['table'\]\['columns'\]\['weight'\]: expected values >= 0"),
    "inf loss": (("table", "columns", "loss"), lambda v: v.fill_(float("inf")), r"\['table'\]\['columns'\]\['loss'\]: expected finite values, but got 6 inf"),
    "negative count": (("table", "columns", "count"), lambda c: c - 1, r"\['table'\]\['columns'\]\['count'\]: expected values >= 0"),
    "float count": (("table", "columns", "count"), lambda c: c.float(), r"\['table'\]\['columns'\]\['count'\]: expected an integer tensor"),
    "int weight": (("table", "columns", "weight"), lambda w: w.long(), r"\['table'\]\['columns'\]\['weight'\]: expected a floating-point"),
    "short column": (("table", "columns", "ema_loss"), lambda v: v[:5], r"\['table'\]\['columns'\]\['ema_loss'\]: expected length 6"),
    "2-d column": (("table", "columns", "loss"), lambda v: v.reshape(2, 3), r"\['table'\]\['columns'\]\['loss'\]: expected 1 dimension"),
    "missing column": (("table", "columns", "weight"), KeyError, r"\['table'\]\['columns'\]\['weight'\]: missing column"),
    "missing num_samples": (("table", "num_samples"), KeyError, r"\['table'\]\['num_samples'\]: missing key"),
    "missing columns": (("table", "columns"), KeyError, r"\['table'\]\['columns'\]: missing key"),
    "bad kind": (("table", "specs", "loss", "kind"), "median", r"\['table'\]\['specs'\]\['loss'\]\['kind'\]: expected one of"),
    "bad dtype": (("table", "specs", "loss", "dtype"), "float7", r"\['table'\]\['specs'\]\['loss'\]\['dtype'\]: expected one of"),
    "bad decay": (("table", "specs", "ema_loss", "decay"), 1.5, r"\['table'\]\['specs'\]\['ema_loss'\]\['decay'\]: expected a number"),
    "zero rows": (("table", "num_samples"), 0, r"\['table'\]\['num_samples'\]: expected an int >= 1"),
    "table not a dict": (("table",), [1, 2], r"\['table'\]: expected a dict"),
    "extra negative steps": (("extra", "steps"), -1, r"\['extra'\]\['steps'\]: expected an int >= 0"),
    "extra missing key": (("extra", "scale"), KeyError, r"\['extra'\]\['scale'\]: missing key"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_checkpoint_raises_naming_the_key_and_assigns_nothing(case):
    path, value, message = CASES[case]
    cb = WithExtra()
    cb.load_state_dict(_good_state())
    cb.ensure_table(None)
    columns_before = {k: v.clone() for k, v in cb.table.columns.items()}
    identity = {k: id(v) for k, v in cb.table.columns.items()}
    with pytest.raises(CheckpointStateError, match=r"Checkpoint state callbacks\[\"WithExtra\{'name': None\}\"\]"
                                                   + message):
        cb.load_state_dict(_corrupt(path, value))
    assert cb.steps == 7 and cb.scale.tolist() == [1.0, 2.0, 3.0]  # extra state unchanged ...
    assert {k: id(v) for k, v in cb.table.columns.items()} == identity  # ... and the table not replaced
    for k, v in columns_before.items():
        torch.testing.assert_close(cb.table[k], v, equal_nan=True, rtol=0, atol=0)


def test_corrupted_checkpoint_before_the_table_exists_leaves_nothing_pending():
    cb = WithExtra()
    with pytest.raises(CheckpointStateError, match="weight"):
        cb.load_state_dict(_corrupt(("table", "columns", "weight"), lambda w: w * float("nan")))
    assert cb._pending_table_state is None and cb.steps == 0
    assert cb.ensure_table(None)["count"].sum() == 0  # a fresh table


def test_corrupted_lightning_checkpoint_stops_the_resume_naming_the_key(tmp_path):
    """End to end through ``Trainer.fit(ckpt_path=...)``: a NaN in the saved weight column stops the resume."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    cb = LossReweighting("linupper", warmup_steps=0)
    make_trainer([cb, ckpt], tmp_path, max_epochs=1, enable_checkpointing=True).fit(TinyModule(), make_loader(n=16))
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"][cb.state_key]["table"]["columns"]["weight"][3] = float("nan")
    torch.save(checkpoint, path)
    resumed, module = LossReweighting("linupper", warmup_steps=0), TinyModule()
    with pytest.raises(CheckpointStateError, match=r"\['table'\]\['columns'\]\['weight'\]: expected finite values"):
        make_trainer([resumed], tmp_path, max_epochs=2).fit(module, make_loader(n=16), ckpt_path=path)
    assert module.records == [] and resumed.table is None and resumed._pending_table_state is None


# ---------------------------------------------------------------- another configuration wrote the state
def test_changed_ema_decay_continues_with_the_constructors_value_and_warns():
    """A table written with ``ema_decay=0.5`` resumed with 0.9: the constructor wins (a Lightning user expects
    the config they pass to apply), with a warning naming both values; the column's values are kept."""
    state = _trained_state(16, ema_decay=0.5)
    assert state["table"]["specs"]["ema_loss"]["decay"] == 0.5
    saved = state["table"]["columns"]["ema_loss"].clone()
    cb = LossReweighting("linupper", warmup_steps=0, ema_decay=0.9)
    with pytest.warns(UserWarning, match=r"'ema_loss' was written with EMA decay 0.5; this callback's `ema_decay` "
                                         r"sets 0.9.*resume with ema_decay=0.5"):
        cb.load_state_dict(state)
    make_trainer([cb], None).fit(TinyModule(), make_loader(n=16, batch_size=16))
    table = cb.table
    assert table.specs["ema_loss"].decay == 0.9
    new_loss = table["loss"]  # the one step after the restore
    torch.testing.assert_close(table["ema_loss"], 0.9 * saved + 0.1 * new_loss)


def test_a_column_of_another_kind_is_refused_naming_fresh_table():
    state = _good_state()
    state["table"]["specs"]["ema_loss"] = {"kind": "last", "init": float("nan"), "decay": 0.9, "dtype": "float32"}
    cb = WithExtra()
    with pytest.raises(CheckpointStateError, match=r"\['specs'\]\['ema_loss'\]: expected a 'ema' column.*'last'.*"
                                                   r"`fresh_table=True`"):
        cb.load_state_dict(state)
    assert cb._pending_table_state is None and cb.steps == 0


def test_a_table_that_track_samples_false_drops_is_warned_about():
    state = _trained_state(16)
    cb = LossReweighting("linupper", warmup_steps=0, track_samples=False)
    with pytest.warns(UserWarning, match=r"`track_samples=False`, but the checkpoint holds its per-sample table "
                                         r"\(16 rows\): the table is dropped.*`track_samples=True`"):
        cb.load_state_dict(state)
    assert cb.table is None and cb._pending_table_state is None


def _checkpoint(tmp_path, callbacks, n=16):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    make_trainer([*callbacks, ckpt], tmp_path, max_epochs=1, enable_checkpointing=True).fit(TinyModule(),
                                                                                           make_loader(n=n))
    return next((tmp_path / "ckpt").glob("*.ckpt"))


def test_state_written_by_another_rule_is_named_and_dropped(tmp_path):
    """linupper -> kl_dro: Lightning keys the entry by ``state_key`` (which holds the rule), so ours is missing;
    the warning names the entry that is dropped and how to keep it."""
    path = _checkpoint(tmp_path, [LossReweighting("linupper", warmup_steps=0)])
    resumed = LossReweighting("kl_dro")
    with pytest.warns(UserWarning, match=r"holds LossReweighting state under \[\"LossReweighting\{'rule': 'linupper'"
                                         r".*another configuration.*dropped.*resume with the configuration that "
                                         r"wrote it"):
        make_trainer([resumed], tmp_path, max_epochs=2).fit(TinyModule(), make_loader(n=16), ckpt_path=path)
    assert int(resumed.table["count"].sum()) == 16  # started fresh: one epoch of counts


def test_a_missing_entry_for_an_attached_callback_is_warned_about(tmp_path):
    path = _checkpoint(tmp_path, [])
    with pytest.warns(UserWarning, match=r"holds no state for LossReweighting.*start\(s\) fresh"):
        make_trainer([LossReweighting("linupper")], tmp_path, max_epochs=2).fit(TinyModule(), make_loader(n=16),
                                                                                ckpt_path=path)


# ---------------------------------------------------------------- every entry checked before any is assigned
def _snapshot(cb):
    return {"log_z": cb.rule.state_dict(), "steps": cb.ess_collapsed_steps,
            **{k: v.clone() for k, v in cb.table.columns.items()}}


def test_a_bad_entry_of_a_later_callback_leaves_the_earlier_one_unassigned(tmp_path):
    """Lightning calls ``on_load_checkpoint`` on every callback before any ``load_state_dict``: each of ours
    validates its entry there, so the second callback's corrupted entry stops the resume before the first
    (whose entry is good) is assigned."""
    first, second = LossReweighting("kl_dro", normalizer="ema", name="a"), LossReweighting("linupper", name="b")
    path = _checkpoint(tmp_path / "one", [first, second])
    make_trainer([first, second], tmp_path / "two", max_epochs=2).fit(TinyModule(), make_loader(n=16))  # moves on
    before = _snapshot(first)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"][second.state_key]["table"]["columns"]["count"][0] = -3
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointStateError, match=r"'name': 'b'.*\['table'\]\['columns'\]\['count'\]: expected "
                                                   r"values >= 0.*deleting its entry"):
        make_trainer([first, second], tmp_path / "three", max_epochs=3).fit(TinyModule(), make_loader(n=16),
                                                                            ckpt_path=path)
    after = _snapshot(first)
    assert after.pop("log_z") == before.pop("log_z") and after.pop("steps") == before.pop("steps")
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(first.table["count"].sum()) == 48  # its own three epochs, not the checkpoint's one


def test_fabric_load_validates_through_load_state_dict(tmp_path):
    """Fabric's ``load`` calls ``load_state_dict`` directly (no ``on_load_checkpoint``): still validated."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    cb = WithExtra()
    cb.load_state_dict(_good_state())
    fabric.save(tmp_path / "state.ckpt", {"cb": cb})
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=False)
    checkpoint["cb"]["extra"]["steps"] = -1
    torch.save(checkpoint, tmp_path / "state.ckpt")
    target = WithExtra()
    with pytest.raises(CheckpointStateError, match=r"\['extra'\]\['steps'\]: expected an int >= 0"):
        fabric.load(tmp_path / "state.ckpt", {"cb": target})
    assert target.steps == 0 and target._pending_table_state is None
