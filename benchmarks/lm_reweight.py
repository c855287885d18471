"""Loss-based sequence reweighting for a small character-level LM on Tiny Shakespeare, streamed.

Rules: LinUpper, Quadratic and Extremes from "Dynamic Loss-Based Sample Reweighting for Improved LLM
Pretraining" (δ = 1, r = 0.4, the paper's defaults; its 1000 uniform warm-up steps scaled to 10 % of this
run), against uniform weights (the plain mean, no callback). Every run streams the same character windows
(``CharStreamDataModule``: an ``IterableDataset`` with no index; the rules run index-free with
``LossReweighting(track_samples=False)``) into the same decoder-only transformer (``CharTransformerLM``).

Settings: (a) clean training text; (b) 20 % of the training windows replaced by uniform random characters
of the text's alphabet (fixed per window; inputs and targets). Validation is always the clean held-out 10 %
(the first ``--val-windows`` windows).

Reported, mean ± std over seeds (model init + data order): final clean validation bits per character and its
difference to the uniform run of the same seed (paired: same init, same data order); steps
and seconds until validation bpc first reaches the target (1.02 × uniform's final mean bpc in that setting;
"-" when a seed never reaches it); the median step time (on_train_batch_start -> end) and its ratio to
uniform's (from the runs above: noisy on a shared machine). ``overhead_ratio_lm`` comes from a separate
measurement: ``--timing-reps`` rounds of short clean runs of the four rules back to back; each reweighted
run's median step time over the same round's uniform run; the median of these ratios.

Scale-down for a shared CPU: 2 layers, d_model 64, 4 heads, seq_len 64, batch 16, AdamW 1e-2 (linear
learning-rate warm-up over the first 10 % of steps), ``--steps`` steps (default 500: half an epoch of the
15 685 training windows), 1 thread: 24 runs in about 10 minutes on one free core.
``--quick``: 1 seed, 20 steps, both settings, 2 timing rounds.

    python benchmarks/lm_reweight.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--steps 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    legend_outside,
    mean_std,
    parser,
    print_table,
    save_plot,
    setup_threads,
    write_json,
)  # noqa: E402

RULES = ["uniform", "linupper", "quadratic", "extremes"]
SETTINGS = {"clean": 0.0, "noisy": 0.2}


def run_one(rule: str, noise: float, seed: int, args, validate: bool = True) -> dict:
    import lightning.pytorch as pl

    from lightning_reweight.callbacks import LossReweighting
    from lightning_reweight.data.text import CharStreamDataModule
    from lightning_reweight.models.lm import CharTransformerLM

    class Timer(pl.Callback):
        def __init__(self):
            self.times: list[float] = []
            self.evals: list[tuple[int, float, float]] = []  # (step, train seconds so far, val bpc)
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.evals.append((trainer.global_step, sum(self.times), float(trainer.callback_metrics["val/bpc"])))

    pl.seed_everything(seed, verbose=False)
    dm = CharStreamDataModule(path=args.path, seq_len=64, batch_size=args.batch_size, val_batch_size=128, seed=seed,
                              noise_frac=noise, noise_seed=1234, max_val_windows=args.val_windows)
    model = CharTransformerLM(d_model=args.d_model, n_layers=2, n_heads=4, max_len=64, lr=args.lr,
                              warmup_steps=max(1, args.steps // 10))
    timer = Timer()
    callbacks: list = [timer]
    if rule != "uniform":
        callbacks.append(LossReweighting(rule, r=0.4, delta=1.0, warmup_steps=max(1, args.steps // 10),
                                         track_samples=False, log_every_n_steps=0))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=args.eval_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         limit_val_batches=1.0 if validate else 0,
                         callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        if validate and (not timer.evals or timer.evals[-1][0] != trainer.global_step):
            trainer.validate(model, datamodule=dm, verbose=False)
            timer.evals.append((trainer.global_step, sum(timer.times), float(trainer.callback_metrics["val/bpc"])))
    bpc = timer.evals[-1][2] if timer.evals else float("nan")
    return {"rule": rule, "setting": "noisy" if noise else "clean", "seed": seed, "bpc": bpc,
            "evals": timer.evals, "step_s": statistics.median(timer.times[5:] or timer.times)}


def time_to(evals: list, target: float) -> tuple[float, float]:
    for step, secs, bpc in evals:
        if bpc <= target:
            return float(step), secs
    return float("nan"), float("nan")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--timing-reps", type=int, default=5, help="interleaved rounds of the overhead measurement")
    p.add_argument("--timing-steps", type=int, default=40, help="steps per overhead-measurement run")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--path", type=str, default=None, help="text file (default ../shared/.../input.txt)")
    args = p.parse_args()
    setup_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.val_windows, args.timing_reps, args.timing_steps = 1, 20, 128, 2, 12
    args.eval_every = args.eval_every or max(1, args.steps // 10)

    rows = []
    t0 = time.perf_counter()
    for setting, noise in SETTINGS.items():
        for seed in range(args.seeds):
            for rule in RULES:
                row = run_one(rule, noise, seed, args)
                rows.append(row)
                print(f"[{time.perf_counter() - t0:6.0f}s] {setting:5s} {rule:9s} seed {seed}: "
                      f"val bpc {row['bpc']:.3f}, step {row['step_s'] * 1e3:.1f} ms", flush=True)

    figures: dict[str, float] = {}
    table = []
    uniform_step = statistics.median([r["step_s"] for r in rows if r["rule"] == "uniform"])
    for setting in SETTINGS:
        base = mean_std([r["bpc"] for r in rows if r["setting"] == setting and r["rule"] == "uniform"])[0]
        target = 1.02 * base
        for rule in RULES:
            rs = [r for r in rows if r["setting"] == setting and r["rule"] == rule]
            m, s = mean_std([r["bpc"] for r in rs])
            tt = [time_to(r["evals"], target) for r in rs]
            reached = [t for t in tt if t[0] == t[0]]
            steps_m = mean_std([t[0] for t in reached])[0] if reached else float("nan")
            secs_m = mean_std([t[1] for t in reached])[0] if reached else float("nan")
            step_s = statistics.median([r["step_s"] for r in rs])
            key = f"val_bpc_{rule}" if setting == "clean" else f"val_bpc_noisy_{rule}"
            figures[key] = m
            figures[key + "_std"] = s
            # paired by seed (same init and data order as the uniform run): the rule's effect without seed noise
            uni = {r["seed"]: r["bpc"] for r in rows if r["setting"] == setting and r["rule"] == "uniform"}
            dm, ds = mean_std([r["bpc"] - uni[r["seed"]] for r in rs])
            figures[key.replace("val_bpc_", "delta_bpc_")] = dm
            table.append({"setting": setting, "rule": rule, "val bpc": f"{m:.3f} ± {s:.3f}",
                          "Δ vs uniform (paired)": f"{dm:+.3f} ± {ds:.3f}",
                          "target": f"{target:.3f}", "reached": f"{len(reached)}/{len(rs)}",
                          "steps to target": "-" if steps_m != steps_m else f"{steps_m:.0f}",
                          "s to target": "-" if secs_m != secs_m else f"{secs_m:.1f}",
                          "step ms": f"{step_s * 1e3:.1f}", "step / uniform": f"{step_s / uniform_step:.3f}"})
    # overhead: short runs of the four rules interleaved round by round, each against the same round's uniform
    # run, so load drifts on a shared machine hit both sides of every ratio alike
    ratios = []
    timing = argparse.Namespace(**{**vars(args), "steps": args.timing_steps, "eval_every": 10**9})
    for rep in range(args.timing_reps):
        times = {rule: run_one(rule, 0.0, 100 + rep, timing, validate=False)["step_s"] for rule in RULES}
        ratios += [times[rule] / times["uniform"] for rule in RULES[1:]]
    figures["overhead_ratio_lm"] = statistics.median(ratios)
    print_table(table, title=f"char LM on Tiny Shakespeare, {args.steps} steps, {args.seeds} seed(s) "
                             f"(val bpc on clean held-out text, mean ± std)")
    print(f"overhead_ratio_lm (median over interleaved rounds of reweighted / uniform step time): {figures['overhead_ratio_lm']:.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, setting in zip(axes, SETTINGS):
            for rule in RULES:
                rs = [r for r in rows if r["setting"] == setting and r["rule"] == rule]
                steps = [e[0] for e in rs[0]["evals"]]
                curves = [[e[2] for e in r["evals"]] for r in rs if len(r["evals"]) == len(steps)]
                mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
                ax.plot(steps, mean, label=rule, marker="o", ms=3)
            ax.set_title(f"{setting} training ({int(SETTINGS[setting] * 100)} % noise sequences)")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("clean validation loss (bits per character)")
        legend_outside(axes[1])
        fig.suptitle("Character LM: validation bits per character by weighting rule (mean over seeds)")
        fig.tight_layout()
        save_plot(fig, args.out, "lm_reweight", quick=args.quick)
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
    write_json(args.json, figures, table=table, runs=[{k: v for k, v in r.items()} for r in rows],
               args={k: str(v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
