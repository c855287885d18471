"""ERM vs AdaWAC on ISBI 2012 (EM membranes) and PH2 (skin lesions) with label-sparse samples.

AdaWAC: "Adaptively Weighted Data Augmentation Consistency Regularization for Robust Optimization under
Concept Shift" (Dong, Xie, Ward, ICML 2023). Both methods train the same UNet on the same windows with the
same augmentation and loss ``0.5·Dice + 0.5·CE``; AdaWAC sees two views per sample and reweights
``CE`` against the feature-consistency loss per sample (η = 8, λ_AC = 2, the paper's UNet values). ERM
uses one view (the paper's ERM baseline), so AdaWAC costs two forward/backward passes per step.

Data (``lightning_reweight.data.segmentation``): native-resolution 64×64 windows; 40 % of the training
*and* test windows are label-sparse (no foreground at all — membrane-free cell interior in ISBI, lesion-free
skin in PH2; AdaWAC's Synapse protocol has 42 % all-background slices). ISBI: slices 0–19 train (160 dense
+ 107 sparse), 20–29 test (80 + 53). PH2: 150 train images (300 dense + 200 sparse), 50 test (100 + 67).
Reported: mean per-window Dice on the test split — overall, on label-dense and on label-sparse windows
(a sparse window scores 1 if nothing is predicted, else 0: AdaWAC's evaluation convention) — mean ± std
over seeds (model init + data order; the windows are fixed).

Scale-down for a shared CPU (the paper: UNet, 224×224, batch 24, SGD 0.01, 150 epochs on Synapse): smp UNet
with a timm ``resnet10t`` encoder (depth 4, decoder 32-16-16-8, 1.4 M parameters; φ = its last ResNet stage,
256×4×4), 64×64 inputs, batch 8, Adam 1e-3 (instead of SGD 0.01, for the short runs), ``--steps`` optimizer
steps per run (default 300: 9 epochs of ISBI, 5 of PH2), 1 thread. One uncontended thread: about 1 min per
ERM run and 2 min per AdaWAC run, ~20 min for the full 2 data sets × 2 methods × 3 seeds (3-4× longer on a
loaded machine). ``--quick``: 1 seed × 10 steps on PH2.

    python benchmarks/adawac.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--steps 300]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    fmt_pm,
    legend_outside,
    mean_std,
    parser,
    print_table,
    save_plot,
    setup_threads,
    write_json,
)  # noqa: E402

DATASETS = {"isbi2012": "ISBI2012DataModule", "ph2": "PH2DataModule"}


def run_one(dataset: str, method: str, seed: int, args) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_reweight.callbacks.adawac import AdaWAC
    from lightning_reweight.data import segmentation as seg
    from lightning_reweight.models.segmenter import SegmentationModule

    pl.seed_everything(seed, workers=True, verbose=False)
    dm_cls = getattr(seg, DATASETS[dataset])
    dm = dm_cls(root=args.root, crop_size=64, sparse_fraction=args.sparse_fraction, paired=method == "adawac",
                batch_size=args.batch_size, seed=0)
    model = SegmentationModule(encoder_name=args.encoder, encoder_depth=4, decoder_channels=[32, 16, 16, 8],
                               in_channels=dm_cls.in_channels, num_groups=len(dm_cls.group_names),
                               optimizer="adam", lr=args.lr, weight_decay=1e-4, consistency_weight=2.0)
    callbacks = [AdaWAC(eta=args.eta, log_every_n_steps=0)] if method == "adawac" else []
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, deterministic=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        train_s = time.perf_counter() - t0
        res = trainer.test(model, datamodule=dm, verbose=False)[0]
    row = {"dataset": dataset, "method": method, "seed": seed, "train_s": train_s,
           "dice": res["test/dice"], "dice_dense": res["test/dice_dense"],
           "dice_sparse": res.get("test/dice_sparse", float("nan"))}
    if method == "adawac":
        cb = callbacks[0]
        seen = cb.table["count"] > 0
        flags = cb.table["sparse"]
        beta = cb.table["beta_sup"]
        row["beta_sup_dense"] = float(beta[seen & (flags == 0)].mean())
        row["beta_sup_sparse"] = float(beta[seen & (flags == 1)].mean())
        row["betas"] = (beta[seen & (flags == 0)].tolist(), beta[seen & (flags == 1)].tolist())
    del torch
    return row


def plot(rows: list[dict], datasets: list[str], out: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5 * (len(datasets) + 1), 4))
    for ax, ds in zip(axes, datasets):
        for j, method in enumerate(("erm", "adawac")):
            sel = [r for r in rows if r["dataset"] == ds and r["method"] == method]
            stats = [mean_std([r[k] for r in sel]) for k in ("dice", "dice_dense", "dice_sparse")]
            ax.bar([i + 0.38 * j for i in range(3)], [100 * m for m, _ in stats], 0.38,
                   yerr=[100 * s for _, s in stats],
                   capsize=3, label=method.upper() if method == "erm" else "AdaWAC")
        ax.set_xticks([i + 0.19 for i in range(3)], ["all", "label-dense", "label-sparse"])
        ax.set_ylim(0, 100)
        ax.set_ylabel("test Dice (%)")
        ax.set_title(f"{ds}: test Dice, mean ± std over seeds")
        legend_outside(ax)
    ax = axes[-1]
    for ds in datasets:
        sel = [r for r in rows if r["dataset"] == ds and r["method"] == "adawac"]
        if not sel:
            continue
        dense, sparse = sel[0]["betas"]
        ax.hist(dense, bins=20, range=(0, 1), alpha=0.5, label=f"{ds} dense")
        ax.hist(sparse, bins=20, range=(0, 1), alpha=0.5, label=f"{ds} sparse")
    ax.set_xlabel("β_sup at the end of training (seed 0; weight, 0 to 1)")
    ax.set_ylabel("training windows (count)")
    ax.set_title("AdaWAC weight of the supervised loss")
    legend_outside(ax)
    fig.tight_layout()
    save_plot(fig, out, "adawac_dice", quick=quick)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--root", default="../shared/datasets")
    p.add_argument("--encoder", default="tu-resnet10t")
    p.add_argument("--eta", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sparse_fraction", type=float, default=0.4)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.datasets = 1, 10, ["ph2"]
    setup_threads(args.threads)

    rows = []
    for ds in args.datasets:
        for seed in range(args.seeds):
            for method in ("erm", "adawac"):
                row = run_one(ds, method, seed, args)
                rows.append(row)
                print(f"{ds:9s} {method:7s} seed {seed}: dice {row['dice']:.3f} dense {row['dice_dense']:.3f} "
                      f"sparse {row['dice_sparse']:.3f} ({row['train_s']:.0f} s)", flush=True)

    table, figures = [], {}
    for ds in args.datasets:
        for method in ("erm", "adawac"):
            sel = [r for r in rows if r["dataset"] == ds and r["method"] == method]
            entry = {"dataset": ds, "method": "ERM" if method == "erm" else "AdaWAC",
                     "Dice all (%)": fmt_pm([r["dice"] for r in sel]),
                     "Dice dense (%)": fmt_pm([r["dice_dense"] for r in sel]),
                     "Dice sparse (%)": fmt_pm([r["dice_sparse"] for r in sel]),
                     "β_sup dense/sparse": (f"{mean_std([r['beta_sup_dense'] for r in sel])[0]:.2f} / "
                                            f"{mean_std([r['beta_sup_sparse'] for r in sel])[0]:.2f}"
                                            if method == "adawac" else "-"),
                     "train s/run": f"{mean_std([r['train_s'] for r in sel])[0]:.0f}"}
            table.append(entry)
            for key, name in (("dice", "dice"), ("dice_dense", "dice_dense"), ("dice_sparse", "dice_sparse")):
                m, s = mean_std([r[key] for r in sel])
                figures[f"{name}_{method}_{ds}"] = m
                figures[f"{name}_{method}_{ds}_std"] = s
    for method in ("erm", "adawac"):
        for name in ("dice", "dice_dense", "dice_sparse"):
            figures[f"{name}_{method}"] = mean_std([figures[f"{name}_{method}_{ds}"] for ds in args.datasets])[0]
    title = (f"ERM vs AdaWAC, test Dice, {args.seeds} seed(s), {args.steps} steps, sparse fraction "
             f"{args.sparse_fraction:.0%} (headline figures = mean over {', '.join(args.datasets)})")
    text = print_table(table, title)
    plot(rows, args.datasets, args.out, args.quick)
    write_json(args.json, figures, table=table, text=text,
               rows=[{k: v for k, v in r.items() if k != "betas"} for r in rows],
               config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
