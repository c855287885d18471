"""Checkpoint readers (``state.validate``): every refusal is a ``CheckpointStateError`` naming the key and the fix,
and every bound is inclusive. Written against survivors of ``scripts/mutate.py state/validate.py``."""

import math

import pytest
import torch

from lightning_reweight.samplers import RS2Sampler
from lightning_reweight.state.validate import (
    CheckpointStateError,
    TrainingSetChangedError,
    as_distribution,
    as_float,
    as_int,
    as_tensor,
    require_keys,
)

FIX = "Resume from another checkpoint"


def _raises(match):
    return pytest.raises(CheckpointStateError, match=match)


def test_error_names_where_and_key_and_the_fix():
    err = CheckpointStateError("cb", "q", "bad.")
    assert (err.where, err.key) == ("cb", "q")
    assert str(err).startswith("Checkpoint state cb['q']: bad. ") and FIX in str(err)
    assert str(CheckpointStateError("cb", None, "bad.")).startswith("Checkpoint state cb: bad.")
    assert str(CheckpointStateError("cb", "q", "bad.", fix="Do X.")) == "Checkpoint state cb['q']: bad. Do X."
    assert issubclass(CheckpointStateError, ValueError) and issubclass(TrainingSetChangedError, ValueError)


def test_require_keys():
    with _raises(r"Checkpoint state cb: expected a dict, but got list\. .*Resume from another checkpoint"):
        require_keys([1], ["a"], "cb")
    with _raises(r"cb\['b'\]: missing key\(s\) \['b', 'c'\]; present: \['a'\]"):
        require_keys({"a": 1}, ["a", "b", "c"], "cb")
    state = {"a": 1}
    assert require_keys(state, ["a"], "cb") is state


# ------------------------------------------------------------------------------------------------ tensors
def test_as_tensor_types_and_shapes():
    with _raises(r"cb\['t'\]: expected a tensor, but got list"):
        as_tensor({"t": [1.0]}, "t", "cb")
    with _raises(r"expected a floating-point tensor, but got dtype torch.int64"):
        as_tensor({"t": torch.tensor([1])}, "t", "cb")
    for bad in (torch.tensor([1.0]), torch.tensor([True]), torch.tensor([1j])):
        with _raises(r"expected an integer tensor, but got dtype"):
            as_tensor({"t": bad}, "t", "cb", kind="int")
    assert as_tensor({"t": torch.tensor([True])}, "t", "cb", kind="any").dtype == torch.bool
    with _raises(r"expected 1 dimension\(s\), but got shape \(1, 1\)"):
        as_tensor({"t": torch.zeros(1, 1)}, "t", "cb")
    with _raises(r"expected length 3, but got shape \(2,\)"):
        as_tensor({"t": torch.zeros(2)}, "t", "cb", length=3)
    with _raises(r"expected length 3, but got shape \(\)"):
        as_tensor({"t": torch.tensor(3.0)}, "t", "cb", ndim=None, length=3)
    t = torch.zeros(2, 2)
    assert as_tensor({"t": t}, "t", "cb", ndim=None) is t
    assert as_tensor({"t": t}, "t", "cb", ndim=2, length=2) is t


def test_as_tensor_finite_nan_and_bounds_inclusive():
    nan = torch.tensor([1.0, float("nan")])
    with _raises(r"expected finite values, but got 1 NaN entries"):
        as_tensor({"t": nan}, "t", "cb")
    assert as_tensor({"t": nan}, "t", "cb", allow_nan=True) is not None
    assert as_tensor({"t": nan}, "t", "cb", finite=False) is not None
    inf = torch.tensor([1.0, float("inf"), -float("inf")])
    with _raises(r"expected finite values, but got 2 inf entries"):
        as_tensor({"t": inf}, "t", "cb", allow_nan=True)
    as_tensor({"t": inf}, "t", "cb", finite=False)
    v = torch.tensor([0.0, 0.5, 1.0])
    assert as_tensor({"t": v}, "t", "cb", minimum=0.0, maximum=1.0) is v  # both bounds inclusive
    with _raises(r"expected values >= 0.1, but the minimum is 0.0"):
        as_tensor({"t": v}, "t", "cb", minimum=0.1)
    with _raises(r"expected values <= 0.9, but the maximum is 1.0"):
        as_tensor({"t": v}, "t", "cb", maximum=0.9)
    # NaN entries are skipped by the bounds when allowed
    as_tensor({"t": torch.tensor([float("nan"), 0.5])}, "t", "cb", allow_nan=True, minimum=0.0, maximum=1.0)
    with _raises(r"expected values >= 1, but the minimum is 0"):
        as_tensor({"t": torch.tensor([0, 3])}, "t", "cb", kind="int", minimum=1)
    assert as_tensor({"t": torch.zeros(0)}, "t", "cb", minimum=1.0).numel() == 0  # empty: nothing to bound


