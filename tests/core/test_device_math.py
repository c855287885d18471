"""The device path's math, run on CPU tensors, against frozen copies of the code it replaced (fewer kernels per
step, ``tests/core/test_op_budget.py``) and against the CPU path: the same numbers, bit for bit, or within the
documented tolerance (docs/gpu.md, "Op budget")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_reweight.engine import Checks, DeferredChecks, _pack, _read
from lightning_reweight.rules.adawac import _device_update, _step_log_ratio, adawac_update
from lightning_reweight.rules.fairness import update_group_errors
from lightning_reweight.rules.importance import _scatter_ema_fixed, scatter_ema_
from lightning_reweight.rules.instance import _minmax_tensors
from lightning_reweight.state.table import PAIR_MERGE_ROWS, BatchIndex, Column, SampleStateTable

CUDA_LABEL = torch.device("cuda")  # a device label for ``Checks``: the values stay CPU tensors


# ------------------------------------------------------------------------------------ frozen copies (before)
def old_minmax(losses, delta=1.0, eps=1e-6):
    x = losses.double()
    lo_t, hi_t = x.aminmax()
    scale_t = delta / (hi_t - lo_t).clamp_min(eps)
    return (x * (2 * scale_t) - (hi_t + lo_t) * scale_t).to(losses.dtype)


def old_scatter_ema_fixed(values, seen, idx_s, new_s, rate):
    left = torch.searchsorted(idx_s, idx_s)
    m = torch.searchsorted(idx_s, idx_s, right=True) - left
    pos = torch.arange(idx_s.numel(), device=idx_s.device) - left
    keep = 1.0 - rate
    coef = rate * torch.pow(torch.full_like(new_s, keep), (m - 1 - pos).to(new_s.dtype))
    was_seen = seen[idx_s] > 0
    first_unseen = (pos == 0) & ~was_seen
    coef = torch.where(first_unseen, torch.pow(torch.full_like(new_s, keep), (m - 1).to(new_s.dtype)), coef)
    contrib = torch.zeros_like(new_s).index_add_(0, left, coef * new_s)[left]
    old = values[idx_s].to(torch.float64)
    old_term = torch.where(was_seen, torch.pow(torch.full_like(old, keep), m.to(old.dtype)) * old, 0.0)
    values[idx_s] = (old_term + contrib).to(values.dtype)
    seen.index_fill_(0, idx_s, True)


def old_combine_scale(normalized, n):
    total = normalized.sum()
    return normalized * torch.where(total > 0, n / total, torch.ones_like(total))


def old_log_ratio(beta_sup, beta_cons, step):
    log_sup = beta_sup.double().clamp_min(0).log().clamp_min(math.log(1e-300))
    log_cons = beta_cons.double().clamp_min(0).log().clamp_min(math.log(1e-300))
    z = log_sup - log_cons + step
    return torch.sigmoid(z).to(beta_sup.dtype), torch.sigmoid(-z).to(beta_sup.dtype)


# ------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("delta", [1.0, 0.5, 3.0])
def test_minmax_device_formula_is_bit_identical(delta):
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 1e30):
        losses = torch.rand(257, generator=g) * scale
        x = losses.double()
        lo, hi = x.aminmax()
        assert torch.equal(_minmax_tensors(losses, x, lo, hi, delta, 1e-6), old_minmax(losses, delta))


def test_scatter_ema_fixed_is_bit_identical_and_the_unique_step_equals_it():
    g = torch.Generator().manual_seed(1)
    for rate in (0.5, 0.3, 1.0):
        for step in range(6):
            index = torch.randint(0, 40, (64,), generator=g) if step % 2 else torch.randperm(40, generator=g)[:32]
            new = torch.rand(index.numel(), generator=g, dtype=torch.float64)
            values = torch.rand(40, generator=g)
            seen = torch.rand(40, generator=g) > 0.5
            idx_s, order = torch.sort(index, stable=True)
            a, sa, b, sb = values.clone(), seen.clone(), values.clone(), seen.clone()
            _scatter_ema_fixed(a, sa, idx_s, new[order], rate)
            old_scatter_ema_fixed(b, sb, idx_s, new[order], rate)
            assert torch.equal(a, b) and torch.equal(sa, sb)
            if step % 2 == 0:  # no repeats: the one-step form writes the same values
                c, sc = values.clone(), seen.clone()
                scatter_ema_(c, sc, index, new, rate)  # the CPU path
                d, sd = values.clone(), seen.clone()
                old = d[index].double()
                d[index] = torch.where(sd[index] > 0, (1.0 - rate) * old + rate * new, new).to(d.dtype)
                assert torch.equal(a, d) and torch.equal(c, a)


def test_adawac_device_update_equals_the_cpu_path():
    """Each position's step: its own (no repeats), the pair matrix's sums or the sorted prefix sums (repeats);
    the CPU path sums a sample's steps with ``index_add_``. The log-ratio step stacks both weights."""
    g = torch.Generator().manual_seed(2)
    sup = torch.rand(50, generator=g)
    cons = 1 - sup
    for index in (torch.randperm(50, generator=g)[:20], torch.randint(0, 50, (30,), generator=g)):
        ls, lc = torch.rand(index.numel(), generator=g), torch.rand(index.numel(), generator=g)
        rows, s_cpu, c_cpu, inverse = adawac_update(sup, cons, index, ls, lc, 4.0, return_inverse=True)
        info = BatchIndex(index)
        info.unique = bool(torch.unique(index).numel() == index.numel())
        for hints in (info, None):  # the pair matrix / the sort
            _, s_dev, c_dev = _device_update(sup, cons, index, ls, lc, 4.0, False, hints)
            torch.testing.assert_close(s_dev, s_cpu[inverse], rtol=1e-6 if hints is None else 0, atol=1e-7
                                       if hints is None else 0)
            torch.testing.assert_close(c_dev, c_cpu[inverse], rtol=1e-6 if hints is None else 0, atol=1e-7
                                       if hints is None else 0)
    step = torch.randn(20, generator=g, dtype=torch.float64)  # the stacked form (a device's): its math on the CPU
    stacked = torch.stack([sup[:20], cons[:20]]).double().clamp_min(0).log().clamp_min(math.log(1e-300))
    z = stacked[0] - stacked[1] + step
    new = torch.sigmoid(torch.stack([z, -z])).float()
    old = old_log_ratio(sup[:20], cons[:20], step)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(a, b) for a, b in zip(_step_log_ratio(sup[:20], cons[:20], step), old))


