"""A one-device fit with every weighting callback and the WeightedSampler: step time and host syncs per step.

One short ``Trainer.fit`` per configuration — ``LossReweighting`` (LinUpper, and KL-DRO with the EMA
normaliser), ``GroupDRO``, ``FairErrorBoundScaling``, ``AdaWAC`` (a noise-consistency second loss),
``GroupBalancing`` (upweight and upsample), ``ImportanceSampling`` and a ``WeightedSampler`` resumed by
``SamplerState`` — on a tiny MLP over synthetic grouped data, on ``--device`` (``cuda`` by default, ``cpu``
for the smoke run that ``gpu_check.sh --cpu-smoke`` makes). On CUDA, ``torch.cuda.set_sync_debug_mode("warn")``
is on during the training steps and every host synchronisation warning is counted per step (Lightning's own
syncs included: compare with the ``plain mean`` row, which runs no callback). On CUDA every weighting
configuration runs a second time with ``sync_checks=False`` (figures suffixed ``_nosync``): the callbacks
defer their validation read-backs, so a step of theirs adds no host sync.

    python benchmarks/gpu_fit.py [--device cuda|cpu] [--steps S] [--batch-size B] [--json PATH] [--quick]

JSON figures: ``step_ms_<config>`` (median step time after warm-up), ``syncs_per_step_<config>`` (median
host syncs per step; CUDA only), ``ok_<config>`` (1 if the fit finished); ``failed`` lists the errors and
``sync_sites`` the Python lines (``file:line``) that synchronised, with counts over all steps.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, print_table, setup_threads, write_json  # noqa: E402

CONFIGS = ["plain mean", "LossReweighting", "LossReweighting kl_dro", "GroupDRO", "FairErrorBoundScaling",
           "GroupBalancing upweight", "GroupBalancing upsample", "ImportanceSampling", "AdaWAC",
           "WeightedSampler + SamplerState"]
SYNC_MESSAGE = "synchronizing"  # torch's sync-debug warning: "called a synchronizing CUDA operation"


NO_SYNC = " (sync_checks=False)"  # config-name suffix: the callbacks defer their checks (no host sync per step)


def _callbacks(name: str) -> list[Any]:
    if name.endswith(NO_SYNC):
        return [_with_deferred_checks(cb) for cb in _callbacks(name[: -len(NO_SYNC)])]
    from lightning_reweight import (
        AdaWAC,
        FairErrorBoundScaling,
        GroupBalancing,
        GroupDRO,
        ImportanceSampling,
        LossReweighting,
        SamplerState,
    )

    return {
        "plain mean": [],
        "LossReweighting": [LossReweighting("linupper", warmup_steps=0, log_every_n_steps=10)],
        "LossReweighting kl_dro": [LossReweighting("kl_dro", normalizer="ema", warmup_steps=0,
                                                   log_every_n_steps=10)],
        "GroupDRO": [GroupDRO(step_size=0.1, log_every_n_steps=10)],
        "FairErrorBoundScaling": [FairErrorBoundScaling(log_every_n_steps=10)],
        "GroupBalancing upweight": [GroupBalancing(mode="upweight", log_every_n_steps=10)],
        "GroupBalancing upsample": [GroupBalancing(mode="upsample", log_every_n_steps=10)],
        "ImportanceSampling": [ImportanceSampling(refresh_unit="step", refresh_every=5, log_every_n_steps=10)],
        "AdaWAC": [AdaWAC(eta=2.0, log_every_n_steps=10)],
        "WeightedSampler + SamplerState": [SamplerState()],
    }[name]


def _with_deferred_checks(cb: Any) -> Any:
    if hasattr(cb, "sync_checks"):
        cb.sync_checks = False
    return cb


def run(device: str, steps: int, batch_size: int, n: int = 4096, configs: list[str] | None = None
        ) -> dict[str, dict[str, Any]]:
    """Fit every configuration; returns ``{config: {"ok", "step_ms", "syncs_per_step", "error"}}``."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import IndexedDataset, WeightedSampler, reduce_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    groups = torch.randint(0, 4, (n,), generator=g)
    y = ((x[:, 0] > 0).long() + 2 * (groups % 2)) % 3  # learnable, group-dependent
    dataset = IndexedDataset(TensorDataset(x, y), groups=groups, targets=y)
    cuda = device == "cuda"

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb, index, group = batch
            z = self.net(xb)
            losses = F.cross_entropy(z, yb, reduction="none")
            proxy = (z.softmax(-1) - F.one_hot(yb, 3).to(z.dtype)).norm(dim=-1).detach()
            consistency = (z - self.net(xb + 0.01 * torch.randn_like(xb))).pow(2).mean(1)  # AdaWAC's 2nd term
            return reduce_loss(self, losses, index, group=group, target=yb, grad_norm_proxy=proxy,
                               consistency=consistency)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class StepProbe(pl.Callback):
        """Times each training step and counts the sync-debug warnings raised inside it."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.syncs: list[int] = []
            self.sites: dict[str, int] = {}  # "file:line" of the Python line that synchronised -> count

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if cuda:
                torch.cuda.synchronize()
                self._catch = warnings.catch_warnings(record=True)
                self._records = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                self._catch.__exit__(None, None, None)
                hits = [r for r in self._records if SYNC_MESSAGE in str(r.message)]
                self.syncs.append(len(hits))
                for r in hits:
                    site = f"{Path(r.filename).name}:{r.lineno}"
                    self.sites[site] = self.sites.get(site, 0) + 1
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    results: dict[str, dict[str, Any]] = {}
    for name in configs or CONFIGS + [c + NO_SYNC for c in CONFIGS[1:-1]] * cuda:
        t0 = time.perf_counter()
        print(f"[gpu_fit] {name} on {device}: {steps} steps ...", flush=True)
        pl.seed_everything(0, verbose=False)
        probe = StepProbe()
        if name == "WeightedSampler + SamplerState":
            sampler = WeightedSampler(1.0 + groups.double(), num_samples=steps * batch_size, seed=0)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        try:
            trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=steps, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 use_distributed_sampler=False, callbacks=[*_callbacks(name), probe])
            trainer.fit(Tiny(), loader)
            warm = min(5, max(len(probe.times) - 1, 0))
            results[name] = {
                "ok": True,
                "steps": len(probe.times),
                "step_ms": statistics.median(probe.times[warm:]) * 1e3 if probe.times else float("nan"),
                "syncs_per_step": statistics.median(probe.syncs[warm:]) if probe.syncs else None,
                "sync_sites": dict(sorted(probe.sites.items(), key=lambda kv: -kv[1])[:8]),
                "error": None,
            }
        except Exception as err:  # noqa: BLE001  (report every configuration, then fail at the end)
            traceback.print_exc()
            results[name] = {"ok": False, "steps": len(probe.times), "step_ms": float("nan"),
                             "syncs_per_step": None, "sync_sites": dict(probe.sites),
                             "error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        print(f"[gpu_fit] {name}: {'ok' if results[name]['ok'] else 'FAILED'} in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return results


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    setup_threads(args.threads)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_fit.py: Expected a CUDA device for --device cuda, but torch.cuda.is_available() is False;"
                 " run on a GPU machine or pass --device cpu.")
    if args.quick:
        args.steps = min(args.steps, 8)
    results = run(args.device, args.steps, args.batch_size)
    rows = [{"config": name, "ok": "yes" if r["ok"] else "NO", "steps": r["steps"],
             "median step ms": f"{r['step_ms']:.2f}" if r["step_ms"] == r["step_ms"] else "—",
             "host syncs / step": "—" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:g}"}
            for name, r in results.items()]
    print_table(rows, f"One-device fit on {args.device}, batch {args.batch_size}, {args.steps} steps per config")
    figures: dict[str, float] = {}
    for name, r in results.items():
        key = name.replace(NO_SYNC, "_nosync").replace(" + ", "_").replace(" ", "_")
        figures[f"ok_{key}"] = 1.0 if r["ok"] else 0.0
        figures[f"step_ms_{key}"] = r["step_ms"]
        if r["syncs_per_step"] is not None:
            figures[f"syncs_per_step_{key}"] = float(r["syncs_per_step"])
    failed = {name: r["error"] for name, r in results.items() if not r["ok"]}
    meta: dict[str, Any] = {"device": args.device, "steps": args.steps, "batch_size": args.batch_size}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    sites = {name: r["sync_sites"] for name, r in results.items() if r.get("sync_sites")}
    for name, where in sites.items():
        print(f"host syncs of '{name}' (all steps, by Python line): {where}")
    write_json(args.json, figures, table=rows, failed=failed, meta_fit=meta, sync_sites=sites)
    if failed:
        sys.exit(f"gpu_fit.py: {len(failed)} configuration(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