def test_as_distribution():
    q = torch.tensor([0.25, 0.75])
    assert as_distribution({"q": q}, "q", "cb", length=2) is q
    as_distribution({"q": torch.tensor([0.5, 0.50009])}, "q", "cb")  # within atol 1e-4
    wide = torch.tensor([0.5, 0.75], dtype=torch.float64)  # |sum - 1| == atol exactly: accepted
    assert as_distribution({"q": wide}, "q", "cb", atol=0.25) is wide
    with _raises(r"expected a probability distribution summing to 1, but the sum is 1.5"):
        as_distribution({"q": torch.tensor([0.75, 0.75])}, "q", "cb")
    with _raises(r"summing to 1, but the sum is 0.89999"):
        as_distribution({"q": torch.tensor([0.45, 0.45])}, "q", "cb")
    with _raises(r"expected values >= 0.0"):
        as_distribution({"q": torch.tensor([1.5, -0.5])}, "q", "cb")
    with _raises(r"expected length 3"):
        as_distribution({"q": q}, "q", "cb", length=3)


# ------------------------------------------------------------------------------------------------ scalars
def test_scalar_keys_refuse_non_scalar_tensors_as_checkpoint_errors():
    for reader in (as_int, as_float):
        with _raises(r"cb\['s'\]: expected a scalar, but got shape \(2,\)"):
            reader({"s": torch.tensor([1, 2])}, "s", "cb")
        with _raises(r"expected a scalar, but got shape \(0,\)"):
            reader({"s": torch.zeros(0)}, "s", "cb")
    assert as_int({"s": torch.tensor([7])}, "s", "cb") == 7  # one element of any shape is a scalar
    assert as_float({"s": torch.tensor(0.5)}, "s", "cb") == 0.5


def test_as_int():
    assert as_int({"n": 3}, "n", "cb", minimum=3, maximum=3) == 3  # inclusive bounds
    with _raises(r"cb\['n'\]: expected an int >= 4, but got 3"):
        as_int({"n": 3}, "n", "cb", minimum=4)
    with _raises(r"expected an int <= 2, but got 3"):
        as_int({"n": 3}, "n", "cb", maximum=2)
    for bad in (True, 2.0, "2", None):
        with _raises(r"expected an int, but got"):
            as_int({"n": bad}, "n", "cb")
    assert as_int({"n": None}, "n", "cb", optional=True) is None
    with _raises(r"missing key"):
        as_int({}, "n", "cb", optional=True)


def test_as_float():
    assert as_float({"x": 1}, "x", "cb") == 1.0 and isinstance(as_float({"x": 1}, "x", "cb"), float)
    assert as_float({"x": 0.0}, "x", "cb", minimum=0.0, maximum=0.0) == 0.0  # inclusive bounds
    with _raises(r"expected a number >= 0.5, but got 0.25"):
        as_float({"x": 0.25}, "x", "cb", minimum=0.5)
    with _raises(r"expected a number <= 1.0, but got 1.5"):
        as_float({"x": 1.5}, "x", "cb", maximum=1.0)
    for bad in (True, "1.0", None, [1.0]):
        with _raises(r"expected a number, but got"):
            as_float({"x": bad}, "x", "cb")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with _raises(r"expected a finite number, but got"):
            as_float({"x": bad}, "x", "cb")
    assert math.isinf(as_float({"x": float("inf")}, "x", "cb", finite=False))
    assert as_float({"x": None}, "x", "cb", optional=True) is None


def test_rs2_fraction_one_is_the_inclusive_upper_bound():
    s = RS2Sampler(4, fraction=1.0, num_replicas=1, rank=0)
    state = s.state_dict()
    assert state["rs2"]["fraction"] == 1.0
    s2 = RS2Sampler(4, fraction=0.5, num_replicas=1, rank=0)
    s2.load_state_dict(state)
    assert s2.fraction == 1.0
    state["rs2"]["fraction"] = 1.0000001
    with pytest.raises(CheckpointStateError, match=r"\['fraction'\]: expected a number <= 1.0"):
        RS2Sampler(4, fraction=0.5, num_replicas=1, rank=0).load_state_dict(state)
