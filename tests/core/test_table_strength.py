"""SampleStateTable: every error path (type, and a message naming the fix), column specs, restore checks.

Written against survivors of ``scripts/mutate.py state/table.py``.
"""

import math

import pytest
import torch

from lightning_reweight.state import table as table_module
from lightning_reweight.state.table import DEFAULT_COLUMNS, Column, SampleStateTable
from lightning_reweight.state.validate import CheckpointStateError


def test_default_columns_and_ema_decay():
    assert DEFAULT_COLUMNS["ema_loss"] == Column("ema", DEFAULT_COLUMNS["ema_loss"].init, decay=0.9)
    assert math.isnan(DEFAULT_COLUMNS["loss"].init) and DEFAULT_COLUMNS["loss"].kind == "last"
    assert DEFAULT_COLUMNS["count"].dtype == torch.int64 and DEFAULT_COLUMNS["weight"].init == 1.0
    assert Column() == Column("last", 0.0, 0.9, torch.float32)
    t = SampleStateTable(3, ema_decay=0.5)
    assert t.specs["ema_loss"].decay == 0.5
    t.update(torch.tensor([0]), ema_loss=torch.tensor([2.0]))
    t.update(torch.tensor([0]), ema_loss=torch.tensor([4.0]))
    assert t["ema_loss"][0].item() == 3.0  # 0.5·2 + 0.5·4; first visit sets the value
    assert t["count"].tolist() == [2, 0, 0]
    assert torch.equal(t["weight"], torch.ones(3))


@pytest.mark.parametrize("n", [0, -1, True, 2.0, "3"])
def test_num_samples_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match=r"`num_samples` to be a positive int, but got"):
        SampleStateTable(n)


def test_single_row_table_is_valid():
    assert SampleStateTable(1)["count"].shape == (1,)


def test_bad_column_kind_and_decay_name_the_column():
    with pytest.raises(ValueError, match=r"kind to be one of .*'avg' for 'x'"):
        SampleStateTable(2, columns={"x": Column("avg")})
    with pytest.raises(ValueError, match=r"EMA decay in \[0, 1\), but got 1.0 for column 'e'"):
        SampleStateTable(2, columns={"e": Column("ema", decay=1.0)})
    with pytest.raises(ValueError, match=r"but got -0.1 for column 'e'"):
        SampleStateTable(2, columns={"e": Column("ema", decay=-0.1)})
    SampleStateTable(2, columns={"e": Column("ema", decay=0.0)})  # the lower bound is valid
    SampleStateTable(2, columns={"e": Column("last", decay=1.5)})  # decay matters for EMA columns only


@pytest.mark.parametrize("other", [Column("sum", 0.0), Column("ema", 0.0, decay=0.5), Column("last", 0.0, decay=0.5),
                                   Column("last", 0.0, dtype=torch.float64), Column("last", 1.0)])
def test_redeclaring_a_column_with_another_spec_is_refused(other):
    t = SampleStateTable(4)
    t.add_column("x", Column("last", 0.0))
    with pytest.raises(ValueError, match=r"Column 'x' already exists with a different spec"):
        t.add_column("x", other)


def test_redeclaring_the_same_spec_is_a_no_op_nan_init_included():
    t = SampleStateTable(4)
    col = t["loss"]
    t.add_column("loss", Column("last", float("nan")))  # NaN == NaN for specs
    assert t["loss"] is col
    t.add_column("y", Column("max", 0.0))
    t["y"][0] = 5.0
    t.add_column("y", Column("max", 0.0))
    assert t["y"][0].item() == 5.0  # not re-allocated
    with pytest.raises(ValueError, match="different spec"):
        t.add_column("loss", Column("last", 0.0))


def test_unknown_column_errors_name_the_columns():
    t = SampleStateTable(2)
    with pytest.raises(KeyError, match=r"Unknown column 'nope'; the table has \['count', 'ema_loss', 'loss', 'weight'\]"):
        t["nope"]
    with pytest.raises(KeyError, match=r"declare it with `add_column`"):
        t.update(torch.tensor([0]), nope=torch.tensor([1.0]))
    assert "loss" in t and "nope" not in t
    assert t.nbytes() == 2 * (4 + 4 + 8 + 4)


