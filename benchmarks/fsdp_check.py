"""Check that ``reduce_loss`` gives the same weighted mean under Lightning's FSDP strategy as under DDP (GPU).

Lightning refuses ``strategy="fsdp"`` with ``accelerator="cpu"``, and torch's FSDP itself raises "FSDP needs a
non-CPU accelerator device", so this check needs CUDA GPUs (it uses all visible ones, 1 or more). It trains the
same small MLP on the same data with ``LossReweighting("linupper", warmup_steps=0, track_samples=False)``
twice, once with ``strategy="ddp"`` and once with ``strategy="fsdp"``, and compares per step:

* the global weighted mean — the rank-mean of what ``reduce_loss`` returned (``(W/B)·Σ_local w·ℓ`` per rank);
* the weights the callback used (identical on every rank by construction);
* the parameters after training (FSDP's full state dict).

Each strategy runs in its own process tree (Lightning relaunches the script per rank); the driver compares.

    python benchmarks/fsdp_check.py [--json PATH] [--steps 5] [--tol 1e-5]

Exit status 0 when every difference is within ``--tol``, 1 otherwise, 2 when no GPU is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train(strategy: str, out: Path, steps: int) -> None:
    """One run (called once per rank by Lightning's launcher); rank 0 writes ``out/<strategy>.pt``."""
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import LossReweighting, reduce_loss

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
            self.means: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            loss = reduce_loss(self, losses)
            mean = loss.detach().clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            self.means.append(float(mean))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Weights(pl.Callback):
        def __init__(self, cb):
            self.cb, self.seen = cb, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(self.cb.last_weights.clone())

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(512, 8, generator=g), torch.randint(0, 4, (512,), generator=g))
    cb = LossReweighting("linupper", warmup_steps=0, track_samples=False, log_every_n_steps=0)
    spy = Weights(cb)
    model = MLP()
    trainer = pl.Trainer(accelerator="cuda", devices=-1, strategy=strategy, max_steps=steps, callbacks=[cb, spy],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="32-true")
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=False))
    state = trainer.strategy.lightning_module_state_dict()  # FSDP: the full (gathered) state dict
    if trainer.global_rank == 0:
        torch.save({"means": model.means, "weights": spy.seen, "world_size": trainer.world_size,
                    "params": {k: v.detach().float().cpu() for k, v in state.items()}}, out / f"{strategy}.pt")


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.strategy is not None:
        train(args.strategy, args.out, args.steps)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU: Lightning's FSDP strategy needs one (it refuses accelerator='cpu'). Nothing checked.")
        return 2
    out = Path(tempfile.mkdtemp(prefix="fsdp_check_"))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    for strategy in ("ddp", "fsdp"):
        subprocess.run([sys.executable, __file__, "--strategy", strategy, "--out", str(out),
                        "--steps", str(args.steps)], check=True, env=env)
    ddp = torch.load(out / "ddp.pt", weights_only=False)
    fsdp = torch.load(out / "fsdp.pt", weights_only=False)
    diffs = {
        "weighted_mean": max(abs(a - b) for a, b in zip(ddp["means"], fsdp["means"])),
        "weights": max(float((a - b).abs().max()) for a, b in zip(ddp["weights"], fsdp["weights"])),
        "params": max(float((ddp["params"][k] - fsdp["params"][k]).abs().max()) for k in ddp["params"]),
    }
    ok = (len(ddp["means"]) == len(fsdp["means"]) == args.steps and set(ddp["params"]) == set(fsdp["params"])
          and all(v <= args.tol for v in diffs.values()))
    print(f"world size {ddp['world_size']}, {args.steps} steps; max |DDP - FSDP|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f" -> {'OK' if ok else 'MISMATCH'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": {f"fsdp_max_abs_diff_{k}": v for k, v in diffs.items()},
                                         "world_size": ddp["world_size"], "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