def test_group_errors_with_momentum_one_take_the_batch_error():
    g = torch.Generator().manual_seed(3)
    errors, batch = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    seen, present = torch.rand(6, generator=g) > 0.5, torch.rand(6, generator=g) > 0.5
    new, new_seen = update_group_errors(errors, seen, batch, present, 1.0)
    blended = torch.where(seen, 0.0 * errors + 1.0 * batch, batch)
    assert torch.equal(new, torch.where(present, blended, errors)) and torch.equal(new_seen, seen | present)


# ------------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("rows", [40, PAIR_MERGE_ROWS + 200])
def test_fixed_shape_table_update_equals_the_cpu_path(rows):
    """The device merge (the pair matrix up to ``PAIR_MERGE_ROWS`` rows, a sort beyond) and the direct writes
    when the step knows no index repeats: the same table as the CPU path, bit for bit (EMA columns step with
    ``torch.lerp`` there too)."""
    g = torch.Generator().manual_seed(4)
    n = 2 * rows
    tables = {}
    for path in ("host", "fixed", "hinted"):
        t = SampleStateTable(n, ema_decay=0.7)
        t._fixed_shape_only = path != "host"
        t.add_column("m", Column("max", init=-1.0))
        t.add_column("s", Column("sum", dtype=torch.float64))
        tables[path] = t
    for step in range(6):
        index = torch.randint(0, n, (rows,), generator=g) if step % 2 else torch.randperm(n, generator=g)[:rows]
        loss, weight = torch.rand(rows, generator=g) * 10, torch.rand(rows, generator=g)
        info = BatchIndex(index)
        info.unique = step % 2 == 0
        for path, t in tables.items():
            t.update(index, check=False, index_info=info if path == "hinted" else None, loss=loss, ema_loss=loss,
                     weight=weight, m=weight, s=loss)
    for name in tables["host"].columns:
        for path in ("fixed", "hinted"):
            assert torch.equal(tables[path][name].nan_to_num(-7), tables["host"][name].nan_to_num(-7)), (path, name)


