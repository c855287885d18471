"""Per-step cost of ``reduce_loss`` with each weighting callback alone, at growing batch sizes (CPU).

For every callback and batch size, one short ``Trainer.fit`` of a linear model on synthetic grouped data
(``IndexedDataset`` with 4 groups): the training step times only the ``reduce_loss`` call (validation,
the global batch, every callback hook, the weighted sum), not the model. Each fit's figure is the median over
the steps after warm-up; all configurations run in one process, swept ``--rounds`` times (default 3,
``--quick`` 1) so a busy stretch of a shared machine hits every configuration alike, and the figure is the
median of the rounds (the table shows their spread at batch 1024; JSON ``rounds_ms`` holds each).

    python benchmarks/callback_cost.py [--quick] [--json PATH] [--threads 1] [--rounds 3] [--only NAME,NAME]

JSON figures: ``reduce_loss_ms_<callback>_<batch>`` for ``<callback>`` in ``none`` (no weighting callback:
the plain mean), ``loss_reweighting_linupper``, ``loss_reweighting_kl_dro_ema``, ``group_dro``,
``fair_error_bound_scaling``, ``group_balancing_upweight``, ``importance_sampling``, ``adawac``
(``loss_reweighting_linupper_no_table``: the same without the per-sample table, to show its share;
``null_callback``: a ``WeightingCallback`` with no opinion and no table, the floor of the contract path any
callback pays), and
``<batch>`` in 64, 1024, 8192 (``--quick``: 64 and 1024). Target: under 0.5 ms at batch 1024.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import legend_outside, parser, print_table, save_plot, setup_threads, write_json  # noqa: E402

BUDGET_MS = 0.5


def _callbacks():
    from lightning_reweight.callbacks import (
        AdaWAC,
        FairErrorBoundScaling,
        GroupBalancing,
        GroupDRO,
        ImportanceSampling,
        LossReweighting,
        WeightingCallback,
    )

    return {
        "none": lambda: None,
        "null_callback": lambda: WeightingCallback(track_samples=False, log_every_n_steps=0),
        "loss_reweighting_linupper": lambda: LossReweighting("linupper", warmup_steps=0),
        "loss_reweighting_linupper_no_table": lambda: LossReweighting("linupper", warmup_steps=0,
                                                                      track_samples=False),
        "loss_reweighting_kl_dro_ema": lambda: LossReweighting("kl_dro", normalizer="ema"),
        "group_dro": lambda: GroupDRO(),
        "fair_error_bound_scaling": lambda: FairErrorBoundScaling(),
        "group_balancing_upweight": lambda: GroupBalancing(mode="upweight"),
        "importance_sampling": lambda: ImportanceSampling(score="loss"),
        "adawac": lambda: AdaWAC(eta=2.0),
    }


def measure(name: str, factory, batch: int, steps: int, warm: int) -> list[float]:
    """Seconds per ``reduce_loss`` call for ``steps`` steps after ``warm`` warm-up steps."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import IndexedDataset, reduce_loss

    n = batch * 8
    g = torch.Generator().manual_seed(0)
    data = IndexedDataset(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)),
                          groups=torch.arange(n) % 4)
    times: list[float] = []

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 3)

        def training_step(self, b, batch_idx):
            x, y, index, group = b
            logits = self.net(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            extras = {"consistency": (logits - logits.roll(1, 0)).pow(2).mean(1)} if name == "adawac" else {}
            t0 = time.perf_counter()
            loss = reduce_loss(self, losses, index, group=group, **extras)
            times.append(time.perf_counter() - t0)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb = factory()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + warm, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[] if cb is None else [cb], use_distributed_sampler=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(Tiny(), DataLoader(data, batch_size=batch, shuffle=True))
    return times[warm:]


def _quiet() -> None:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its loggers exist only after the import)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=3,
                   help="sweeps over every configuration, interleaved; the figure is the median of the rounds' "
                        "medians (--quick: 1)")
    p.add_argument("--only", default=None,
                   help="comma-separated callback names to run (default: all), e.g. importance_sampling,none")
    args = p.parse_args()
    callbacks = _callbacks()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in callbacks]
        if unknown:
            p.error(f"unknown callback(s) {unknown}; choose from {sorted(callbacks)}")
        callbacks = {n: callbacks[n] for n in names}
    setup_threads(args.threads)
    _quiet()
    batches = [64, 1024] if args.quick else [64, 1024, 8192]
    steps, warm = (15, 3) if args.quick else (args.steps, 5)

    figures: dict[str, float] = {}
    rows = []
    start = time.perf_counter()
    rounds = 1 if args.quick else max(1, args.rounds)
    per_round: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):  # every configuration once per round: a busy stretch hits all of them alike
        for name, factory in callbacks.items():
            for batch in batches:
                per_round.setdefault((name, batch), []).append(
                    statistics.median(measure(name, factory, batch, steps, warm)) * 1e3)
            print(f"[{time.perf_counter() - start:6.1f}s] round {r + 1}/{rounds}: {name} done", flush=True)
    for name in callbacks:
        row = {"callback": name}
        for batch in batches:
            ms = statistics.median(per_round[(name, batch)])
            figures[f"reduce_loss_ms_{name}_{batch}"] = ms
            row[f"ms @ {batch}"] = f"{ms:.3f}"
        at = per_round[(name, 1024)]
        if rounds > 1:
            row["rounds @ 1024 (min-max)"] = f"{min(at):.3f}-{max(at):.3f}"
        row["< 0.5 ms @ 1024"] = "yes" if figures[f"reduce_loss_ms_{name}_1024"] < BUDGET_MS else "NO"
        rows.append(row)
    print_table(rows, f"reduce_loss per call (median over {rounds} round(s) of the median of {steps} steps, CPU, "
                      f"{args.threads} thread(s))")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(batches)
        names = list(callbacks)
        for k, batch in enumerate(batches):
            ax.bar([i + k * width for i in range(len(names))],
                   [figures[f"reduce_loss_ms_{n}_{batch}"] for n in names], width, label=f"batch {batch}")
        ax.axhline(BUDGET_MS, color="k", linestyle="--", linewidth=0.8, label="0.5 ms budget")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))], names, rotation=35,
                      ha="right", fontsize=7)
        ax.set_ylabel("reduce_loss time per step (ms, log scale)")
        ax.set_yscale("log")
        ax.set_title("Per-step cost of reduce_loss with each callback (CPU, one thread, median)")
        legend_outside(ax)
        save_plot(fig, args.out, "callback_cost", quick=args.quick)
    except ImportError:
        print("matplotlib not installed: no plot")

    write_json(args.json, figures, table=rows, args=vars(args),
               rounds_ms={f"{n}_{b}": v for (n, b), v in per_round.items()})


if __name__ == "__main__":
    main()
