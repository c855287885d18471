"""Step-time overhead of ``LossReweighting`` on the same model and data, in one run.

One Trainer run with ``LossReweighting`` (linupper, per-sample table, logging every 10 steps) attached, whose
training step alternates: even steps reduce with a plain ``losses.mean()``, odd steps through
``reduce_loss`` and the callback. Pairing steps inside one run cancels the slow drifts of a shared machine
(separate runs differed by 20 % on their own here). ``--repeats`` runs; the figure is the ratio of the
median reweighted step to the median plain step over all steps after warm-up. A second table times
the per-step table update at growing N to show it does not grow with the data set (O(batch) per step).

    python benchmarks/overhead.py [--quick] [--json PATH] [--accelerator cpu|gpu] [--no-sync-checks] [--compile MODE]

``--accelerator gpu`` (what ``benchmarks/gpu_check.sh`` passes) runs the same on one CUDA GPU: the step timer
synchronises the device at the start and end of each step, the per-sample table lives on the GPU (the device
path) and the ``reduce_loss`` and table-update probes time CUDA tensors. ``--no-sync-checks`` passes
``sync_checks=False``, so the callback reads nothing back to the host per step (see docs/getting-started.md, "On a GPU").
``--compile MODE`` passes ``compile=MODE`` (a ``torch.compile`` mode, e.g. ``default`` or ``reduce-overhead``): the rule
and the table's merge run compiled (docs/gpu.md); the compilation happens in the warm-up steps.

JSON figures: ``overhead_ratio`` (reweighted / plain median step time), ``reduce_loss_ms`` (the contract
path's own cost per call), ``implied_overhead_ratio`` (1 + that / plain step), ``table_update_ms_1e7``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_time, parser, print_table, save_plot, setup_threads, write_json  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                   help="'gpu': one CUDA device (step timer synchronises; table and probes on the GPU)")
    p.add_argument("--no-sync-checks", action="store_true",
                   help="LossReweighting(sync_checks=False): no host read of the validation results per step")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune",
                                                         "max-autotune-no-cudagraphs"],
                   help="LossReweighting(compile=MODE): the rule and the table's merge through torch.compile")
    args = p.parse_args()
    compile_mode = False if args.compile == "none" else args.compile
    args.steps += args.steps % 2  # even: as many plain as reweighted steps
    setup_threads(args.threads)
    if args.quick:
        args.repeats, args.steps = 2, 8

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import IndexedDataset, LossReweighting, SampleStateTable
    from lightning_reweight.models import ImageClassifier

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("overhead.py --accelerator gpu: no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = 4
    n = args.batch_size * (args.steps + warm)
    g = torch.Generator().manual_seed(0)
    data = IndexedDataset(TensorDataset(torch.randn(n, 3, args.image_size, args.image_size, generator=g),
                                        torch.randint(0, 10, (n,), generator=g)))

    class Alternating(ImageClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx % 2 == 1:
                return super().training_step(batch, batch_idx)
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self(x), y, reduction="none").mean()

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times: dict[int, list[float]] = {0: [], 1: []}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            if batch_idx >= warm:
                self.times[batch_idx % 2].append(time.perf_counter() - self._t)

    plain, reweighted, per_repeat = [], [], []
    for _ in range(args.repeats):
        pl.seed_everything(0, verbose=False)
        timer = StepTimer()
        callbacks = [LossReweighting("linupper", warmup_steps=0, log_every_n_steps=10,
                                     sync_checks=not args.no_sync_checks, compile=compile_mode), timer]
        trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps + warm, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks)
        model = Alternating(args.model, num_classes=10, in_chans=3, scheduler="none")
        trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=False))
        plain += timer.times[0]
        reweighted += timer.times[1]
        per_repeat.append(statistics.median(timer.times[1]) / statistics.median(timer.times[0]))
    ratio = statistics.median(reweighted) / statistics.median(plain)
    rows = [
        {"mode": "plain mean", "median step ms": f"{statistics.median(plain) * 1e3:.2f}",
         "steps": len(plain)},
        {"mode": "LossReweighting", "median step ms": f"{statistics.median(reweighted) * 1e3:.2f}",
         "steps": len(reweighted)},
    ]
    print("per-repeat ratios:", " ".join(f"{r:.4f}" for r in per_repeat))
    print_table(rows, f"Step time, {args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, "
                      f"{args.steps} steps x {args.repeats} repeats; overhead ratio {ratio:.4f}")

    # absolute cost of the contract path (gather is a no-op in one process): reduce_loss + callback hooks
    from lightning_reweight.callbacks.base import GlobalBatch  # noqa: F401  (documented type of the path)

    probe = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[LossReweighting("linupper", warmup_steps=0, num_samples=n,
                                                       sync_checks=not args.no_sync_checks,
                                                       compile=compile_mode)])
    mod = ImageClassifier(args.model, num_classes=10, in_chans=3, scheduler="none").to(device)
    probe.strategy.connect(mod)
    mod.trainer = probe
    probe.state.fn, probe.state.stage = "fit", "train"
    probe.training = True
    from lightning_reweight import reduce_loss

    losses = torch.rand(args.batch_size, generator=g).to(device).requires_grad_(True)
    index = torch.randperm(n, generator=g)[: args.batch_size].to(device)

    def call() -> None:
        reduce_loss(mod, losses, index)
        sync()

    call_ms = median_time(call, repeats=200, warmup=10) * 1e3
    est = 1 + call_ms / (statistics.median(plain) * 1e3)
    print(f"reduce_loss + LossReweighting per call: {call_ms:.3f} ms at batch {args.batch_size} "
          f"-> implied overhead ratio {est:.4f}")

    # per-step table update cost vs N (should be flat: O(batch), not O(N))
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    upd_rows, upd_ms = [], {}
    for size in sizes:
        table = SampleStateTable(size)
        if device.type != "cpu":
            table.to(device)
        idx = torch.randint(0, size, (args.batch_size,), generator=g).to(device)
        vals = torch.rand(args.batch_size, generator=g).to(device)

        def update(t=table, i=idx, v=vals) -> None:
            t.update(i, loss=v, ema_loss=v, weight=v)
            sync()

        t = median_time(update, repeats=50, warmup=5)
        upd_ms[size] = t * 1e3
        upd_rows.append({"N": f"{size:.0e}", "table MiB": f"{table.nbytes() / 2**20:.1f}",
                         "update ms / step": f"{t * 1e3:.3f}"})
    print_table(upd_rows, f"SampleStateTable.update, batch {args.batch_size}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.boxplot([[t * 1e3 for t in plain], [t * 1e3 for t in reweighted]], showfliers=False)
        ax.set_xticks([1, 2], ["plain", "LossReweighting"])
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"Training step time, plain mean vs LossReweighting (ratio {ratio:.3f})", fontsize=9)
        save_plot(fig, args.out, "overhead", quick=args.quick)
    except ImportError:
        print("matplotlib not installed: no plot")

    write_json(args.json, {"overhead_ratio": ratio, "plain_step_ms": statistics.median(plain) * 1e3,
                           "reweighted_step_ms": statistics.median(reweighted) * 1e3,
                           "table_update_ms_1e7": upd_ms.get(10**7, float("nan")),
                           "reduce_loss_ms": call_ms, "implied_overhead_ratio": est},
               table=rows + upd_rows, args=vars(args), device=str(device),
               device_name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")


if __name__ == "__main__":
    main()
