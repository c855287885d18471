"""2 processes (gloo) without Lightning: a plain loop with a ``Reweighter``; then the refusals that must stop
every rank together (one rank's bad input, one key on two ranks)."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_reweight import LossReweighting, Reweighter, StepInputError
from tests.doors._common import N, Tiny, data, spawn_gloo, train_on_shards


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test reads the type and message
        return f"{type(err).__name__}: {err}"
    return "ok"


def main(rank: int, world: int, out: Path) -> None:
    cb = LossReweighting("linupper", warmup_steps=2, num_samples=N, log_every_n_steps=1)
    module = Tiny()
    model = torch.nn.parallel.DistributedDataParallel(module)
    reweighter = Reweighter([cb], model=model)
    train_on_shards(reweighter, model, rank, world)
    x, y = data()
    torch.save({k: v.clone() for k, v in cb.table.state_dict()["columns"].items()}, out / f"table_{rank}.pt")
    before = cb.table["weight"].clone()
    results = {}
    # one rank's float index: that rank raises its TypeError, the other a StepInputError naming it
    index = torch.arange(4) + 4 * rank
    bad = index.float() if rank == 1 else index
    results["float_index"] = _outcome(lambda: reweighter.reduce(F.cross_entropy(model(x[index]), y[index],
                                                                                reduction="none"), bad))
    # one rank's (B, 2) index, then one rank's (B, 1) losses
    wide = torch.stack([index, index], 1) if rank == 0 else index
    results["wide_index"] = _outcome(lambda: reweighter.reduce(F.cross_entropy(model(x[index]), y[index],
                                                                               reduction="none"), wide))
    per_sample = F.cross_entropy(model(x[index]), y[index], reduction="none")
    column = per_sample[:, None] if rank == 1 else per_sample
    results["column_losses"] = _outcome(lambda: reweighter.reduce(column, index))
    # one rank's losses without gradient
    with torch.no_grad() if rank == 0 else torch.enable_grad():
        losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
    results["no_grad"] = _outcome(lambda: reweighter.reduce(losses, index))
    # every rank reads the same data: the same keys on both ranks
    same = torch.arange(4)
    results["same_keys"] = _outcome(lambda: reweighter.reduce(F.cross_entropy(model(x[same]), y[same],
                                                                              reduction="none"), same))
    results["unchanged"] = bool(torch.equal(before, cb.table["weight"]))
    assert StepInputError is not None
    (out / f"refusals_{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    spawn_gloo(main, Path(sys.argv[1]))
