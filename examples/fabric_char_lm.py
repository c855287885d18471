"""Train the character LM under Lightning Fabric with loss reweighting (a litgpt-style loop).

    python examples/fabric_char_lm.py --steps 200                 # one process
    python examples/fabric_char_lm.py --steps 200 --devices 2     # two CPU processes (DDP)
    python examples/fabric_char_lm.py --steps 400 --resume out/last.ckpt

The model is the library's ``CharTransformerLM``; its own ``training_step`` calls ``reduce_loss(self, ...)``,
which under Fabric runs the weighting callbacks passed to ``Fabric(callbacks=[...])``. Every sequence is a
window of the text keyed by its position, so ``LossReweighting`` keeps a per-window table; the
``WeightedSampler`` position, the table, the model and the optimizer are checkpointed with ``fabric.save`` and
resume exactly with ``fabric.load``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger

from lightning_reweight import LossReweighting, Reweighter, WeightedSampler
from lightning_reweight.data.text import CharWindows, load_text
from lightning_reweight.models import CharTransformerLM


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=None, help="a plain text file (default: Tiny Shakespeare)")
    parser.add_argument("--chars", type=int, default=200_000, help="use the first N characters")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--rule", default="linupper")
    parser.add_argument("--out", default="out/fabric_char_lm")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", default=None, help="a checkpoint written by this script")
    args = parser.parse_args(argv)

    out = Path(args.out)
    windows = CharWindows(load_text(args.text)[: args.chars], args.seq_len)
    reweight = LossReweighting(args.rule, warmup_steps=20, num_samples=len(windows), log_every_n_steps=10)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    callbacks=[reweight], loggers=[TensorBoardLogger(out, name="tb")])
    fabric.launch()
    fabric.seed_everything(0)
    # every rank draws its own share of one global permutation per epoch; Fabric's door advances its position
    sampler = WeightedSampler(torch.ones(len(windows)), replacement=False, seed=0)
    door = Reweighter.for_fabric(fabric, samplers=[sampler])
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    model = CharTransformerLM(d_model=args.d_model, n_layers=2, n_heads=4, max_len=args.seq_len,
                              sample_keys="exact")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer, "reweight": reweight, "sampler": sampler, "step": 0}
    if args.resume:
        fabric.load(args.resume, state)
    step = state["step"]
    model.train()
    while step < args.steps:
        sampler.set_epoch(sampler.epoch)  # the restored epoch, or the current one
        for batch in loader:
            batch = fabric.to_device(batch)
            loss = model.training_step(batch, step)  # reduce_loss inside, through the Fabric's callbacks
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.save_every == 0 or step == args.steps:
                state["step"] = step
                fabric.save(out / "last.ckpt", state)
            if step == args.steps:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    summary = {k: float(v) for k, v in door.metrics.items()}
    summary["steps"] = float(reweight.optimizer_steps)
    if fabric.is_global_zero:
        print(" ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())))
    return summary


if __name__ == "__main__":
    main()
