"""SampleStateTable: vectorised updates, duplicates, checkpoint round trip, bad indices."""

import pytest
import torch

from lightning_reweight.state import Column, SampleStateTable


def test_update_last_ema_count_and_duplicates():
    t = SampleStateTable(5, ema_decay=0.5)
    t.update(torch.tensor([1, 3]), loss=torch.tensor([2.0, 4.0]), ema_loss=torch.tensor([2.0, 4.0]))
    assert t["loss"][1] == 2.0 and torch.isnan(t["loss"][0])
    assert t["ema_loss"][3] == 4.0  # first visit takes the value
    # index 3 twice in one batch: mean of its values (6 and 10 -> 8); EMA 0.5*4 + 0.5*8 = 6
    t.update(torch.tensor([3, 3, 0]), loss=torch.tensor([6.0, 10.0, 1.0]), ema_loss=torch.tensor([6.0, 10.0, 1.0]))
    assert t["loss"][3] == 8.0 and t["ema_loss"][3] == 6.0
    assert t["count"].tolist() == [1, 1, 0, 3, 0]
    assert t["count"].dtype == torch.int64 and t["loss"].dtype == torch.float32


def test_extra_columns_sum_max():
    t = SampleStateTable(4, columns={"s": Column("sum"), "m": Column("max", init=-1.0), "n": Column("count", dtype=torch.int64)})
    t.update(torch.tensor([0, 0, 2]), s=torch.tensor([1.0, 2.0, 5.0]), m=torch.tensor([3.0, 7.0, -5.0]))
    assert t["s"].tolist() == [3.0, 0, 5.0, 0] and t["m"].tolist() == [7.0, -1, -1, -1]
    t.add_column("extra", Column("last", init=0.5))
    assert t["extra"].tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="different spec"):
        t.add_column("extra", Column("ema"))
    # NaN-initialised columns are re-declared on resume: NaN init must compare equal
    t.add_column("unseen", Column("last", init=float("nan")))
    t.add_column("unseen", Column("last", init=float("nan")))


def test_round_trip_exact():
    t = SampleStateTable(6)
    t.add_column("beta", Column("last", init=0.5))
    t.update(torch.tensor([0, 4, 4]), loss=torch.tensor([1.0, 2.0, 3.0]), beta=torch.tensor([0.1, 0.2, 0.3]))
    clone = SampleStateTable.from_state_dict(t.state_dict())
    for k in t.columns:
        torch.testing.assert_close(clone[k], t[k], equal_nan=True, rtol=0, atol=0)
    assert clone.specs == t.specs


