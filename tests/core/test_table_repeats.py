"""The CPU merges with ``Repeats`` (found once per batch from the count column, shared by the table update and
``scatter_ema_``) give bit-identical tables to the pre-``Repeats`` implementation (``reference_merge``)."""

import pytest
import torch

from lightning_reweight.rules.importance import scatter_ema_
from lightning_reweight.state import Column, SampleStateTable
from lightning_reweight.state import table as table_module
from lightning_reweight.state.table import Repeats

from .reference_merge import scatter_ema_ as reference_scatter_ema_
from .reference_merge import table_update as reference_update

_EXTRA = {"is_score": Column("last", 0.0), "is_seen": Column("last", 0.0), "s": Column("sum"),
          "m": Column("max", init=-1.0), "h": Column("last", 0.0, dtype=torch.float64)}


@pytest.fixture(params=[True, False], ids=["numba", "fallback"], autouse=True)
def use_numba(request, monkeypatch):
    """Every test runs with the compiled update (``state._kernels``) and with the numpy/torch path."""
    monkeypatch.setattr(table_module, "USE_NUMBA", request.param)
    if request.param:
        assert table_module._numba_kernels() is not None, "numba is a dependency: the compiled path must be available"
        assert table_module._LERP_FUSED is not None, "neither lerp formula matches torch's"
    return request.param


def _batches(n: int, g: torch.Generator):
    """Batches with many repeats, with a few, without, all one sample, and a sharp (power-law) draw."""
    yield torch.randint(0, n, (64,), generator=g)
    yield torch.randperm(n, generator=g)[:64]
    yield torch.randint(0, 8, (64,), generator=g)  # heavy repeats
    yield torch.full((64,), 5)  # all duplicates
    yield torch.tensor([3])
    yield torch.multinomial(torch.arange(1, n + 1, dtype=torch.float64) ** -1.5, 100, replacement=True, generator=g)
    yield torch.randint(0, n, (1000,), generator=g)
    yield torch.randperm(n, generator=g)  # every row once
    yield torch.randint(0, n, (4099,), generator=g)  # long: vectorised lerp bodies and tails


def _tables(n: int, columns=None, extra=None):
    a, b = SampleStateTable(n, columns=columns), SampleStateTable(n, columns=columns)
    for name, spec in (_EXTRA if extra is None else extra).items():
        a.add_column(name, spec)
        b.add_column(name, spec)
    return a, b


def _assert_same(a: SampleStateTable, b: SampleStateTable) -> None:
    for name in a.columns:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].nan_to_num(-7.0), b[name].nan_to_num(-7.0)), name
        assert torch.equal(torch.isnan(a[name].double()), torch.isnan(b[name].double())), name


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("columns", ["default", "no_count", "int32_count", "float64", "half"])
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
    elif columns == "float64":
        cols = {"loss": Column("last", float("nan"), dtype=torch.float64), "count": Column("count", 0, dtype=torch.int32),
                "ema_loss": Column("ema", float("nan"), decay=0.55, dtype=torch.float64),
                "weight": Column("last", 1.0, dtype=torch.float64)}
        extra = dict(_EXTRA, s=Column("sum", dtype=torch.float64), m=Column("max", init=-1.0, dtype=torch.float64),
                     e2=Column("ema", 0.5, decay=0.2))
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
            if "e2" in new.columns:  # an EMA column initialised to a number (no NaN rows), fed float64 values
                vals["e2"] = score.double()
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


@pytest.mark.parametrize("columns", [None, {"loss": Column("last", 0.0)}, {"c": Column("count", 0, dtype=torch.float32)},
                                     {"c": Column("count", 0, dtype=torch.int32), "loss": Column("ema", float("nan"))}])
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


@pytest.mark.parametrize("index", [[3], [5, 5, 5, 5], [0, 9, 4, 2], [7, 1, 7, 7, 2, 1, 0]])
@pytest.mark.parametrize("count_dtype", [torch.int64, torch.int32])
def test_small_batches_with_nan_rows_sum_and_max_equal_the_reference(index, count_dtype):
    """B = 1, all duplicates, no repeats, mixed repeats; NaN-initialised rows and rows seen before; a NaN value
    in a ``max`` column wins (as ``scatter_reduce_``)."""
    cols = {"loss": Column("last", float("nan")), "ema_loss": Column("ema", float("nan"), decay=0.9),
            "count": Column("count", 0, dtype=count_dtype), "weight": Column("last", 1.0),
            "s": Column("sum", 0.5), "m": Column("max", init=float("-inf"))}
    new, ref = _tables(10, cols, {})
    g = torch.Generator().manual_seed(len(index))
    ix = torch.tensor(index)
    for step in range(3):
        x = torch.randn(ix.numel(), generator=g)
        m = x.clone()
        if step == 2:
            m[-1] = float("nan")
        vals = {"loss": x, "ema_loss": x, "weight": x.abs(), "s": x, "m": m}
        r = new.update(ix, check=False, **vals)
        reference_update(ref, ix, **vals)
        _assert_same(new, ref)
        ref_repeats = Repeats.of(ix)
        if ref_repeats.positions is None:
            assert r == Repeats(ix.numel())
        else:  # the repeated rows only (rows seen once may be left out)
            keep = ref_repeats.count > 1
            for name in ("positions", "count"):
                assert getattr(r, name).tolist() == getattr(ref_repeats, name)[keep].tolist(), name


def test_compiled_update_matches_the_fallback_on_large_batches():
    """B = 8192 with and without repeats: the compiled path and the numpy/torch path write the same tables and
    return the same ``Repeats``."""
    g = torch.Generator().manual_seed(11)
    tables = {}
    for use in (True, False):
        table_module.USE_NUMBA = use
        t = SampleStateTable(20000)
        t.add_column("s", Column("sum"))
        out = []
        for index in (torch.randint(0, 20000, (8192,), generator=torch.Generator().manual_seed(1)),
                      torch.randperm(20000, generator=torch.Generator().manual_seed(2))[:8192]):
            x = torch.rand(8192, generator=torch.Generator().manual_seed(3))
            out.append(t.update(index, check=False, loss=x, ema_loss=x, weight=x * 2, s=x))
        tables[use] = (t, out)
    (a, ra), (b, rb) = tables[True], tables[False]
    _assert_same(a, b)
    for x, y in zip(ra, rb):
        assert x.size == y.size
        for name in ("positions", "group", "count", "later"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or u.tolist() == v.tolist(), name
    del g
