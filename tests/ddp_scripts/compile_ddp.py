"""2 processes (gloo), a plain loop with ``LossReweighting(compile=True)``: first both ranks compile; then rank 1's
compilation fails (no C++ compiler) and both ranks fall back to the eager code together."""

import json
import sys
import warnings
from pathlib import Path

import torch

from lightning_reweight import LossReweighting, Reweighter
from lightning_reweight._compile import CompileFallbackWarning
from tests.doors._common import N, Tiny, spawn_gloo, train_on_shards


def train(rank: int, world: int) -> tuple[LossReweighting, list[str]]:
    cb = LossReweighting("kl_dro", normalizer="ema", max_weight=3.0, num_samples=N, log_every_n_steps=0,
                         compile=True)
    model = torch.nn.parallel.DistributedDataParallel(Tiny())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileFallbackWarning)
        train_on_shards(Reweighter([cb], model=model), model, rank, world)
    return cb, [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]


def main(rank: int, world: int, out: Path) -> None:
    results = {}
    for phase in ("compiled", "rank1_fails"):
        if phase == "rank1_fails":
            torch._dynamo.reset()  # the compiled code of the first phase is not reused
            if rank == 1:
                torch._inductor.config.fx_graph_cache = False
                torch._inductor.config.cpp.cxx = ("/nonexistent/c++",)
        cb, warned = train(rank, world)
        torch.save({k: v.clone() for k, v in cb.table.state_dict()["columns"].items()}, out / f"{phase}_{rank}.pt")
        results[phase] = {"rule_compiled": cb._rule_graph.compiled, "table_compiled": cb.table.compiled.compiled,
                          "warnings": warned, "log_z": cb.rule.log_normalizer}
    (out / f"results_{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    spawn_gloo(main, Path(sys.argv[1]))
