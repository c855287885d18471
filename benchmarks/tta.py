"""Test-time adaptation on corrupted CIFAR-10: source vs BN-adapt vs Tent vs EATA.

Methods (``lightning_reweight.callbacks.tta``), all run through ``trainer.test`` with the callback attached:
``source`` (the trained model, running statistics), ``norm`` (``Tent(steps=0)``: batch statistics, no update),
``tent`` ("Tent: Fully Test-time Adaptation by Entropy Minimization") and ``eata`` ("Efficient Test-Time Model
Adaptation without Forgetting": E0 = 0.4·ln 10, ε = 0.4, λ = 1, Fisher from 2,000 clean held-out training
images). Both adapt BatchNorm γ/β with Adam (lr 1e-3, Tent's CIFAR-10-C setting), test batch 200.

Protocols (seed = test-image subset/order and corruption noise; one source model for all seeds):

* per shift: reset to the source model before every corruption × severity stream (Tent's CIFAR-10-C protocol);
  error per corruption at severities 5 and 3, and the number of samples that entered a backward pass (EATA's
  "#backwards": Tent backpropagates every sample, EATA only the reliable, non-redundant ones);
* forgetting: adapt continually through all severity-5 streams in sequence, then measure the error on the clean
  test images with the adapted γ/β and batch statistics, without further updates (``steps=0``). The Fisher
  ablation runs EATA's variants here: ``fisher_alpha`` 0 (ETA), 1 on the raw Fisher (the default), and 1 and
  ``--fisher-large`` on the Fisher normalised to mean 1 (``fisher_normalize=True``); the table also reports
  backward passes (steps that ran a backward) and backward samples separately.

Scale-down for a shared CPU (the papers: WRN-28-10 / ResNet-50, 15 corruptions × 10,000 images): a timm
``resnet10t`` at quarter width (channels 16-32-64-128, ~0.3 M parameters, ImageNet stem) trained from scratch
for ``--epochs`` epochs of ``--train-batches`` batches of 128 (SGD 0.05, cosine, crop + flip) on the 45,000
training images not held out; its checkpoint is cached under ``.cache/lightning_reweight/tta_bench/``.
Five corruptions (Gaussian noise, defocus blur, fog, contrast, JPEG: one or two per family) from our CIFAR-10-C
generator (``lightning_reweight.data.corruptions``), ``--images`` test images per severity-5 stream (default 2,000,
i.e. 10 adaptation steps of 200) and ``--images-sev3`` per severity-3 stream (default 1,000), 3 seeds, 1 thread.
``--quick``: one seed, two corruptions, 400 (severity 5) / 200 (severity 3) images, a 40-batch source model.

    python benchmarks/tta.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--images 2000] [--batch-size 200]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    Progress,
    fmt_pm,
    legend_outside,
    mean_std,
    parser,
    print_table,
    save_plot,
    setup_threads,
    write_json,
)

CORRUPTIONS = ["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"]
METHODS = ["source", "norm", "tent", "eata"]
MODEL_KW = dict(model_name="resnet10t", num_classes=10, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16})


def _quiet():
    import logging

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def _trainer(callbacks=(), **kw):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw)


def source_model(args, progress=None):
    """Train (or load from the cache) the source classifier; returns (model, clean test error, seconds)."""
    import lightning.pytorch as pl

    from lightning_reweight.data.corruptions import CIFAR10CDataModule
    from lightning_reweight.models import ImageClassifier

    key = json.dumps({"model": MODEL_KW, "epochs": args.epochs, "batches": args.train_batches, "v": 1}, sort_keys=True)
    ckpt = Path(args.cache_dir) / "tta_bench" / f"source_{hashlib.sha1(key.encode()).hexdigest()[:10]}.ckpt"
    t0 = time.perf_counter()
    if ckpt.exists():
        model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
        trained = False
    else:
        pl.seed_everything(0, verbose=False)
        model = ImageClassifier(**MODEL_KW)
        dm = CIFAR10CDataModule(root=args.root, corruptions=[], include_clean=True, cache_dir=args.cache_dir)
        class EpochLine(pl.Callback):  # one line per source-model epoch
            def on_train_epoch_end(self, trainer, pl_module):
                if progress is not None:
                    progress(f"source model: epoch {trainer.current_epoch + 1}/{args.epochs} "
                             f"(train loss {float(trainer.callback_metrics.get('train/loss', float('nan'))):.3f})")

        trainer = _trainer([EpochLine()], max_epochs=args.epochs, limit_train_batches=args.train_batches,
                           limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(ckpt)
        trained = True
    return model, ckpt, trained, time.perf_counter() - t0


ABLATION = {  # name -> (fisher_alpha, fisher_normalize); "eata" is the default configuration
    "eta (alpha=0)": (0.0, False),
    "eata (alpha=1, raw)": (1.0, False),
    "eata (alpha=1, norm)": (1.0, True),
    "eata (alpha=L, norm)": (None, True),
}


def make_callback(method, dm, *, reset, fisher_alpha=1.0, fisher_normalize=False):
    from lightning_reweight.callbacks.tta import EATA, Tent

    if method == "source":
        return None
    if method == "norm":
        return Tent(steps=0, reset=reset, log_every_n_batches=0)
    if method == "tent":
        return Tent(lr=1e-3, reset=reset, log_every_n_batches=0)
    return EATA(d_margin=0.4, fisher_alpha=fisher_alpha, fisher_normalize=fisher_normalize, fisher_samples=2000,
                fisher_dataloader=dm.val_dataloader(), lr=1e-3, reset=reset, log_every_n_batches=0)


def test_error(model, cb, loader):
    trainer = _trainer([cb] if cb is not None else [], inference_mode=cb is None)
    before = dict(cb.counters) if cb is not None else None
    result = trainer.test(model, dataloaders=loader, verbose=False)[0]
    backward = (cb.counters["backward_samples"] - before["backward_samples"]) if cb is not None else 0
    passes = (cb.counters["backward_passes"] - before["backward_passes"]) if cb is not None else 0
    return 1.0 - float(result["test/acc"]), backward, passes


def run_seed(seed, args, source_state, progress):
    import torch

    from lightning_reweight.data.corruptions import CIFAR10CDataModule
    from lightning_reweight.models import ImageClassifier

    loaders = {}
    for severity in args.severities:  # severity 5 (and clean) with --images, severity 3 with --images-sev3
        dm = CIFAR10CDataModule(root=args.root, corruptions=args.corruptions, severities=[severity],
                                num_test_images=args.images if severity == 5 else args.images_sev3,
                                include_clean=severity == 5, batch_size=args.batch_size, seed=seed,
                                cache_dir=args.cache_dir)
        dm.setup("test")
        loaders.update(zip(dm.shift_names, dm.test_dataloader()))
    dm.setup("fit")  # the clean held-out split for EATA's Fisher
    shift_names = list(loaders)

    def fresh():
        model = ImageClassifier(**MODEL_KW)
        model.load_state_dict(source_state)
        return model

    rows = []
    for method in METHODS:  # per-shift protocol
        progress(f"seed {seed}: {method}, reset per shift ({len(shift_names) - 1} streams)")
        model = fresh()
        torch.manual_seed(seed)
        cb = make_callback(method, dm, reset="per_shift")
        for name in shift_names:
            if name == "clean":
                continue
            corruption, severity = name.rsplit("-", 1)
            t0 = time.perf_counter()
            err, backward, passes = test_error(model, cb, loaders[name])
            rows.append(dict(seed=seed, method=method, protocol="per_shift", corruption=corruption,
                             severity=int(severity), error=err, backward=backward, passes=passes,
                             seconds=time.perf_counter() - t0))
        if method in ("source", "norm"):  # clean reference errors (no adaptation updates involved)
            model = fresh()
            err, _, _ = test_error(model, make_callback(method, dm, reset="per_shift"), loaders["clean"])
            rows.append(dict(seed=seed, method=method, protocol="clean", corruption="clean", severity=0, error=err,
                             backward=0, passes=0, seconds=0.0))
    variants = {"tent": ("tent", {})}
    for label, (alpha, normalize) in ABLATION.items():
        variants[label] = ("eata", dict(fisher_alpha=args.fisher_large if alpha is None else alpha,
                                        fisher_normalize=normalize))
    for label, (method, kw) in variants.items():  # forgetting: continual through the severity-5 streams, then clean
        progress(f"seed {seed}: {label}, continual through the severity-5 streams, then clean")
        model = fresh()
        cb = make_callback(method, dm, reset="continual", **kw)
        for name in shift_names:
            if name.endswith("-5"):
                err, backward, passes = test_error(model, cb, loaders[name])
                rows.append(dict(seed=seed, method=label, protocol="continual", corruption=name[:-2], severity=5,
                                 error=err, backward=backward, passes=passes, seconds=0.0))
        # evaluate the adapted model as it is: reset="continual" puts the adapted γ/β back (the module itself was
        # restored to the source parameters at the end of every run), steps=0 adapts no further
        adapted, source = cb.adapted_state, cb.source_state
        drift = float(sum(((adapted[k] - source[k]) ** 2).sum() for k in adapted)) ** 0.5  # ‖θ − θ⁰‖ over γ/β
        cb.steps = 0
        err, _, _ = test_error(model, cb, loaders["clean"])
        rows.append(dict(seed=seed, method=label, protocol="clean_after", corruption="clean", severity=0, error=err,
                         backward=0, passes=0, drift=drift, seconds=0.0))
        if method == "eata" and kw["fisher_alpha"] == 1.0 and not kw["fisher_normalize"]:  # the default is "eata"
            rows += [dict(r, method="eata") for r in rows if r["method"] == label and r["seed"] == seed]
    return rows


def summarise(rows, args):
    def values(**kw):
        return [r for r in rows if all(r[k] == v for k, v in kw.items())]

    def per_seed_mean(method, protocol, severity, key="error"):
        out = []
        for seed in sorted({r["seed"] for r in rows}):
            vals = [r[key] for r in values(method=method, protocol=protocol, severity=severity, seed=seed)]
            if vals:
                out.append(sum(vals) / len(vals) if key == "error" else sum(vals))
        return out

    tables = []
    for severity in args.severities:
        table = []
        for method in METHODS:
            row = {"method": method}
            for c in args.corruptions:
                row[c] = fmt_pm([r["error"] for r in values(method=method, protocol="per_shift", severity=severity,
                                                             corruption=c)])
            row["mean"] = fmt_pm(per_seed_mean(method, "per_shift", severity))
            back = per_seed_mean(method, "per_shift", severity, key="backward")
            row["backward samples"] = f"{mean_std(back)[0]:.0f}" if method in ("tent", "eata") else "0"
            passes = per_seed_mean(method, "per_shift", severity, key="passes")
            row["backward passes"] = f"{mean_std(passes)[0]:.0f}" if method in ("tent", "eata") else "0"
            table.append(row)
        tables.append(print_table(table, title=f"Error % per corruption, severity {severity} (reset per shift; "
                                               f"mean ± std over {len(args.seeds)} seeds; backward samples / passes = "
                                               f"samples backpropagated / steps that ran a backward, per run of "
                                               f"{len(args.corruptions)} streams × {args.images if severity == 5 else args.images_sev3} "
                                               f"images in batches of {args.batch_size})"))
    forget = []
    for method in ["source", "norm", "tent", *ABLATION]:
        cont = per_seed_mean(method, "continual", 5)
        clean = [r["error"] for r in values(method=method, protocol="clean" if method in ("source", "norm")
                                            else "clean_after")]
        passes = per_seed_mean(method, "continual", 5, key="passes")
        back = per_seed_mean(method, "continual", 5, key="backward")
        label = method.replace("alpha=L", f"alpha={args.fisher_large:g}")
        forget.append({"method": label,
                       "continual sev-5 mean error %": fmt_pm(cont) if cont else "-",
                       "clean error % (after continual adaptation)": fmt_pm(clean),
                       "backward passes": f"{mean_std(passes)[0]:.0f}" if passes else "0",
                       "backward samples": f"{mean_std(back)[0]:.0f}" if back else "0",
                       "γ/β drift ‖θ−θ⁰‖": fmt_pm([r["drift"] for r in values(method=method, protocol="clean_after")],
                                                 scale=1.0, digits=3) if method not in ("source", "norm") else "0"})
    tables.append(print_table(forget, title="Forgetting and the Fisher ablation: clean-test error after adapting "
                                            "through all severity-5 corruptions in sequence (source/norm: no "
                                            "adaptation; eta = EATA without the Fisher term; raw = the estimated "
                                            "Fisher, norm = Fisher / its mean)"))
    figures = {
        "error_source": mean_std(per_seed_mean("source", "per_shift", 5))[0],
        "error_norm": mean_std(per_seed_mean("norm", "per_shift", 5))[0],
        "error_tent": mean_std(per_seed_mean("tent", "per_shift", 5))[0],
        "error_eata": mean_std(per_seed_mean("eata", "per_shift", 5))[0],
        "backward_tent": mean_std(per_seed_mean("tent", "per_shift", 5, key="backward"))[0],
        "backward_eata": mean_std(per_seed_mean("eata", "per_shift", 5, key="backward"))[0],
        "clean_error_source": mean_std([r["error"] for r in values(method="source", protocol="clean")])[0],
        "clean_error_norm": mean_std([r["error"] for r in values(method="norm", protocol="clean")])[0],
        "clean_error_after_tent": mean_std([r["error"] for r in values(method="tent", protocol="clean_after")])[0],
        "clean_error_after_eata": mean_std([r["error"] for r in values(method="eata", protocol="clean_after")])[0],
        "error_tent_continual": mean_std(per_seed_mean("tent", "continual", 5))[0],
        "error_eata_continual": mean_std(per_seed_mean("eata", "continual", 5))[0],
        "passes_tent": mean_std(per_seed_mean("tent", "per_shift", 5, key="passes"))[0],
        "passes_eata": mean_std(per_seed_mean("eata", "per_shift", 5, key="passes"))[0],
    }
    for method, tag in zip(ABLATION, ("eta", "eata_raw1", "eata_norm1", "eata_norm_large")):
        figures[f"clean_error_after_{tag}"] = mean_std([r["error"] for r in values(method=method,
                                                                                   protocol="clean_after")])[0]
        figures[f"error_{tag}_continual"] = mean_std(per_seed_mean(method, "continual", 5))[0]
        figures[f"drift_{tag}"] = mean_std([r["drift"] for r in values(method=method, protocol="clean_after")])[0]
    if 3 in args.severities:
        for m in ("source", "tent", "eata"):
            figures[f"error_{m}_sev3"] = mean_std(per_seed_mean(m, "per_shift", 3))[0]
    return tables, figures


def plot(rows, args, figures):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    width = 0.2
    xs = np.arange(len(args.corruptions) + 1)
    for k, method in enumerate(METHODS):
        means, stds = [], []
        for c in [*args.corruptions, None]:
            if c is None:
                seeds = sorted({r["seed"] for r in rows})
                vals = [np.mean([r["error"] for r in rows if r["method"] == method and r["protocol"] == "per_shift"
                                 and r["severity"] == 5 and r["seed"] == s]) for s in seeds]
            else:
                vals = [r["error"] for r in rows if r["method"] == method and r["protocol"] == "per_shift"
                        and r["severity"] == 5 and r["corruption"] == c]
            means.append(100 * np.mean(vals))
            stds.append(100 * np.std(vals, ddof=1) if len(vals) > 1 else 0)
        ax.bar(xs + (k - 1.5) * width, means, width, yerr=stds, label=method, capsize=2)
    ax.set_xticks(xs, [*args.corruptions, "mean"], rotation=20)
    ax.set_ylabel("test error (%)")
    ax.set_title("CIFAR-10-C, severity 5, reset per shift: error by corruption (mean ± std over seeds)")
    legend_outside(ax)
    ax = axes[1]
    labels = ["source", "norm", "tent", "eata"]
    vals = [figures["clean_error_source"], figures["clean_error_norm"], figures["clean_error_after_tent"],
            figures["clean_error_after_eata"]]
    ax.bar(labels, [100 * v for v in vals], color=["C0", "C1", "C2", "C3"])
    ax.set_ylabel("clean test error after continual adaptation (%)")
    ax.set_title(f"Forgetting (backward samples: Tent {figures['backward_tent']:.0f}, "
                 f"EATA {figures['backward_eata']:.0f})", fontsize=9)
    fig.tight_layout()
    return save_plot(fig, args.out, "tta", quick=args.quick)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--images", type=int, default=2000, help="test images per severity-5 (and clean) stream")
    p.add_argument("--images-sev3", type=int, default=1000, help="test images per severity-3 stream")
    p.add_argument("--batch-size", type=int, default=200, help="test batch (Tent's CIFAR-10-C: 200; EATA ImageNet: 64)")
    p.add_argument("--epochs", type=int, default=6, help="source-model epochs")
    p.add_argument("--train-batches", type=int, default=150, help="batches of 128 per source-model epoch")
    p.add_argument("--fisher-large", type=float, default=50.0,
                   help="the large fisher_alpha of the ablation (on the normalised Fisher)")
    p.add_argument("--root", default="../shared/datasets")
    p.add_argument("--cache-dir", default=".cache/lightning_reweight")
    args = p.parse_args()
    setup_threads(args.threads)
    _quiet()
    args.corruptions, args.severities = list(CORRUPTIONS), [5, 3]
    if args.quick:  # one seed, two corruptions, severity 5 only, a 20-batch source model: well under a minute
        args.seeds, args.images, args.images_sev3, args.epochs, args.train_batches = 1, 400, 200, 1, 20
        args.corruptions, args.severities = ["gaussian_noise", "contrast"], [5]
    args.seeds = list(range(args.seeds))

    import torch

    t_start = time.perf_counter()
    progress = Progress("tta")
    progress(f"source model: {args.epochs} epoch(s) x {args.train_batches} batches (or the cached checkpoint)")
    model, ckpt, trained, t_source = source_model(args, progress)
    progress(f"source model: {ckpt} ({'trained' if trained else 'loaded from cache'} in {t_source:.0f}s)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        rows += run_seed(seed, args, state, progress)
        progress(f"seed {seed} finished in {time.perf_counter() - t0:.0f}s")
    tables, figures = summarise(rows, args)
    plot(rows, args, figures)
    print("\nfigures: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    print(f"total {time.perf_counter() - t_start:.0f}s (source model {t_source:.0f}s, "
          f"{'trained' if trained else 'cached'}); torch {torch.__version__}")
    write_json(args.json, figures, table=rows, tables=tables,
               config={"corruptions": args.corruptions, "severities": args.severities, "images": args.images,
                       "seeds": args.seeds, "batch_size": args.batch_size, "epochs": args.epochs, "train_batches": args.train_batches,
                       "model": MODEL_KW, "source_trained_this_run": trained, "source_seconds": t_source})


if __name__ == "__main__":
    main()
