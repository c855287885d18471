"""Checkpoint cost of per-sample state: save and load time, file size and peak extra memory.

The state of ``LossReweighting`` (its ``SampleStateTable``: loss, ema_loss, weight float32 + count int64)
and of a ``WeightedSampler`` over the same N items, saved and loaded the way Lightning does
(``torch.save`` / ``torch.load`` of the checkpoint dict, then ``load_state_dict`` and the table's first
use). Each N runs in its own subprocess, so the peak resident memory (``VmHWM`` of ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` before each phase; torch tensors are invisible to tracemalloc) is
that phase's own. "peak extra" is the peak RSS above the RSS before the phase, minus the bytes the phase
must hold (load: the restored table and sampler weights). Two code paths, in the same run:

* ``before``: the previous implementation, re-enacted here (``state_dict`` cloned every column; a restore
  allocated a fresh table and copied the checkpointed columns into it),
* ``after``: the library as it is (the checkpoint holds the live columns; a restore adopts the loaded tensors).

    python benchmarks/checkpoint.py [--quick] [--json PATH]

JSON figures: ``save_seconds_<N>``, ``load_seconds_<N>``, ``peak_extra_bytes_<N>`` (the larger of save and
load), ``file_bytes_<N>`` for the current code (N as ``1e6``, ``1e7``, ``1e8``; 1e8 only without ``--quick``),
and the same with a ``before_`` prefix for the re-enacted previous code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import legend_outside, parser, print_table, save_plot, setup_threads, write_json  # noqa: E402


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def worker(n: int, mode: str, folder: Path) -> dict:
    """One N, one code path: build the state, save it, drop it, load it back. Returns the measurements."""
    import gc

    import torch

    from lightning_reweight import LossReweighting
    from lightning_reweight.samplers import WeightedSampler
    from lightning_reweight.state import SampleStateTable

    g = torch.Generator().manual_seed(0)
    cb = LossReweighting("linupper", num_samples=n, log_every_n_steps=0)
    cb.table = SampleStateTable(n)
    for _ in range(3):  # a few realistic updates (the contents do not change the cost)
        idx = torch.randint(0, n, (4096,), generator=g)
        v = torch.rand(4096, generator=g)
        cb.table.update(idx, loss=v, ema_loss=v, weight=v + 0.5)
    sampler = WeightedSampler(torch.rand(n, generator=g, dtype=torch.float64) + 0.1, seed=0)
    path = folder / f"ckpt_{mode}_{n}.pt"

    def old_state_dict():  # the previous SampleStateTable.state_dict: one clone per column
        sd = cb.state_dict()
        sd["table"] = dict(sd["table"], columns={k: v.clone() for k, v in sd["table"]["columns"].items()})
        return sd

    gc.collect()
    rss0 = _vm("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    checkpoint = {"callbacks": {cb.state_key: old_state_dict() if mode == "before" else cb.state_dict(),
                                "SamplerState": {"samplers": [sampler.state_dict()]}}}
    torch.save(checkpoint, path)
    save_s = time.perf_counter() - t0
    save_extra = _vm("VmHWM") - rss0
    del checkpoint
    held = cb.table.nbytes() + sampler.state_dict()["weights"].numel() * 8
    cb.table = None
    del sampler
    gc.collect()

    fresh = LossReweighting("linupper", num_samples=n, log_every_n_steps=0)
    fresh_sampler = WeightedSampler(torch.ones(1, dtype=torch.float64))  # placeholder: no O(N) memory
    gc.collect()
    rss0 = _vm("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    loaded = torch.load(path, weights_only=False)
    state = loaded["callbacks"][fresh.state_key]
    if mode == "before":  # the previous restore: allocate a fresh table, copy every column into it
        table = SampleStateTable(n)
        for k, v in state["table"]["columns"].items():
            table.columns[k] = v.clone().to(table.columns[k].dtype)
        fresh.table = table
    else:
        fresh.load_state_dict(state)
        fresh.ensure_table(None)
    weights = loaded["callbacks"]["SamplerState"]["samplers"][0]["weights"]
    fresh_sampler._weights = weights  # what WeightedSampler.load_state_dict keeps (its validation aside)
    del loaded, state
    gc.collect()
    load_s = time.perf_counter() - t0
    load_extra = _vm("VmHWM") - rss0 - held
    assert fresh.table.num_samples == n
    size = path.stat().st_size
    path.unlink()
    return {"n": n, "mode": mode, "save_s": save_s, "load_s": load_s, "save_extra": save_extra,
            "load_extra": load_extra, "file_bytes": size, "state_bytes": held}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, default=None, help=argparse_hidden())
    args = p.parse_args()
    setup_threads(args.threads)
    if args.worker:
        n, mode, out = int(args.worker[0]), args.worker[1], Path(args.worker[2])
        with tempfile.TemporaryDirectory(dir=os.environ.get("CKPT_BENCH_DIR")) as d:
            out.write_text(json.dumps(worker(n, mode, Path(d))))
        return

    sizes = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            for mode in ("before", "after"):
                out = Path(d) / f"{mode}_{n}.json"
                cmd = [sys.executable, __file__, "--worker", str(n), mode, str(out), "--threads", str(args.threads)]
                subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
                results.append(json.loads(out.read_text()))

    def gib(b: float) -> str:
        return f"{b / 2**30:.3f}"

    rows = [{"N": f"{r['n']:.0e}", "code": r["mode"], "save s": f"{r['save_s']:.3f}", "load s": f"{r['load_s']:.3f}",
             "file GiB": gib(r["file_bytes"]), "state GiB": gib(r["state_bytes"]),
             "save peak extra GiB": gib(r["save_extra"]), "load peak extra GiB": gib(r["load_extra"])}
            for r in results]
    print_table(rows, "Checkpoint of LossReweighting table + WeightedSampler state (one process per N)")

    figures = {}
    for r in results:
        tag = f"{r['n']:.0e}".replace("+0", "")
        prefix = "" if r["mode"] == "after" else "before_"
        figures[f"{prefix}save_seconds_{tag}"] = r["save_s"]
        figures[f"{prefix}load_seconds_{tag}"] = r["load_s"]
        figures[f"{prefix}peak_extra_bytes_{tag}"] = max(r["save_extra"], r["load_extra"])
        figures[f"{prefix}file_bytes_{tag}"] = r["file_bytes"]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for mode, style in (("before", "o--"), ("after", "s-")):
            rs = [r for r in results if r["mode"] == mode]
            ns = [r["n"] for r in rs]
            axes[0].loglog(ns, [r["save_s"] for r in rs], style, label=f"save ({mode})")
            axes[0].loglog(ns, [r["load_s"] for r in rs], style, alpha=0.5, label=f"load ({mode})")
            axes[1].semilogx(ns, [max(r["save_extra"], r["load_extra"]) / 2**30 for r in rs], style, label=mode)
        axes[0].set(xlabel="N (samples in the table)", ylabel="time (s, log scale)",
                    title="Checkpoint save and load time")
        axes[1].set(xlabel="N (samples in the table)", ylabel="peak extra memory (GiB)",
                    title="Peak memory above what the phase holds")
        legend_outside(axes[0])
        legend_outside(axes[1])
        fig.tight_layout()
        save_plot(fig, args.out, "checkpoint", quick=args.quick)
    except ImportError:
        print("matplotlib not installed: no plot")

    write_json(args.json, figures, table=rows, args={k: str(v) for k, v in vars(args).items()})


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