def test_check_index_type_and_range():
    t = SampleStateTable(3)
    with pytest.raises(TypeError, match=r"integer tensor, but got dtype torch.float32"):
        t.check_index(torch.tensor([0.0]))
    with pytest.raises(TypeError, match=r"torch.bool"):
        t.check_index(torch.tensor([True]))
    with pytest.raises(IndexError, match=r"\[0, 3\), but got range \[0, 3\]\. Is `num_samples`"):
        t.check_index(torch.tensor([0, 3]))
    with pytest.raises(IndexError, match=r"range \[-1, 0\]"):
        t.check_index([-1, 0])
    assert t.check_index([2, 0]).tolist() == [2, 0]  # N - 1 is valid
    assert t.check_index(torch.tensor([], dtype=torch.int64)).numel() == 0


def test_update_value_count_mismatch_and_empty_batch():
    t = SampleStateTable(3)
    with pytest.raises(ValueError, match=r"Expected 2 values for column 'loss' \(one per index\), but got 1"):
        t.update(torch.tensor([0, 1]), loss=torch.tensor([1.0]))
    assert t["count"].tolist() == [0, 0, 0]
    assert t.update(torch.tensor([], dtype=torch.int64), loss=torch.tensor([])) is None
    assert t["count"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("use_numba", [True, False])
def test_unchecked_update_on_both_cpu_paths(monkeypatch, use_numba):
    monkeypatch.setattr(table_module, "USE_NUMBA", use_numba)
    t = SampleStateTable(4, columns={**DEFAULT_COLUMNS, "s": Column("sum"), "m": Column("max", -1.0)})
    rep = t.update(torch.tensor([1, 1, 2]), check=False, loss=torch.tensor([1.0, 3.0, 5.0]),
                   s=torch.tensor([1.0, 2.0, 3.0]), m=torch.tensor([4.0, 2.0, -5.0]))
    assert rep is not None and rep.size == 3
    assert t["loss"].tolist()[1:3] == [2.0, 5.0] and math.isnan(t["loss"][0])
    assert t["s"].tolist() == [0.0, 3.0, 3.0, 0.0] and t["m"].tolist() == [-1.0, 4.0, -1.0, -1.0]
    assert t["count"].tolist() == [0, 2, 1, 0]


def test_to_moves_every_column():
    t = SampleStateTable(2).to("meta")
    assert t.device.type == "meta" and all(c.device.type == "meta" for c in t.columns.values())


# ------------------------------------------------------------------------------------------------ restore checks
def _state(n=3, **cols):
    t = SampleStateTable(n)
    s = t.state_dict()
    s["columns"] = {k: v.clone() for k, v in s["columns"].items()}
    s["columns"].update(cols)
    return s


def test_spec_round_trip_and_defaults_of_old_checkpoints():
    t = SampleStateTable(2, columns={**DEFAULT_COLUMNS, "h": Column("max", -1.0, 0.5, torch.float64)})
    n, specs, cols = SampleStateTable.validate_state(t.state_dict())
    assert n == 2 and specs["h"] == Column("max", -1.0, 0.5, torch.float64)
    old = t.state_dict()
    old["specs"] = {"h": {"kind": "max", "init": -1.0, "decay": 0.5, "dtype": "float64"}}  # default columns implied
    _, specs, _ = SampleStateTable.validate_state(old)
    assert specs["count"] == DEFAULT_COLUMNS["count"]
    minimal = {"h": {"kind": "max"}}  # init 0.0, decay 0.9, float32 by default
    _, specs, _ = SampleStateTable.validate_state({"num_samples": 2, "columns": {"h": torch.zeros(2)}, "specs": minimal})
    assert specs["h"] == Column("max", 0.0, 0.9, torch.float32)


@pytest.mark.parametrize("field, value, match", [
    ("kind", "avg", r"\['kind'\]: expected one of"),
    ("init", "zero", r"\['init'\]: expected a number, but got 'zero'"),
    ("init", True, r"\['init'\]: expected a number, but got True"),
    ("decay", 1.0, r"\['decay'\]: expected a number in \[0, 1\), but got 1.0"),
    ("decay", -0.5, r"\['decay'\]: expected a number in \[0, 1\)"),
    ("decay", False, r"\['decay'\]"),
    ("dtype", "float128", r"\['dtype'\]: expected one of"),
])
def test_bad_specs_are_checkpoint_errors(field, value, match):
    s = _state()
    s["specs"]["weight"] = {**s["specs"]["weight"], field: value}
    with pytest.raises(CheckpointStateError, match=match) as err:
        SampleStateTable.validate_state(s)
    assert "Resume from another checkpoint" in str(err.value)


def test_decay_zero_is_a_valid_spec():
    s = _state()
    s["specs"]["ema_loss"]["decay"] = 0
    SampleStateTable.validate_state(s)


def test_structural_errors():
    with pytest.raises(CheckpointStateError, match=r"table\['num_samples'\]: expected 5 rows, but got 3"):
        SampleStateTable.validate_state(_state(), num_samples=5)
    s = _state()
    s["columns"] = [1, 2]
    with pytest.raises(CheckpointStateError, match=r"table\['columns'\]: expected a dict of tensors, but got list"):
        SampleStateTable.validate_state(s)
    s = _state()
    s["specs"] = "x"
    with pytest.raises(CheckpointStateError, match=r"table\['specs'\]: expected a dict, but got str"):
        SampleStateTable.validate_state(s)
    s = _state(extra=torch.zeros(3))
    with pytest.raises(CheckpointStateError, match=r"\['specs'\]\['extra'\]: missing: the column has no spec"):
        SampleStateTable.validate_state(s)
    s = _state()
    del s["columns"]["weight"]
    with pytest.raises(CheckpointStateError, match=r"\['columns'\]\['weight'\]: missing column\(s\) \['weight'\]"):
        SampleStateTable.validate_state(s)
    s = _state()
    with pytest.raises(CheckpointStateError, match=r"missing column\(s\) \['z'\]"):
        SampleStateTable.validate_state(s, expected={"z": Column()})


@pytest.mark.parametrize("name, values, match", [
    ("weight", torch.tensor([1.0, -0.5, 1.0]), r"\['weight'\]: expected values >= 0.0, but the minimum is -0.5"),
    ("weight", torch.tensor([1.0, float("nan"), 1.0]), r"\['weight'\]: expected finite values, but got 1 NaN"),
    ("weight", torch.tensor([1.0, float("inf"), 1.0]), r"\['weight'\]: expected finite values, but got 1 inf"),
    ("loss", torch.tensor([1.0, float("-inf"), float("nan")]), r"\['loss'\]: expected finite values, but got 1 inf"),
    ("count", torch.tensor([0, -1, 2]), r"\['count'\]: expected values >= 0, but the minimum is -1"),
    ("count", torch.tensor([0.0, 1.0, 2.0]), r"\['count'\]: expected an integer tensor"),
    ("loss", torch.tensor([0, 1, 2]), r"\['loss'\]: expected a floating-point tensor"),
    ("loss", torch.zeros(4), r"\['loss'\]: expected length 3"),
])
def test_bad_column_values_are_checkpoint_errors(name, values, match):
    s = _state(**{name: values})
    t = SampleStateTable(3)
    before = {k: v.clone() for k, v in t.columns.items()}
    with pytest.raises(CheckpointStateError, match=match):
        t.load_state_dict(s)
    assert all(torch.equal(before[k], v, ) or (before[k].isnan() == v.isnan()).all() for k, v in t.columns.items())


def test_nan_in_a_column_initialised_to_inf_is_refused():
    t = SampleStateTable(3, columns={"best": Column("max", float("-inf"))})
    s = t.state_dict()
    s["columns"]["best"] = torch.tensor([float("-inf"), float("nan"), 1.0])
    with pytest.raises(CheckpointStateError, match=r"\['best'\]: expected no NaN, but got 1 NaN entries"):
        t.load_state_dict(s)


def test_nan_never_seen_marks_and_inf_init_columns_are_accepted():
    s = _state(loss=torch.tensor([float("nan"), 1.0, 2.0]), ema_loss=torch.full((3,), float("nan")))
    n, _, cols = SampleStateTable.validate_state(s)
    assert n == 3 and cols["loss"] is s["columns"]["loss"]
    t = SampleStateTable(2, columns={"best": Column("max", float("-inf"))})
    SampleStateTable.validate_state(t.state_dict())  # -inf init: inf allowed
    big = SampleStateTable(2, columns={"v": Column("sum")})
    big["v"].fill_(3e38)  # a finite column whose float32 sum overflows is still accepted
    SampleStateTable.validate_state(big.state_dict())


def test_load_refuses_another_training_set_size():
    t = SampleStateTable(4)
    with pytest.raises(ValueError, match=r"3 samples but this one has 4: .*Resume with the same data set"):
        t.load_state_dict(_state(3))


def test_from_state_dict_adopts_tensors_and_keeps_declared_dtypes():
    src = SampleStateTable(3, columns={**DEFAULT_COLUMNS, "v": Column("sum", dtype=torch.float64)})
    src.update(torch.tensor([1]), loss=torch.tensor([2.0]), v=torch.tensor([1.5]))
    t = SampleStateTable.from_state_dict(src.state_dict(), num_samples=3)
    assert t.num_samples == 3 and t["v"].dtype == torch.float64 and t["v"][1].item() == 1.5
    assert t["count"] is src["count"]
    with pytest.raises(CheckpointStateError, match="expected 4 rows"):
        SampleStateTable.from_state_dict(src.state_dict(), num_samples=4)
    dst = SampleStateTable(3, columns={**DEFAULT_COLUMNS, "v": Column("sum", dtype=torch.float32)})
    with pytest.raises(ValueError, match="different spec"):
        dst.add_column("v", Column("sum", dtype=torch.float64))
    dst.load_state_dict(src.state_dict())
    assert dst["v"].dtype == torch.float32 and dst["v"][1].item() == 1.5


# ------------------------------------------------------------------------------------------------ compiled path
class _FakeLerp:
    """Kernels whose ``lerp_array`` writes torch's result for one formula only (or for neither)."""

    def __init__(self, right):
        self.right = right

    def lerp_array(self, old, new, w, one, fused, out):
        expected = torch.lerp(torch.from_numpy(old), torch.from_numpy(new), float(w)).numpy()
        out[:] = expected if fused is self.right else expected + 1


@pytest.mark.parametrize("right, probed", [(True, True), (False, False), (None, None)])
def test_lerp_probe_picks_the_formula_torch_computes(right, probed):
    assert table_module._probe_lerp(_FakeLerp(right)) is probed


def test_lerp_probe_on_the_real_kernels_matches_torch():
    kernels = table_module._numba_kernels()
    if kernels is None:
        pytest.skip("numba is not available")
    assert table_module._LERP_FUSED is not None
    assert table_module._probe_lerp(kernels) is table_module._LERP_FUSED


def test_compiled_plan_is_cached_and_rebuilt_when_a_column_is_replaced():
    if table_module._numba_kernels() is None:
        pytest.skip("numba is not available")
    t = SampleStateTable(4)
    t.update(torch.tensor([0]), loss=torch.tensor([1.0]))
    plan = t._plans[("loss",)]
    t.update(torch.tensor([1]), loss=torch.tensor([2.0]))
    assert t._plans[("loss",)] is plan
    t.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in t.state_dict().items()} | {
        "columns": {k: v.clone() for k, v in t.state_dict()["columns"].items()}})
    t.update(torch.tensor([2]), loss=torch.tensor([3.0]))
    assert t._plans[("loss",)] is not plan
    assert t["loss"].tolist()[:3] == [1.0, 2.0, 3.0] and t["count"].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("use_numba", [True, False])
def test_float_and_second_count_columns_count_repeats(monkeypatch, use_numba):
    """A float ``count`` column (which may stop counting exactly) takes the sorting path; every count column
    advances."""
    monkeypatch.setattr(table_module, "USE_NUMBA", use_numba)
    cols = {"count": Column("count", 0, dtype=torch.float32), "c2": Column("count", 0, dtype=torch.int32),
            "loss": Column("last", 0.0)}
    t = SampleStateTable(3, columns=cols)
    t.update(torch.tensor([2, 0, 2]), loss=torch.tensor([1.0, 5.0, 3.0]))
    assert t["count"].tolist() == [1.0, 0.0, 2.0] and t["c2"].tolist() == [1, 0, 2]
    assert t["loss"].tolist() == [5.0, 0.0, 2.0]
    with pytest.raises(IndexError, match=r"\[0, 3\), but got range \[0, 3\]"):
        t.update(torch.tensor([0, 3]), check=False, loss=torch.tensor([1.0, 1.0]))
    assert t["count"].tolist() == [1.0, 0.0, 2.0]
