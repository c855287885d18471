"""CIFAR-10-LT (ρ = 100): class balancing by sampling vs upweighting, Cooldown, importance sampling; RS2 time-to-accuracy.

    python benchmarks/long_tail.py [--quick] [--json PATH] [--out DIR] [--seeds 3] [--epochs 6] [--root ../shared/datasets]

Data: CIFAR-10-LT built from ``../shared/datasets/cifar10`` (class c keeps its first ``int(5000·100^(−c/9))``
training images: 5000 … 50, 12,406 in all; decoded once and cached under ``.cache/cifar10_lt/``), the balanced
10,000-image test split. **Tail = the 3 smallest classes** (7 horse: 139, 8 ship: 83, 9 truck: 50 images).

Methods (same model, optimiser and step count; each run is one Lightning ``Trainer.fit``):

=================  ==========================================================================================
``erm``            plain shuffling, mean loss
``class_balanced`` ``GroupBalancing(mode="upsample", tau=inf)``: classes drawn uniformly, N draws per epoch
``temperature``    ``GroupBalancing(mode="upsample", tau=5)``: p(c) ∝ n_c^{1/5}
``cooldown``       ``GroupBalancing(mode="upsample", schedule="cooldown")``: τ = 5 for the first half, then 1
``upweight``       ``GroupBalancing(mode="upweight", tau=5)``: proportional sampling, loss weight p(c;5)/p(c;1)
``importance``     ``ImportanceSampling(score="loss")``: PA&DA's rule (pairwise-mean scores reset every epoch,
                   uniform mixing ramped 1 → 0 over the run, N draws with replacement), on per-sample losses
=================  ==========================================================================================

``temperature``/``upweight`` share τ = 5 (the paper's Cooldown start) so that pair is the paper's upsample-vs-
upweight comparison; ``cooldown`` uses the paper's defaults (5 → 1 at one half, one step).

RS2 ("Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning"): ``RS2Sampler`` rounds of
r·N samples without replacement, r ∈ {0.1, 0.3}, for half the full-data step budget (``round(0.5·E/r)``
rounds; per-iteration cosine over the exact step count) vs full-data ERM (E epochs). Every ``--eval-every`` (25)
optimizer steps and at the end, the balanced accuracy on a fixed balanced 2,000-image test subset is recorded with
the cumulative training wall time (evaluation excluded) and optimizer steps; time/steps-to-accuracy = first point
reaching the target, which is **``--target-fraction`` (90 %) of the median final full-data accuracy** on that
subset (medians over seeds; ``null`` = not reached).

Scale-down (the issue allowed ~45 min on 2 cores; here one shared core, ~20 min): images downscaled to 16×16
(2×2 average pooling), ``resnet10t`` from timm with channels (16, 32, 64, 128) and stem width 8, from scratch,
E = 6 epochs, batch 128, SGD lr 0.1 (momentum 0.9, Nesterov, wd 5e-4), per-step cosine; flip + 2-pixel
reflect-pad crop augmentation (one random offset per batch). Accuracies are therefore far below the
literature's CIFAR-10-LT numbers (200 epochs, ResNet-32 at 32×32); compare methods with each other only.
``--quick``: 1 seed, 2 epochs, 5 % of every class (≥ 5 images), 500 test images.

JSON figures: ``balanced_acc_<method>``, ``balanced_acc_std_<method>``, ``tail_acc_<method>``,
``tail_acc_std_<method>`` (fractions, mean and std over seeds) for the six methods; ``rs2_target_acc``;
``tta_steps_<run>``, ``tta_time_s_<run>``, ``final_acc_<run>``, ``train_time_s_<run>`` for run ∈
{full, rs2_r0.1, rs2_r0.3} (medians over seeds); ``equal_budget_acc_<run>``: accuracy at the RS2 step budget
(for ``full``: its last evaluation within that many steps, i.e. the same compute); ``rs2_budget_steps``.
``--reanalyze PATH`` recomputes tables, figures and the plot from a saved ``--json`` file without training.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cifar_lt import load_cifar10_lt, lt_counts  # noqa: E402
from _common import (  # noqa: E402
    fmt_pm,
    legend_outside,
    mean_std,
    parser,
    print_table,
    save_plot,
    setup_threads,
    write_json,
)

METHODS = ("erm", "class_balanced", "temperature", "cooldown", "upweight", "importance")
TAIL = (7, 8, 9)
RS2_FRACTIONS = (0.1, 0.3)


def build_data(args):
    import torch
    import torch.nn.functional as F

    d = load_cifar10_lt(args.root)
    x_tr, y_tr = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    x_te, y_te = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    if args.quick:  # 5 % of each class (at least 5), 50 test images per class
        keep = torch.cat([torch.nonzero(y_tr == c).flatten()[: max(5, n // 20)] for c, n in enumerate(lt_counts())])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
        keep = torch.cat([torch.nonzero(y_te == c).flatten()[:50] for c in range(10)])
        x_te, y_te = x_te[keep], y_te[keep]

    def prep(x):
        t = x.permute(0, 3, 1, 2).float().div_(255)
        return F.avg_pool2d(t, 32 // args.image_size) if args.image_size != 32 else t

    x_tr, x_te = prep(x_tr), prep(x_te)
    mean, std = x_tr.mean((0, 2, 3), keepdim=True), x_tr.std((0, 2, 3), keepdim=True)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    # balanced evaluation subset for the per-epoch time-to-accuracy curves
    per_class = 200 if not args.quick else 30
    sub = torch.cat([torch.nonzero(y_te == c).flatten()[:per_class] for c in range(10)])
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te,
            "x_eval": x_te[sub], "y_eval": y_te[sub]}


def class_accuracy(model, x, y, batch_size: int = 1000):
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return torch.stack([(pred[y == c] == c).float().mean() for c in range(10)])


def make_module(args):
    import torch
    import torch.nn.functional as F

    from lightning_reweight.models import ImageClassifier

    class AugmentedClassifier(ImageClassifier):
        """The core ImageClassifier plus cheap batch augmentation (flip, reflect-pad crop) in training."""

        def on_after_batch_transfer(self, batch, dataloader_idx):
            if not self.trainer.training:
                return batch
            x, y, *rest = batch
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            pad = max(1, x.shape[-1] // 8)
            x = F.pad(x, (pad,) * 4, mode="reflect")
            dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, :, dy:dy + x.shape[-2] - 2 * pad, dx:dx + x.shape[-1] - 2 * pad]
            return (x, y, *rest)

    return AugmentedClassifier(model_name="resnet10t", num_classes=10, optimizer="sgd", lr=args.lr,
                               weight_decay=5e-4, momentum=0.9, scheduler="cosine",
                               model_kwargs={"channels": (16, 32, 64, 128), "stem_width": 8})


def method_callbacks(method: str, seed: int):
    from lightning_reweight.callbacks.balancing import GroupBalancing
    from lightning_reweight.callbacks.importance import ImportanceSampling

    common = dict(log_every_n_steps=0, seed=seed)
    return {
        "erm": [],
        "class_balanced": [GroupBalancing(mode="upsample", tau=math.inf, **common)],
        "temperature": [GroupBalancing(mode="upsample", tau=5.0, **common)],
        "cooldown": [GroupBalancing(mode="upsample", schedule="cooldown", **common)],
        "upweight": [GroupBalancing(mode="upweight", tau=5.0, **common)],
        "importance": [ImportanceSampling(score="loss", **common)],
    }[method]


def curve_callback(data, eval_every: int):
    """Records (train wall time, steps, eval-subset balanced accuracy) every ``eval_every`` optimizer steps and
    at the end of training; evaluation time is excluded from the wall time."""
    import lightning.pytorch as pl

    class Curve(pl.Callback):
        def __init__(self):
            self.points, self.train_time, self._t0 = [], 0.0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self._t0 is None:
                self._t0 = time.perf_counter()

        def _record(self, trainer, pl_module):
            self.train_time += time.perf_counter() - self._t0
            self._t0 = None
            acc = float(class_accuracy(pl_module, data["x_eval"], data["y_eval"]).mean())
            self.points.append((self.train_time, trainer.global_step, acc))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % eval_every == 0:
                self._record(trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            if self._t0 is not None:
                self._record(trainer, pl_module)

    return Curve()


def fit(args, data, seed: int, callbacks, sampler=None, max_epochs: int | None = None):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import IndexedDataset

    pl.seed_everything(seed, verbose=False)
    ds = IndexedDataset(TensorDataset(data["x_train"], data["y_train"]), targets=data["y_train"])
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler)
    model = make_module(args)
    trainer = pl.Trainer(max_epochs=max_epochs or args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                         callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    return model, time.perf_counter() - t0, trainer


def run_methods(args, data):
    results = {m: [] for m in METHODS}
    curves = {"full": []}
    for seed in range(args.seeds):
        for method in METHODS:
            callbacks = method_callbacks(method, seed)
            curve = curve_callback(data, args.eval_every) if method == "erm" else None
            model, wall, trainer = fit(args, data, seed, callbacks + ([curve] if curve else []))
            acc = class_accuracy(model, data["x_test"], data["y_test"])
            bal, tail = float(acc.mean()), float(acc[list(TAIL)].mean())
            results[method].append({"seed": seed, "balanced": bal, "tail": tail, "wall": wall,
                                    "steps": trainer.global_step, "class_acc": acc.tolist()})
            if curve:
                curves["full"].append(curve.points)
            print(f"[seed {seed}] {method:15s} balanced {bal:.3f}  tail {tail:.3f}  ({wall:.0f}s, "
                  f"{trainer.global_step} steps)", flush=True)
    return results, curves


def run_rs2(args, data, curves):
    from lightning_reweight.callbacks.sampling import SamplerState
    from lightning_reweight.samplers.rs2 import RS2Sampler

    for r in RS2_FRACTIONS:
        key = f"rs2_r{r}"
        curves[key] = []
        rounds = max(1, round(0.5 * args.epochs / r))
        for seed in range(args.seeds):
            sampler = RS2Sampler(len(data["y_train"]), fraction=r, seed=seed, num_replicas=1, rank=0)
            curve = curve_callback(data, args.eval_every)
            fit(args, data, seed, [SamplerState(log_stats=False), curve], sampler=sampler, max_epochs=rounds)
            curves[key].append(curve.points)
            t, s, a = curve.points[-1]
            print(f"[seed {seed}] {key:15s} {rounds} rounds: eval acc {a:.3f}  ({t:.0f}s train, {s} steps)", flush=True)


def time_to_accuracy(curves, target):
    """Median over seeds of the first (time, steps) reaching ``target``; ``nan`` if a seed never does."""
    out = {}
    for key, runs in curves.items():
        hits = [next(((t, s) for t, s, a in pts if a >= target), (math.nan, math.nan)) for pts in runs]
        out[key] = {
            "time": statistics.median(h[0] for h in hits) if all(not math.isnan(h[0]) for h in hits) else math.nan,
            "steps": statistics.median(h[1] for h in hits) if all(not math.isnan(h[1]) for h in hits) else math.nan,
            "final": statistics.median(pts[-1][2] for pts in runs),
            "train_time": statistics.median(pts[-1][0] for pts in runs),
            "total_steps": statistics.median(pts[-1][1] for pts in runs),
        }
    return out


def plot(args, results, curves, target):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    xs = range(len(METHODS))
    for offset, (key, label) in zip((-0.2, 0.2), (("balanced", "balanced acc"), ("tail", "tail acc (3 smallest)"))):
        stats = [mean_std([r[key] for r in results[m]]) for m in METHODS]
        axes[0].bar([x + offset for x in xs], [100 * s[0] for s in stats], width=0.4, yerr=[100 * s[1] for s in stats],
                    label=label, capsize=3)
    axes[0].set_xticks(list(xs), METHODS, rotation=20)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"CIFAR-10-LT ρ=100, {args.epochs} epochs, mean ± std over {args.seeds} seed(s)")
    legend_outside(axes[0])
    for key, runs in curves.items():
        for i, pts in enumerate(runs):
            axes[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], marker=".", alpha=0.8,
                         color={"full": "C0", "rs2_r0.1": "C1", "rs2_r0.3": "C2"}.get(key, "C3"),
                         label=key if i == 0 else None)
    axes[1].axhline(100 * target, color="gray", ls="--", label="target")
    axes[1].set_xlabel("training wall time (s, evaluation excluded)")
    axes[1].set_ylabel("balanced accuracy, 2k test subset (%)")
    axes[1].set_title("RS2 vs full data: time to accuracy")
    legend_outside(axes[1])
    fig.tight_layout()
    save_plot(fig, args.out, "long_tail", quick=args.quick)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32))
    p.add_argument("--root", default="../shared/datasets")
    p.add_argument("--eval-every", type=int, default=25, help="optimizer steps between time-to-accuracy evaluations")
    p.add_argument("--target-fraction", type=float, default=0.9,
                   help="time-to-accuracy target = this fraction of the median final full-data accuracy")
    p.add_argument("--reanalyze", type=Path, default=None, help="recompute tables/figures from a saved --json file")
    args = p.parse_args()
    setup_threads(args.threads)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    if args.reanalyze is not None:  # recompute tables, figures and the plot from a saved --json run
        import json

        saved = json.loads(args.reanalyze.read_text())
        results, curves = saved["results"], saved["curves"]
        seeds = len(next(iter(results.values())))
        args.seeds, args.epochs = seeds, int(saved["config"]["epochs"])
        summarize(args, results, curves, saved.get("wall_s", math.nan))
        return

    t_start = time.perf_counter()
    data = build_data(args)
    print(f"CIFAR-10-LT: {len(data['y_train'])} train images, counts "
          f"{__import__('torch').bincount(data['y_train']).tolist()}, {len(data['y_test'])} test, "
          f"{args.image_size}x{args.image_size}, {args.epochs} epochs, {args.seeds} seed(s)", flush=True)
    results, curves = run_methods(args, data)
    run_rs2(args, data, curves)
    summarize(args, results, curves, time.perf_counter() - t_start)


def accuracy_at_steps(runs, steps: float) -> float:
    """Median over seeds of the accuracy at the last evaluation with at most ``steps`` optimizer steps."""
    accs = [max(((s, a) for _, s, a in pts if s <= steps), default=(0, math.nan))[1] for pts in runs]
    return statistics.median(accs)


def summarize(args, results, curves, total: float) -> None:
    rows, figures = [], {}
    for m in METHODS:
        bal = [r["balanced"] for r in results[m]]
        tail = [r["tail"] for r in results[m]]
        rows.append({"method": m, "balanced acc %": fmt_pm(bal), "tail acc %": fmt_pm(tail),
                     "head acc % (c0-2)": fmt_pm([statistics.fmean(r["class_acc"][:3]) for r in results[m]]),
                     "s/run": f"{statistics.median(r['wall'] for r in results[m]):.0f}"})
        (figures[f"balanced_acc_{m}"], figures[f"balanced_acc_std_{m}"]) = mean_std(bal)
        (figures[f"tail_acc_{m}"], figures[f"tail_acc_std_{m}"]) = mean_std(tail)
    table1 = print_table(rows, title=f"CIFAR-10-LT (ρ=100), test accuracy, mean ± std over {args.seeds} seed(s); "
                                     "tail = classes 7-9 (139/83/50 train images)")

    frac = float(getattr(args, "target_fraction", 0.8))
    target = frac * time_to_accuracy({"full": curves["full"]}, 0.0)["full"]["final"]
    tta = time_to_accuracy(curves, target)
    budget = statistics.median(v["total_steps"] for k, v in tta.items() if k != "full")
    rows2 = []
    for key, v in tta.items():
        at_budget = accuracy_at_steps(curves[key], budget)
        rows2.append({"run": key, "final acc %": f"{100 * v['final']:.1f}", "train s": f"{v['train_time']:.0f}",
                      "steps": f"{v['total_steps']:.0f}", f"acc % at {budget:.0f} steps": f"{100 * at_budget:.1f}",
                      "steps to target": "not reached" if math.isnan(v["steps"]) else f"{v['steps']:.0f}",
                      "s to target": "not reached" if math.isnan(v["time"]) else f"{v['time']:.0f}"})
        figures[f"tta_steps_{key}"], figures[f"tta_time_s_{key}"] = v["steps"], v["time"]
        figures[f"final_acc_{key}"], figures[f"train_time_s_{key}"] = v["final"], v["train_time"]
        figures[f"equal_budget_acc_{key}"] = at_budget
    figures["rs2_target_acc"], figures["rs2_budget_steps"] = target, budget
    table2 = print_table(rows2, title=f"RS2 vs full data (ERM) on CIFAR-10-LT: target = {100 * target:.1f} % balanced "
                                      f"acc on the 2k eval subset ({100 * frac:.0f} % of full-data final), medians over "
                                      f"seeds; evaluated every {getattr(args, 'eval_every', '?')} steps")
    plot(args, results, curves, target)
    print(f"total wall time {total:.0f}s")
    write_json(args.json, figures, tables=[table1, table2], results=results, curves=curves,
               config={k: str(v) for k, v in vars(args).items()}, wall_s=total)


if __name__ == "__main__":
    main()
