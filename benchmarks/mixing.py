"""Mixing language streams: temperature sampling, upweighting and Cooldown on a heavy-tailed multilingual corpus.

Setting of "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025),
scaled down to a shared CPU: a byte-level decoder LM (``CharTransformerLM``) trained on ten languages of the
chatterbot corpus (``MultilingualDataModule``: English 5 948 training windows of 32 bytes ... Thai 12), each
language its own stream, mixed by ``StreamMixing``:

* ``proportional``: τ = 1 (the natural mixture);
* ``temperature``: τ = 5 (temperature sampling, the paper's main setting);
* ``uniform``: τ = 100 (≈ uniform over languages);
* ``upweight``: the natural mixture, each language's loss weighed by p_k(5)/p_k(1) (the scalarised twin of τ = 5);
* ``cooldown``: τ = 5 for the first half of the run, then τ = 1 (one step switch, the paper's Cooldown).

Validation: each language's held-out tail (last 10 % of its bytes, at least 2 windows, at most
``--val-windows``), every ``--eval-every`` steps, in bits per byte. Groups: ``high`` = the 3 largest languages,
``low`` = the 3 smallest, ``mean`` = all 10 (each language counts once). Reported, mean ± std over seeds (seed =
model init and mixture draws): final bits per group, the step of the low group's best validation, the low
group's overfitting gap (final − best), steps to a low-group target (per seed, the worse of temperature's and
upweight's best low-group bits: both reach it), and the passes the 3 smallest languages made.
``mixing_resume_exact``: a Cooldown run stopped at 40 % and resumed from its checkpoint ends with exactly the
parameters and mixture state of the uninterrupted run (1) or not (0).

Model: 2 layers, d_model 48, 4 heads, seq_len 32, batch 16, AdamW 3e-3 with a 5 % linear warm-up;
``--steps`` (default 1000: 16 000 sequences; the 3 smallest languages make ~1.5 passes at τ = 1 and ~60 at
τ = 5); 15 runs take about 10 minutes on one free core.
``--quick``: 1 seed, 30 steps.

    python benchmarks/mixing.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--steps 1000]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
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
)

METHODS = {
    "proportional": dict(mode="upsample", tau=1.0),
    "temperature": dict(mode="upsample", tau=5.0),
    "uniform": dict(mode="upsample", tau=100.0),
    "upweight": dict(mode="upweight", tau=5.0),
    "cooldown": dict(mode="upsample", schedule="cooldown", tau_start=5.0, tau_end=1.0, switch_fraction=0.5),
}


def _objects(method: str, seed: int, args, **trainer_kw):
    import lightning.pytorch as pl
    import torch

    from lightning_reweight.callbacks import StreamMixing
    from lightning_reweight.data.multilingual import MultilingualDataModule
    from lightning_reweight.models.lm import CharTransformerLM

    pl.seed_everything(seed, verbose=False)
    torch.manual_seed(seed)
    dm = MultilingualDataModule(root=args.root, languages=args.languages, seq_len=args.seq_len,
                                batch_size=args.batch_size, val_batch_size=256, max_val_windows=args.val_windows,
                                seed=seed)
    model = CharTransformerLM(d_model=args.d_model, n_layers=2, n_heads=4, max_len=args.seq_len, lr=args.lr,
                              warmup_steps=max(1, args.steps // 20))
    mix = StreamMixing(**METHODS[method], log_every_n_steps=0)
    return dm, model, mix


class Curves:
    """Per-language validation bits at every evaluation."""

    def __init__(self):
        import lightning.pytorch as pl

        class _CB(pl.Callback):
            def __init__(cb):
                cb.evals: list[tuple[int, dict[str, float]]] = []

            def on_validation_end(cb, trainer, pl_module):
                if trainer.sanity_checking:
                    return
                m = trainer.callback_metrics
                cb.evals.append((trainer.global_step, {k[len("val/bpc/"):]: float(v) for k, v in m.items()
                                                       if k.startswith("val/bpc/")}))

        self.callback = _CB()


def run_one(method: str, seed: int, args) -> dict:
    import lightning.pytorch as pl

    dm, model, mix = _objects(method, seed, args)
    curves = Curves()
    trainer = pl.Trainer(max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=args.eval_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                         callbacks=[mix, curves.callback])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        if not curves.callback.evals or curves.callback.evals[-1][0] != trainer.global_step:
            trainer.validate(model, datamodule=dm, verbose=False)
            curves.callback.evals.append((trainer.global_step, {
                k[len("val/bpc/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpc/")}))
    mixture = dm.mixture
    return {"method": method, "seed": seed, "evals": curves.callback.evals, "sizes": mixture.sizes.tolist(),
            "names": list(mixture.names), "passes": mixture.passes.tolist(), "seconds": time.perf_counter() - t0}


def resume_exact(args) -> int:
    """A Cooldown run stopped at 40 % and resumed from its checkpoint equals the uninterrupted run (1) or not (0)."""
    import lightning.pytorch as pl
    import torch

    steps = max(10, min(args.steps, 60))

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= int(0.4 * steps):
                trainer.should_stop = True

    def fit(callbacks_extra, ckpt=None):
        dm, model, mix = _objects("cooldown", 0, args)
        trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, callbacks=[mix, *callbacks_extra])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, model, dm

    _, full_model, full_dm = fit([])
    with tempfile.TemporaryDirectory() as tmp:
        part, _, _ = fit([Stop()])
        part.save_checkpoint(f"{tmp}/part.ckpt")
        _, res_model, res_dm = fit([], ckpt=f"{tmp}/part.ckpt")
    same_params = all(torch.equal(a, b) for a, b in zip(full_model.parameters(), res_model.parameters()))
    same_state = (full_dm.mixture.position == res_dm.mixture.position
                  and torch.equal(full_dm.mixture.counts, res_dm.mixture.counts))
    return int(same_params and same_state)


def group_curve(run: dict, langs: list[str]) -> list[float]:
    return [statistics.fmean(e[1][lang] for lang in langs) for e in run["evals"]]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--val-windows", type=int, default=24, help="at most this many validation windows per language")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--root", type=str, default=None, help="corpus folder (default ../shared/datasets/chatterbot_multilingual)")
    p.add_argument("--languages", nargs="+", default=None, help="languages, largest first (default: ten across the tail)")
    args = p.parse_args()
    setup_threads(args.threads)
    if args.quick:
        args.seeds, args.steps = 1, 30
    args.eval_every = args.eval_every or max(1, args.steps // 15)
    from lightning_reweight.data.multilingual import DEFAULT_LANGUAGES

    args.languages = list(args.languages or DEFAULT_LANGUAGES)

    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for method in METHODS:
            run = run_one(method, seed, args)
            runs.append(run)
            last = run["evals"][-1][1]
            print(f"[{time.perf_counter() - t0:6.0f}s] {method:12s} seed {seed}: mean val bits "
                  f"{statistics.fmean(last.values()):.3f} ({run['seconds']:.0f} s)", flush=True)

    names, sizes = runs[0]["names"], runs[0]["sizes"]
    order = sorted(range(len(names)), key=lambda k: -sizes[k])
    high, low = [names[k] for k in order[:3]], [names[k] for k in order[-3:]]
    figures: dict[str, float] = {}
    table = []
    per_seed: dict[tuple[str, int], dict] = {}
    for run in runs:
        steps = [e[0] for e in run["evals"]]
        lowc, highc, meanc = group_curve(run, low), group_curve(run, high), group_curve(run, names)
        best = min(range(len(lowc)), key=lambda i: lowc[i])
        per_seed[(run["method"], run["seed"])] = {
            "steps": steps, "low": lowc, "high": highc, "mean": meanc, "best_step_low": steps[best],
            "best_low": lowc[best], "gap_low": lowc[-1] - lowc[best],
            "passes_low": statistics.fmean(run["passes"][names.index(lang)] for lang in low)}
    # a low-group target both twins reach, per seed: the worse of temperature's and upweight's best
    for method in METHODS:
        rs = [per_seed[(method, s)] for s in range(args.seeds)]
        row = {"method": method}
        for group in ("high", "low", "mean"):
            m, s = mean_std([r[group][-1] for r in rs])
            figures[f"val_bits_{group}_{method}"], figures[f"val_bits_{group}_{method}_std"] = m, s
            row[f"{group} (final)"] = f"{m:.3f} ± {s:.3f}"
        for key, label, fmt in (("best_low", "low (best)", "{:.3f}"), ("best_step_low", "best step low", "{:.0f}"),
                                ("gap_low", "low overfit gap", "{:.3f}"), ("passes_low", "passes low", "{:.1f}")):
            m, s = mean_std([r[key] for r in rs])
            name = {"best_low": "best_val_bits_low", "best_step_low": "best_step_low", "gap_low": "overfit_gap_low",
                    "passes_low": "passes_low"}[key]
            figures[f"{name}_{method}"], figures[f"{name}_{method}_std"] = m, s
            row[label] = (fmt + " ± " + fmt).format(m, s)
        reach = []
        for seed, r in enumerate(rs):
            target = max(per_seed[("temperature", seed)]["best_low"], per_seed[("upweight", seed)]["best_low"]) + 1e-9
            hit = [st for st, v in zip(r["steps"], r["low"]) if v <= target]
            reach.append(float(hit[0]) if hit else float("nan"))
        ok = [x for x in reach if x == x]
        m, s = mean_std(ok) if ok else (float("nan"), float("nan"))
        figures[f"steps_to_target_low_{method}"], figures[f"steps_to_target_low_{method}_std"] = m, s
        row["steps to low target"] = f"{m:.0f} ± {s:.0f} ({len(ok)}/{len(reach)})"
        table.append(row)
    # paired by seed (same init and draw seed): cooldown minus the best of τ=1 and τ=5 at the end
    for group in ("high", "low"):
        diffs = [per_seed[("cooldown", s)][group][-1] - min(per_seed[("proportional", s)][group][-1],
                                                            per_seed[("temperature", s)][group][-1])
                 for s in range(args.seeds)]
        figures[f"cooldown_minus_best_{group}"], figures[f"cooldown_minus_best_{group}_std"] = mean_std(diffs)
    figures["mixing_resume_exact"] = float(resume_exact(args))
    text = print_table(table, title=f"byte LM on {len(names)} languages, {args.steps} steps x {args.batch_size}, "
                                    f"{args.seeds} seed(s): validation bits per byte, mean ± std over seeds "
                                    f"(high = {', '.join(high)}; low = {', '.join(low)})")
    print(f"cooldown − min(proportional, temperature), final, paired by seed: high "
          f"{figures['cooldown_minus_best_high']:+.3f} ± {figures['cooldown_minus_best_high_std']:.3f}, low "
          f"{figures['cooldown_minus_best_low']:+.3f} ± {figures['cooldown_minus_best_low_std']:.3f}")
    print(f"mixing_resume_exact: {int(figures['mixing_resume_exact'])}; total {time.perf_counter() - t0:.0f} s")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, group, title in zip(axes, ("low", "high", "mean"),
                                    (f"3 smallest languages\n({', '.join(low)})", f"3 largest languages\n({', '.join(high)})",
                                     f"all {len(names)} languages\n(each counted once)")):
            for method in METHODS:
                rs = [per_seed[(method, s)] for s in range(args.seeds)]
                steps = rs[0]["steps"]
                curve = [statistics.fmean(r[group][i] for r in rs) for i in range(len(steps))]
                ax.plot(steps, curve, label=method, marker="o", ms=2)
            ax.set_title(f"validation bits, {title}", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("bits per byte (mean over languages and seeds)")
            ax.grid(alpha=0.3)
        legend_outside(axes[-1])
        fig.suptitle("Mixing language streams: temperature sampling vs upweighting vs Cooldown", y=1.04)
        save_plot(fig, args.out, "mixing", quick=args.quick)
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
    write_json(args.json, figures, table=table, text=text, high=high, low=low, sizes=dict(zip(names, sizes)),
               runs=runs, args={k: str(v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