# ------------------------------------------------------------------------------------ the engine's checks
def test_one_transfer_reads_values_of_every_dtype():
    values = [torch.tensor(1.5), torch.tensor(-3, dtype=torch.int64), torch.tensor(True), torch.tensor(2.25,
              dtype=torch.float64), torch.tensor(7, dtype=torch.int32)]
    packed, layout = _pack(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 4 + 8 + 1 + 8 + 4
    assert _read(packed, layout) == [1.5, -3, True, 2.25, 7]


def test_checks_read_values_and_compare_on_the_host_in_order():
    def fail(name):
        def raise_():
            raise ValueError(name)
        return raise_

    checks = Checks(CUDA_LABEL, sync=True)
    checks.within(torch.tensor(3.0), 0.0, math.inf, fail("a"))
    slot = checks.read(torch.tensor(5, dtype=torch.int64))
    checks.within(torch.tensor(float("nan")), -1.0, 1.0, fail("b"))  # NaN is within no bounds
    checks.within(torch.tensor(9, dtype=torch.int64), 0, 7, fail("c"))
    with pytest.raises(ValueError, match="^b$"):  # the first failure, in the order they were added
        checks.flush()
    assert slot == 1
    checks.within(torch.tensor(2.0), 0.0, math.inf, fail("d"))
    assert checks.flush() == [2.0]


def test_deferred_checks_count_the_bad_steps_with_a_few_kernels():
    steps = []
    # bad: step 1 (an infinite loss), 2 (an index past 7), 3 (NaN and an index past 7), 4 (its bool check)
    for k, (loss_hi, index_hi) in enumerate([(1.0, 5), (float("inf"), 5), (2.0, 9), (float("nan"), 12), (0.5, 0)]):
        checks = Checks(CUDA_LABEL, sync=False)
        checks.within(torch.tensor(0.0), -3.4e38, math.inf, None)
        checks.within(torch.tensor(loss_hi), -math.inf, 3.4e38, None)
        checks.within(torch.tensor(0), 0, 7, None)
        checks.within(torch.tensor(index_hi), 0, 7, None)
        checks.require(torch.tensor(k != 4), None)  # a callback's own bool check (fails at the last step)
        steps.append(checks.deferred_values())
    assert int(DeferredChecks.count_bad(steps)) == 4
    assert int(DeferredChecks.count_bad(steps[:1])) == 0


def test_combine_scales_as_before():
    """Deferred: ``B / total`` on the device, as before, for every total from ``4·B / 3.4e38`` up; checked each
    step: the host's ``B / total``, as the CPU path."""
    from lightning_reweight.engine import GlobalBatch, combine

    class Cb:
        normalized = True

    g = torch.Generator().manual_seed(5)
    for scale in (1.0, 1e-30, 1e30):
        w = torch.rand(64, generator=g) * scale
        batch = GlobalBatch(losses=torch.zeros(64), index=torch.arange(64))
        deferred = combine([(Cb(), w)], batch, Checks(CUDA_LABEL, sync=False))
        assert torch.equal(deferred, old_combine_scale(w, 64))
        checked = combine([(Cb(), w)], batch, Checks(CUDA_LABEL, sync=True))
        host = combine([(Cb(), w)], batch, Checks(torch.device("cpu"), sync=True))
        assert torch.equal(checked, host)
        torch.testing.assert_close(checked, deferred, rtol=2e-7, atol=0)


def test_ess_of_kept_gpu_steps_counts_the_collapses_of_each_step():
    from lightning_reweight import LossReweighting
    from lightning_reweight.rules import effective_sample_size

    g = torch.Generator().manual_seed(6)
    cb = LossReweighting("linupper", min_ess_frac=0.5)
    ws = [torch.rand(32, generator=g) ** p for p in (1, 8, 30, 1, 60)]
    cb._ess_kept = [(w, 32) for w in ws]
    cb._fold_collapses()
    expected = sum(bool(effective_sample_size(w) < 0.5 * 32) for w in ws)
    assert cb.ess_collapsed_steps == expected and 0 < expected < len(ws)
    assert np.isclose(float(effective_sample_size(ws[-1])), float(effective_sample_size(ws[-1])))


# ------------------------------------------------------------------------------------ the callbacks' own checks
@pytest.mark.parametrize("ignore_index", [-1, None, 255])
def test_device_group_buckets_equal_the_host_ones_and_check_the_ids_with_the_step(ignore_index):
    """GroupDRO / FEBS on a device: the same buckets and counts as the host path; the ids' check joins the
    step's checks (read at the engine's flush, the error naming the bad ids)."""
    from lightning_reweight import GroupDRO
    from lightning_reweight.engine import GlobalBatch

    cb = GroupDRO(num_groups=4, ignore_index=ignore_index)
    group = torch.tensor([0, 3, 1, 1, 2] + ([ignore_index] if ignore_index is not None else [0]))
    batch = GlobalBatch(losses=torch.zeros(6), index=torch.arange(6), group=group)
    batch.checks = Checks(CUDA_LABEL, sync=True)
    idx, counts = cb._device_buckets(group, batch)
    host_idx, host_counts = cb._bucket_and_count(group)
    assert torch.equal(idx, host_idx) and torch.equal(counts, host_counts)
    batch.checks.flush()  # valid: nothing raised
    bad = torch.tensor([0, 4, 1, 1, 2, 0])  # 4 is no group (and not the ignore_index)
    batch.checks = Checks(CUDA_LABEL, sync=True)
    idx, counts = cb._device_buckets(bad, batch)
    assert int(idx.max()) <= 4 and int(counts.sum()) == 6  # in range until the checks stop the step
    with pytest.raises(ValueError, match=r"num_groups"):
        batch.checks.flush()
    batch.checks = Checks(CUDA_LABEL, sync=False)  # deferred: kept for the callback's next check
    cb._device_buckets(bad, batch)
    cb.defer_check(batch.checks.deferred_values())
    with pytest.raises(ValueError, match=r"1 training step\(s\)"):
        cb.check_deferred()


def test_a_callbacks_finite_and_range_checks_join_the_step():
    from lightning_reweight import AdaWAC
    from lightning_reweight.engine import GlobalBatch

    cb = AdaWAC(num_samples=8)
    batch = GlobalBatch(losses=torch.zeros(3), index=torch.arange(3))
    batch.checks = Checks(CUDA_LABEL, sync=True)
    cb.check_finite(batch, torch.tensor([1.0, float("inf"), 2.0]), cb._not_finite)
    assert len(batch.checks._pending) == 2  # its aminmax's two values, no comparison kernel
    with pytest.raises(ValueError, match=r"Expected a finite `consistency` loss"):
        batch.checks.flush()
    batch.checks = Checks(CUDA_LABEL, sync=True)
    cb.check_finite(batch, torch.tensor([1.0, -2.0]), cb._not_finite, minimum=0.0)
    with pytest.raises(ValueError, match=r"finite `consistency`"):
        batch.checks.flush()
    batch.checks = None  # a batch built outside the step: checked at once on the CPU
    with pytest.raises(ValueError, match=r"finite `consistency`"):
        cb.check_finite(batch, torch.tensor([float("nan")]), cb._not_finite)
