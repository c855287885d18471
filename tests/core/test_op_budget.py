"""The op budget of one device step: on a GPU a weighting step is launch-bound, so the number of tensor ops
(kernel launches) it issues is its cost. Counted on the ``meta`` device (``benchmarks/op_count.py``: every ATen
op but views and ``detach``; the engine's host read answered "valid"), for every built-in weighting callback,
with the checks read each step (``sync_checks=True``) and deferred (``False``)."""

from __future__ import annotations

import inspect

import pytest

import lightning_reweight.callbacks as callbacks
from benchmarks.op_count import BUDGETS, DEFAULT_BUDGET, budget, configs, count_step
from lightning_reweight.callbacks.base import WeightingCallback


def _breakdown(ops) -> str:
    return "\n".join(f"    {k:3d}  {op}" for op, k in ops.most_common())


@pytest.mark.parametrize("sync_checks", [True, False], ids=["sync_checks", "deferred_checks"])
@pytest.mark.parametrize("name", sorted(configs()))
def test_one_device_step_stays_within_its_op_budget(name, sync_checks):
    ops = count_step(name, sync_checks, batch=256)
    total = sum(ops.values())
    assert total <= budget(name), (
        f"{name} (sync_checks={sync_checks}) issues {total} tensor ops per step on a device, over its budget of "
        f"{budget(name)}. By op:\n{_breakdown(ops)}"
    )


def test_the_budgets_cover_every_built_in_weighting_callback():
    built_in = {cls for _, cls in inspect.getmembers(callbacks, inspect.isclass)
                if issubclass(cls, WeightingCallback) and cls.device_ready and cls is not WeightingCallback}
    counted = {type(make(True)) for make in configs().values()}
    assert built_in <= counted, f"no op count for {sorted(c.__name__ for c in built_in - counted)}"
    assert BUDGETS == {"linupper": 40} and DEFAULT_BUDGET == 55


def test_the_count_does_not_grow_with_the_batch():
    """Fixed shapes: a step of 64 rows and one of 1024 issue the same ops (no per-sample or per-group loop)."""
    for name in ("linupper", "adawac"):
        assert count_step(name, False, batch=64) == count_step(name, False, batch=1024)
