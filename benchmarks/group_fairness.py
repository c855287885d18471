"""Group fairness: ERM vs GroupDRO vs FEBS on UCI Adult (sex, race), and ERM vs FEBS-Dice on PH2.

* GroupDRO: "Distributionally Robust Neural Networks for Group Shifts" (Sagawa et al., ICLR 2020), η = 0.01,
  C = 0 (official defaults), natural (not group-balanced) sampling.
* FEBS: "FairSeg: A Large-Scale Medical Image Segmentation Dataset for Fairness Learning Using Segment Anything
  Model with Fair Error-Bound Scaling" (Tian et al., ICLR 2024), γ = 1, per-batch error bounds. On Adult it
  runs as our classification generalisation (loss multipliers ∝ 1/w_g); on PH2 as the paper's FEBS-Dice.

Adult: the MLP ``TabularClassifier`` (64-64, dropout 0.1, AdamW 1e-3, batch 256) trained ``--epochs``
epochs on the 29,305 training rows (10 % of ``adult.data`` held out, unused), evaluated on the 16,281 rows of
``adult.test`` after the last epoch (no model selection). Reported: overall accuracy, worst-group accuracy,
equity-scaled accuracy ``acc / (1 + Σ_g |acc − acc_g|)`` and ES-AUROC, mean ± std over seeds (model init and
data order; the split is fixed).

PH2 (``clinical_diagnosis`` groups: common nevus, atypical nevus, melanoma): UNet with a timm
``mobilenetv3_small_050`` encoder (depth 4) on 64×64 lesion windows (no lesion-free windows), loss
``0.5·CE + 0.5·Dice`` with Dice = plain soft Dice (ERM) or FEBS-Dice, Adam 1e-3, ``--ph2-steps`` steps,
batch 16. Reported on the 100 test windows: mean per-window Dice, worst-group Dice, ES-Dice and ES-IoU.

Scale-down for a shared CPU (the papers: ResNet-50 / SAM / TransUNet for hours on GPUs): 5 epochs of a small
MLP on Adult (~575 steps), 120 steps (~6 epochs) of a ~0.3 M-parameter UNet on PH2, 3 seeds, 1 thread; the
full run costs about 10 CPU-minutes (Adult ~16 s and PH2 ~60 s per run). ``--quick``: 1 seed, 1 epoch on
4,000 Adult rows (sex only), 10 PH2 steps.

    python benchmarks/group_fairness.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--epochs 5]
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

ADULT_METHODS = ("erm", "groupdro", "febs")
PH2_METHODS = ("erm", "febs")
HEADLINE_GROUPING = "sex"


def _quiet_trainer(**kw):
    import logging

    import lightning.pytorch as pl

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def run_adult(dm, method: str, seed: int, args) -> dict:
    import lightning.pytorch as pl

    from lightning_reweight.callbacks.febs import FairErrorBoundScaling
    from lightning_reweight.callbacks.group_dro import GroupDRO
    from lightning_reweight.models.tabular import TabularClassifier

    pl.seed_everything(seed, verbose=False)
    callbacks = {"erm": [], "groupdro": [GroupDRO(step_size=0.01, log_every_n_steps=0)],
                 "febs": [FairErrorBoundScaling(gamma=1.0, log_every_n_steps=0)]}[method]
    model = TabularClassifier(hidden_sizes=(64, 64), dropout=0.1, lr=1e-3, weight_decay=1e-4)
    trainer = _quiet_trainer(max_epochs=args.epochs, limit_val_batches=0, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    out = {"acc": res["test/acc"], "worst_group_acc": res["test/acc_worst"], "es_acc": res["test/es_acc"],
           "es_auc": res["test/es_auc"], "gap": res["test/acc_gap"], "seconds": seconds}
    out["group_acc"] = {name: res.get(f"test/acc_{name}", float("nan")) for name in dm.group_names}
    if method == "groupdro":
        out["q"] = callbacks[0].q.tolist()
    return out


def run_ph2(method: str, seed: int, args) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_reweight.data.segmentation import PH2DataModule
    from lightning_reweight.losses import FEBSDiceLoss
    from lightning_reweight.metrics import EquityScaledDice, EquityScaledIoU, per_image_dice
    from lightning_reweight.models.segmenter import SegmentationModule, SoftDiceLoss

    pl.seed_everything(seed, verbose=False)
    dm = PH2DataModule(root=args.ph2_root, crop_size=64, sparse_fraction=0.0, paired=False, batch_size=16, seed=0)
    dice_loss = FEBSDiceLoss(num_groups=3, gamma=1.0) if method == "febs" else SoftDiceLoss()
    model = SegmentationModule(encoder_name="tu-mobilenetv3_small_050", encoder_depth=4,
                               decoder_channels=[32, 16, 16, 8], in_channels=3, num_groups=3, dice_weight=0.5,
                               optimizer="adam", lr=1e-3, weight_decay=1e-4, dice_loss=dice_loss)
    trainer = _quiet_trainer(max_steps=args.ph2_steps, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    es_dice, es_iou = EquityScaledDice(num_groups=3), EquityScaledIoU(num_groups=3)
    dices, groups = [], []
    model.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = model(batch["image"])
            es_dice.update(logits, batch["mask"], batch["group"])
            es_iou.update(logits, batch["mask"], batch["group"])
            dices.append(per_image_dice(logits, batch["mask"]))
            groups.append(batch["group"])
    dice, group = torch.cat(dices), torch.cat(groups)
    per_group = {name: float(dice[group == g].mean()) for g, name in enumerate(PH2DataModule.group_names)}
    return {"dice": float(dice.mean()), "worst_group_dice": min(per_group.values()), "es_dice": float(es_dice.compute()),
            "es_iou": float(es_iou.compute()), "group_dice": per_group, "seconds": seconds}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--groupings", nargs="+", default=["sex", "race"], choices=["sex", "race", "sex_race"])
    p.add_argument("--root", default="../shared/datasets/adult", help="folder with adult.data / adult.test")
    p.add_argument("--ph2-root", default="../shared/datasets", help="folder holding ph2_dermoscopy/")
    p.add_argument("--ph2-steps", type=int, default=120)
    p.add_argument("--no-ph2", action="store_true", help="skip the PH2 segmentation part")
    args = p.parse_args()
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    max_train = None
    if args.quick:
        args.seeds, args.epochs, args.groupings, args.ph2_steps, max_train = 1, 1, ["sex"], 10, 4000

    from lightning_reweight.data.adult import AdultDataModule

    figures: dict[str, float] = {}
    rows, results = [], {}
    t_start = time.perf_counter()
    for grouping in args.groupings:
        dm = AdultDataModule(root=args.root, group_attribute=grouping, batch_size=256, max_train_samples=max_train)
        dm.setup()
        for method in ADULT_METHODS:
            runs = [run_adult(dm, method, seed, args) for seed in range(args.seeds)]
            results[(grouping, method)] = runs
            row = {"data": f"adult/{grouping}", "method": method}
            for key in ("acc", "worst_group_acc", "es_acc", "es_auc", "gap"):
                vals = [r[key] for r in runs]
                row[key] = fmt_pm(vals)
                m, s = mean_std(vals)
                if key != "gap":
                    figures[f"{key}_{method}_{grouping}"] = m
                    figures[f"{key}_{method}_{grouping}_std"] = s
                    if grouping == HEADLINE_GROUPING:
                        figures[f"{key}_{method}"] = m
                        figures[f"{key}_{method}_std"] = s
            worst = min(dm.group_names, key=lambda n: statistics_mean([r["group_acc"][n] for r in runs]))
            row["worst group"] = worst
            row["s/run"] = f"{statistics_mean([r['seconds'] for r in runs]):.0f}"
            rows.append(row)
            print(f"done adult/{grouping}/{method} ({time.perf_counter() - t_start:.0f}s)", flush=True)
    text = print_table(rows, "Adult test set (%), mean ± std over seeds; gap = best − worst group accuracy")

    ph2_rows = []
    if not args.no_ph2:
        for method in PH2_METHODS:
            runs = [run_ph2(method, seed, args) for seed in range(args.seeds)]
            results[("ph2", method)] = runs
            row = {"data": "ph2/diagnosis", "method": method}
            for key in ("dice", "worst_group_dice", "es_dice", "es_iou"):
                vals = [r[key] for r in runs]
                row[key] = fmt_pm(vals)
                m, s = mean_std(vals)
                figures[f"{key}_{method}_ph2"], figures[f"{key}_{method}_ph2_std"] = m, s
            for name in runs[0]["group_dice"]:
                row[name] = fmt_pm([r["group_dice"][name] for r in runs])
            row["s/run"] = f"{statistics_mean([r['seconds'] for r in runs]):.0f}"
            ph2_rows.append(row)
            print(f"done ph2/{method} ({time.perf_counter() - t_start:.0f}s)", flush=True)
        text += print_table(ph2_rows, "PH2 test windows (%), mean ± std over seeds")

    figures["total_seconds"] = time.perf_counter() - t_start
    _plot(results, args)
    write_json(args.json, figures, table=rows + ph2_rows, text=text,
               meta_run={"seeds": args.seeds, "epochs": args.epochs, "ph2_steps": args.ph2_steps,
                         "headline_grouping": HEADLINE_GROUPING, "quick": args.quick},
               groupdro_q={g: [r.get("q") for r in runs] for (g, m), runs in results.items() if m == "groupdro"},
               group_scores={f"{g}/{m}": {name: statistics_mean([r.get("group_acc", r.get("group_dice"))[name]
                                                                  for r in runs])
                                          for name in (runs[0].get("group_acc") or runs[0].get("group_dice"))}
                             for (g, m), runs in results.items()})


def statistics_mean(values) -> float:
    return mean_std(values)[0]


def _plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, ADULT_METHODS, ("acc", "worst_group_acc", "es_acc")) for g in args.groupings]
    if ("ph2", "erm") in results:
        panels.append(("ph2", PH2_METHODS, ("dice", "worst_group_dice", "es_dice")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (data, methods, keys) in zip(axes[0], panels):
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            runs = results[(data, method)]
            stats = [mean_std([r[k] for r in runs]) for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], [100 * m for m, _ in stats], width,
                   yerr=[100 * s for _, s in stats], label=method, capsize=3)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([k.replace("_", "\n") for k in keys])
        lo = min(100 * mean_std([r[k] for r in results[(data, m)]])[0] for m in methods for k in keys)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_title(("Adult, groups: " + data if data != "ph2" else "PH2, diagnosis groups") + " (mean ± std)")
        ax.set_ylabel("test score (%)")
        legend_outside(ax)
    fig.tight_layout()
    save_plot(fig, args.out, "group_fairness", quick=args.quick)


if __name__ == "__main__":
    main()
