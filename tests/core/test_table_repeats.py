"""The CPU merges with ``Repeats`` (found once per batch from the count column, shared by the table update and
``scatter_ema_``) give bit-identical tables to the pre-``Repeats`` implementation (``reference_merge``)."""

import pytest
import torch

from lightning_reweight.rules.importance import scatter_ema_
from lightning_reweight.state import Column, SampleStateTable
from lightning_reweight.state.table import Repeats

from .reference_merge import scatter_ema_ as reference_scatter_ema_
from .reference_merge import table_update as reference_update

_EXTRA = {"is_score": Column("last", 0.0), "is_seen": Column("last", 0.0), "s": Column("sum"),
          "m": Column("max", init=-1.0), "h": Column("last", 0.0, dtype=torch.float64)}


def _batches(n: int, g: torch.Generator):
    """Batches with many repeats, with a few, without, all one sample, and a sharp (power-law) draw."""
    yield torch.randint(0, n, (64,), generator=g)
    yield torch.randperm(n, generator=g)[:64]
    yield torch.randint(0, 8, (64,), generator=g)  # heavy repeats
    yield torch.full((64,), 5)  # all duplicates
    yield torch.tensor([3])
    yield torch.multinomial(torch.arange(1, n + 1, dtype=torch.float64) ** -1.5, 100, replacement=True, generator=g)
    yield torch.randint(0, n, (1000,), generator=g)


def _tables(n: int, columns=None, extra=None):
    a, b = SampleStateTable(n, columns=columns), SampleStateTable(n, columns=columns)
    for name, spec in (extra or _EXTRA).items():
        a.add_column(name, spec)
        b.add_column(name, spec)
    return a, b


def _assert_same(a: SampleStateTable, b: SampleStateTable) -> None:
    for name in a.columns:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].nan_to_num(-7.0), b[name].nan_to_num(-7.0)), name
        assert torch.equal(torch.isnan(a[name].double()), torch.isnan(b[name].double())), name


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("columns", ["default", "no_count", "int32_count", "half"])
def test_update_and_score_ema_equal_the_reference_bit_for_bit(rate, columns):
    """Float32/float64 columns take the numpy path, float16/bfloat16 ones the torch ops: both match."""
    cols, extra = None, None
    if columns == "no_count":
        cols = {"loss": Column("last", float("nan")), "ema_loss": Column("ema", float("nan"), decay=0.9),
                "weight": Column("last", 1.0)}
    elif columns == "int32_count":
        cols = {"loss": Column("last", float("nan")), "count": Column("count", 0, dtype=torch.int32),
                "n2": Column("count", 0, dtype=torch.int64), "ema_loss": Column("ema", float("nan"), decay=0.7),
                "weight": Column("last", 1.0)}
    elif columns == "half":
        cols = {"loss": Column("last", float("nan"), dtype=torch.float16), "count": Column("count", 0, dtype=torch.int64),
                "ema_loss": Column("ema", float("nan"), decay=0.9, dtype=torch.bfloat16),
                "weight": Column("last", 1.0, dtype=torch.float64)}
        extra = dict(_EXTRA, is_score=Column("last", 0.0, dtype=torch.float16),
                     is_seen=Column("last", 0.0, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(int(rate * 100))
    n = 97
    new, ref = _tables(n, cols, extra)
    for _epoch in range(3):
        for index in _batches(n, g):
            b = index.numel()
            losses, weights = torch.rand(b, generator=g) * 3, torch.rand(b, generator=g) * 2
            score = torch.rand(b, generator=g)
            vals = {"loss": losses, "ema_loss": losses, "weight": weights, "s": score, "m": score, "h": weights}
            repeats = new.update(index, check=False, **vals)
            assert isinstance(repeats, Repeats) and repeats.size == b
            scatter_ema_(new["is_score"], new["is_seen"], index, score, rate, repeats=repeats)
            reference_update(ref, index, **vals)
            reference_scatter_ema_(ref["is_score"], ref["is_seen"], index, score, rate)
            _assert_same(new, ref)
        for t in (new, ref):  # the callback's epoch reset
            t["is_score"].zero_()
            t["is_seen"].zero_()


@pytest.mark.parametrize("rate", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("seen_dtype", [torch.bool, torch.float32])
def test_scatter_ema_alone_and_with_repeats_equal_the_reference(rate, seen_dtype):
    """Without ``repeats`` (one sort), with the table's ``Repeats``, and with a stale ``Repeats`` of another
    batch size (ignored): all equal the reference bit for bit."""
    g = torch.Generator().manual_seed(3)
    n = 50
    vals = [torch.zeros(n) for _ in range(4)]
    seens = [torch.zeros(n, dtype=seen_dtype) for _ in range(4)]
    table = SampleStateTable(n)
    for index in _batches(n, g):
        new = torch.rand(index.numel(), generator=g)
        repeats = table.update(index, check=False)
        scatter_ema_(vals[0], seens[0], index, new, rate)
        scatter_ema_(vals[1], seens[1], index, new, rate, repeats=repeats)
        scatter_ema_(vals[2], seens[2], index, new, rate, repeats=Repeats(index.numel() + 1))
        reference_scatter_ema_(vals[3], seens[3], index, new, rate)
        for v, s in zip(vals[:3], seens[:3]):
            assert torch.equal(v, vals[3]) and torch.equal(s, seens[3])


def test_repeats_describe_the_batch():
    t = SampleStateTable(10)
    index = torch.tensor([4, 1, 4, 7, 1, 4, 9])
    r = t.update(index, check=False)
    assert r.size == 7
    assert r.positions.tolist() == [1, 4, 0, 2, 5]  # row 1 (positions 1, 4), then row 4 (0, 2, 5)
    assert r.group.tolist() == [0, 0, 2, 2, 2]
    assert r.count.tolist() == [2, 2, 3, 3, 3]
    assert r.later.tolist() == [1, 0, 2, 1, 0]
    assert t.update(torch.tensor([0, 2, 3]), check=False) == Repeats(3)  # no repeats
    assert t["count"].tolist() == [1, 2, 1, 1, 3, 0, 0, 1, 0, 1]
    assert t.update(torch.tensor([], dtype=torch.long)) is None
    r = Repeats.of(index)  # without a table: one sort, every position (rows seen once are groups of one)
    assert r.positions.tolist() == [1, 4, 0, 2, 5, 3, 6] and r.count.tolist() == [2, 2, 3, 3, 3, 1, 1]
    assert Repeats.of(torch.tensor([2, 0, 1])).positions is None


def test_fixed_shape_table_returns_no_repeats():
    t = SampleStateTable(10)
    t._fixed_shape_only = True
    assert t.update(torch.tensor([1, 1, 2]), loss=torch.tensor([1.0, 2.0, 3.0])) is None
    assert t["loss"][1] == 1.5 and t["count"][1] == 2


@pytest.mark.parametrize("columns", [None, {"loss": Column("last", 0.0)}, {"c": Column("count", 0, dtype=torch.float32)}])
@pytest.mark.parametrize("bad", [-1, 10])
def test_unchecked_out_of_range_index_raises_before_any_write(columns, bad):
    """``check=False`` skips the range check, but a bad index still raises (numpy would wrap a negative one)
    and leaves the table as it was."""
    t = SampleStateTable(10, columns=columns)
    before = {k: v.clone() for k, v in t.columns.items()}
    with pytest.raises(IndexError):
        t.update(torch.tensor([1, 1, bad]), check=False, **({} if "c" in t.columns else {"loss": torch.ones(3)}))
    for k, v in before.items():
        assert torch.equal(t[k].nan_to_num(-1), v.nan_to_num(-1)), k
