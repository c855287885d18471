"""Tensor ops (kernel launches on a GPU) of one weighting step per built-in callback, counted on ``meta``.

On a GPU a weighting step is launch-bound: its tensors are small (one value per sample), so its cost is the
number of kernels it issues, not their work. This counts them without a GPU: the step runs on the ``meta``
device (shapes only) under a ``TorchDispatchMode`` that counts every ATen op except views and ``detach``
(which launch nothing). The engine's one host read per phase is answered "valid" (a meta tensor holds no
value); the ops that pack the values for it are counted.

    python benchmarks/op_count.py [--quick] [--json PATH] [--batch 256] [--only NAME,NAME] [--ops]

Prints one row per callback: the ops of one step with ``sync_checks=True`` (the default: the checks read in one
transfer per phase) and ``False`` (deferred: no host read), and the budget the test holds
(``tests/core/test_op_budget.py``). JSON figures: ``ops_<callback>_sync`` and ``ops_<callback>_nosync``.
``--ops`` also prints each count by op. ``--quick`` is the same (the count takes seconds).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, print_table, setup_threads, write_json  # noqa: E402

#: the most ops one step may issue (``tests/core/test_op_budget.py`` holds them); every other callback: DEFAULT
BUDGETS = {"linupper": 40}
DEFAULT_BUDGET = 55
NUM_SAMPLES, GROUPS = 1024, 4


def configs() -> dict[str, Callable[[bool], Any]]:
    """Every built-in weighting callback in the configuration the count uses, by name (``sync_checks`` given)."""
    from lightning_reweight import (
        AdaWAC,
        FairErrorBoundScaling,
        GroupBalancing,
        GroupDRO,
        ImportanceSampling,
        LossReweighting,
    )

    n = NUM_SAMPLES
    return {
        "linupper": lambda s: LossReweighting("linupper", warmup_steps=0, num_samples=n, sync_checks=s, log_every_n_steps=0),
        "quadratic": lambda s: LossReweighting("quadratic", warmup_steps=0, num_samples=n, sync_checks=s, log_every_n_steps=0),
        "extremes": lambda s: LossReweighting("extremes", warmup_steps=0, num_samples=n, sync_checks=s, log_every_n_steps=0),
        "kl_dro_batch": lambda s: LossReweighting("kl_dro", num_samples=n, sync_checks=s, log_every_n_steps=0),
        "kl_dro_ema": lambda s: LossReweighting("kl_dro", normalizer="ema", num_samples=n, sync_checks=s, log_every_n_steps=0),
        "group_dro": lambda s: GroupDRO(num_groups=GROUPS, sync_checks=s, log_every_n_steps=0),
        "febs": lambda s: FairErrorBoundScaling(num_groups=GROUPS, sync_checks=s, log_every_n_steps=0),
        "group_balancing_upweight": lambda s: GroupBalancing(mode="upweight", tau=1e9, sync_checks=s, log_every_n_steps=0),
        "importance_sampling": lambda s: ImportanceSampling(score="loss", sync_checks=s, log_every_n_steps=0),
        "adawac": lambda s: AdaWAC(num_samples=n, sync_checks=s, log_every_n_steps=0),
    }


def _counter() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not func.is_view and func.__name__ not in ("detach.default", "detach"):
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    return CountOps()


def count_step(name: str, sync: bool, batch: int = 256, steps: int = 2) -> collections.Counter[str]:
    """The ops of one step of callback ``name`` (``configs()``) on ``meta`` with batch ``batch``, after
    ``steps`` warm steps (tables allocated, state on the device). Indices do not repeat."""
    import torch

    import lightning_reweight.engine as engine
    from lightning_reweight import GroupBalancing, ImportanceSampling
    from lightning_reweight.doors.loop import LoopContext

    meta = torch.device("meta")
    cb = configs()[name](sync)
    if isinstance(cb, GroupBalancing):  # what fit reads from the data set before the first step
        groups = torch.arange(NUM_SAMPLES) % GROUPS
        cb.groups, cb.counts = groups, torch.bincount(groups, minlength=GROUPS)
    if isinstance(cb, ImportanceSampling):
        cb.num_samples = NUM_SAMPLES
    model = torch.nn.Linear(4, 1).to(meta)
    ctx = LoopContext([cb], module=model)

    def step(losses: Any) -> None:  # the engine's step, as every door runs it (no logging: log_every_n_steps=0)
        engine.run_step([cb], ctx, model, losses, index, group=group, target=group, extras=extras)

    index = torch.arange(batch, device=meta)
    group = index % GROUPS
    extras = {"consistency": torch.empty(batch, device=meta)} if name == "adawac" else {}
    read = engine._read
    engine._read = lambda packed, layout: [True] * len(layout)  # "valid"
    try:
        for _ in range(steps):
            step(torch.empty(batch, device=meta, requires_grad=True))
        counter = _counter()
        losses = torch.empty(batch, device=meta, requires_grad=True)
        with counter:
            step(losses)
    finally:
        engine._read = read
    return counter.ops


def budget(name: str) -> int:
    return BUDGETS.get(name, DEFAULT_BUDGET)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--only", type=str, default="", help="comma-separated callback names")
    p.add_argument("--ops", action="store_true", help="print each count by op")
    args = p.parse_args()
    setup_threads(args.threads)
    names = [n for n in configs() if not args.only or n in args.only.split(",")]
    figures: dict[str, float] = {}
    rows = []
    for name in names:
        counts = {}
        for sync in (True, False):
            ops = count_step(name, sync, args.batch)
            counts[sync] = sum(ops.values())
            figures[f"ops_{name}_{'sync' if sync else 'nosync'}"] = float(counts[sync])
            if args.ops:
                print(f"{name} sync_checks={sync}: {counts[sync]} ops")
                for op, k in ops.most_common():
                    print(f"    {k:3d}  {op}")
        rows.append({"callback": name, "ops sync_checks=True": counts[True], "ops sync_checks=False": counts[False],
                     "budget": budget(name)})
    print_table(rows, title=f"ops of one weighting step, batch {args.batch} (meta device: every op but views)")
    write_json(args.json, figures, table=rows, batch=args.batch, device="meta")


if __name__ == "__main__":
    main()