def test_bad_indices_leave_state_untouched():
    t = SampleStateTable(3)
    before = {k: v.clone() for k, v in t.columns.items()}
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        t.update(torch.tensor([0, 3]), loss=torch.tensor([1.0, 1.0]))
    with pytest.raises(TypeError, match="integer"):
        t.update(torch.tensor([0.0]), loss=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one per index"):
        t.update(torch.tensor([0, 1]), loss=torch.tensor([1.0]))
    with pytest.raises(KeyError, match="add_column"):
        t.update(torch.tensor([0]), nope=torch.tensor([1.0]))
    for k, v in before.items():
        torch.testing.assert_close(t[k], v, equal_nan=True)
    with pytest.raises(ValueError, match="changed size"):
        SampleStateTable(4).load_state_dict(t.state_dict())


def test_memory_is_o_n_float32():
    t = SampleStateTable(1000)
    # loss, ema_loss, weight float32 + count int64
    assert t.nbytes() == 1000 * (4 * 3 + 8)


def test_state_dict_aliases_the_live_columns_and_load_takes_ownership():
    """No O(N) copy on save or load: the checkpoint holds the table's tensors; a restore adopts them."""
    t = SampleStateTable(8)
    state = t.state_dict()
    assert all(state["columns"][k].data_ptr() == t[k].data_ptr() for k in t.columns)
    t.update(torch.tensor([1]), loss=torch.tensor([2.0]))
    assert state["columns"]["loss"][1] == 2.0  # a view, valid until the next update
    restored = SampleStateTable.from_state_dict(state)
    assert all(restored[k].data_ptr() == state["columns"][k].data_ptr() for k in t.columns)
    # a declared dtype wins: an int32 count column is converted (the only copy), float32 columns are adopted
    state["columns"]["count"] = state["columns"]["count"].int()
    state["specs"]["count"]["dtype"] = "int32"
    t2 = SampleStateTable(8)
    t2.load_state_dict(state)
    assert t2["count"].dtype == torch.int64 and t2["weight"].data_ptr() == state["columns"]["weight"].data_ptr()


@pytest.mark.parametrize("path", ["host", "fixed_shape"])
def test_update_merges_duplicates_with_fixed_shapes_like_a_reference(path):
    """Both merges equal a per-sample reference (mean of duplicates, EMA on the mean), for batches with and
    without repeated indices: the CPU path (direct writes, or ``torch.unique`` when an index repeats) and the
    sort/searchsorted merge a GPU table uses (no host sync)."""
    g = torch.Generator().manual_seed(0)
    t = SampleStateTable(50, ema_decay=0.7)
    t._fixed_shape_only = path == "fixed_shape"
    t.add_column("m", Column("max", init=-1.0))
    t.add_column("s", Column("sum"))
    ref = {"loss": [float("nan")] * 50, "ema": [float("nan")] * 50, "count": [0] * 50, "m": [-1.0] * 50, "s": [0.0] * 50}
    for step in range(8):
        idx = torch.randint(0, 50, (40,), generator=g) if step % 2 else torch.randperm(50, generator=g)[:40]
        val = torch.rand(40, generator=g)
        t.update(idx, loss=val, ema_loss=val, m=val, s=val)
        for i in set(idx.tolist()):
            vals = val[idx == i].double()
            mean = float(vals.mean())
            ref["loss"][i] = mean
            ref["ema"][i] = mean if ref["ema"][i] != ref["ema"][i] else 0.7 * ref["ema"][i] + 0.3 * mean
            ref["count"][i] += vals.numel()
            ref["m"][i] = max(ref["m"][i], float(vals.max()))
            ref["s"][i] += float(vals.sum())
    torch.testing.assert_close(t["loss"], torch.tensor(ref["loss"]), equal_nan=True)
    torch.testing.assert_close(t["ema_loss"], torch.tensor(ref["ema"]), equal_nan=True)
    assert t["count"].tolist() == ref["count"]
    torch.testing.assert_close(t["m"], torch.tensor(ref["m"]))
    torch.testing.assert_close(t["s"], torch.tensor(ref["s"]))


def test_fixed_shape_merge_shares_one_pass_across_columns_and_dtypes():
    """The GPU merge stacks the "last"/"ema" columns into one float64 pass: columns of different dtypes fed the
    same tensor, or different tensors, end as on the host path (exactly); the merge's op count does not grow by a
    whole merge per column (every op is a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    tables = {}
    for path in ("host", "fixed_shape"):
        t = SampleStateTable(30, ema_decay=0.8)
        t._fixed_shape_only = path == "fixed_shape"
        t.add_column("d", Column("ema", dtype=torch.float64, decay=0.6))
        t.add_column("h", Column("last", dtype=torch.float16))
        tables[path] = t
    for _ in range(6):
        idx = torch.randint(0, 30, (25,), generator=g)
        a, b = torch.rand(25, generator=g) * 10, torch.rand(25, generator=g)
        for t in tables.values():
            t.update(idx, loss=a, ema_loss=a, d=a, h=b, weight=b)
    for name in tables["host"].specs:  # EMA columns too: both paths step with torch.lerp
        torch.testing.assert_close(tables["fixed_shape"][name], tables["host"][name], equal_nan=True, rtol=0, atol=0)

    def ops(**values):
        t = SampleStateTable(30)
        t._fixed_shape_only = True
        t.add_column("x", Column("ema"))
        idx = torch.randint(0, 30, (16,), generator=g)
        with CountOps() as counter:
            t.update(idx, check=False, **values)
        return counter.n

    v = torch.rand(16, generator=g)
    one, three = ops(loss=v), ops(loss=v, ema_loss=v, x=torch.rand(16, generator=g))
    # each extra column adds its own write (~11 ops), not another sort, prefix sum and mean (~21 ops each before)
    assert three - one <= 24, (one, three)
