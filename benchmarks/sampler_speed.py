"""Time to draw one epoch of N weighted indices: ours vs torch's WeightedRandomSampler vs numpy, same run.

With replacement, N draws from N random weights, at N = 1e6, 1e7, 1e8 (``--quick``: 1e5, 1e6):

* ``ours (cold)``: ``draw_weighted(weights, N, generator)`` — alias table built from scratch (one compiled O(N) sweep)
  plus N O(1) draws; what an epoch costs when the weights changed since the last epoch.
* ``ours (cached table)``: ``draw_alias(table, N, generator)`` — the epoch cost of a ``WeightedSampler`` whose
  weights did not change (it keeps the table).
* ``ours: table build only``: the alias-table construction alone (where the cold time goes: cold − cached).
* ``torch WRS``: ``torch.multinomial(weights_float64, N, True, generator=...)``, the call
  ``torch.utils.data.WeightedRandomSampler.__iter__`` makes (it refuses more than 2^24 categories).
* ``numpy choice``: ``np.random.default_rng().choice(N, N, p=p)``. At 1e8 it takes minutes, so it runs only
  with ``--numpy-1e8``.

Python-side iteration (``.tolist()``), identical for all samplers, is excluded; a second table adds it for
``list(sampler)`` of both samplers (N ≤ 1e7). A third table times draws WITHOUT replacement (a full weighted
permutation, N ≤ 1e6): ours (exponential keys + sort) vs ``torch.multinomial(..., replacement=False)`` vs numpy.
Methods are interleaved within each repeat (round robin) to cancel drifts of a shared machine; figures are
medians of the repeats and ratios come from the same run. The last column checks exactness: total-variation
distance between the empirical draw frequencies (100 equal-width index bins) and the target.

    python benchmarks/sampler_speed.py [--quick] [--json PATH] [--out DIR] [--repeats R] [--numpy-1e8] [--sizes 1e6,1e7]

JSON figures: ``speedup_cold_1e7`` (torch WRS / ours cold, the issue-13 target: >= 10), ``speedup_cached_1e7``
(torch WRS / ours with the table cached), the same two from CPU time (``..._cpu``: steadier on a shared
machine), ``seconds_build_1e6|1e7|1e8`` (table build alone), ``speedup_vs_torch_1e7`` (torch WRS / ours with the table cached: a ``WeightedSampler`` epoch
whose weights did not change, the analogue of a ``WeightedRandomSampler`` epoch), ``speedup_vs_torch_1e7_cold``
(table rebuilt: weights changed), ``speedup_vs_numpy_1e7[_cold]``, ``seconds_1e8`` (ours cold at 1e8: build +
draw), ``seconds_1e8_cached``, ``speedup_e2e_1e6|1e7`` (``list(sampler)``), ``speedup_noreplace_vs_torch_1e6``,
``seconds_first_draw`` (the first small draw in a fresh process: numba's import and kernel cache, median of
3 processes), ``peak_rss_gib`` (the benchmark process's peak memory, all methods and kept outputs included), and the same
figures at 1e6 (``--quick``: 1e5 and 1e6).
Scale-down: single thread (``OMP_NUM_THREADS=1``), 3 repeats at 1e7, 1 at 1e8. A progress line per stage
(and per timed call) shows the elapsed time; the full run takes several minutes.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import legend_outside, parser, print_table, save_plot, setup_threads, write_json  # noqa: E402

_START = time.perf_counter()


def _progress(message: str) -> None:
    """One line per stage with the elapsed time: the full run takes minutes."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU seconds of ``fn()`` (CPU time is steadier than wall time on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _tv_binned(indices: Any, probs: Any, bins: int = 100) -> float:
    import torch

    n = probs.numel()
    edges = torch.div(indices.to(torch.int64) * bins, n, rounding_mode="floor")
    emp = torch.bincount(edges, minlength=bins).double() / indices.numel()
    target = torch.zeros(bins, dtype=torch.float64).index_add_(
        0, torch.div(torch.arange(n) * bins, n, rounding_mode="floor"), probs.double())
    return 0.5 * float((emp - target / target.sum()).abs().sum())


def _round_robin(methods: dict[str, Callable[[], Any]], repeats: int, label: str = "") -> dict[str, dict[str, Any]]:
    """Run each method once per repeat, in turn; keep the median time and the first output's TV check."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    status: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    for rep in range(repeats):
        for name, fn in methods.items():
            if name in status:
                continue
            try:
                t, c, out = _timed(fn)
            except (RuntimeError, ValueError, MemoryError) as err:
                status[name] = "refused: " + str(err).split("\n")[0][:60]
                _progress(f"{label} {name}: {status[name]}")
                continue
            _progress(f"{label} repeat {rep + 1}/{repeats} {name}: {t:.3f} s (cpu {c:.3f} s)")
            times[name].append(t)
            cpu[name].append(c)
            if name not in outputs:
                outputs[name] = out
            del out
            gc.collect()
    nan = float("nan")
    return {name: {"seconds": statistics.median(times[name]) if times[name] else nan,
                   "cpu_seconds": statistics.median(cpu[name]) if cpu[name] else nan,
                   "status": status.get(name, "ok"), "output": outputs.get(name)} for name in methods}


def _first_draw_seconds() -> float:
    """Seconds of the first small ``draw_weighted`` in a fresh interpreter (imports excluded): on CPU that is
    numba's import plus loading the compiled kernels from its disk cache (or compiling them)."""
    import subprocess

    code = ("import time, torch; from lightning_reweight.samplers import draw_weighted; t = time.perf_counter();"
            " draw_weighted(torch.rand(1000), 100, torch.Generator()); print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _fmt(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds:.3f}"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="repeats per size (default 5 / 3 / 1 by size)")
    p.add_argument("--numpy-1e8", action="store_true", help="also time numpy at 1e8 (minutes)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated N to time instead of the default (e.g. '1e6,1e7'; a short GPU-machine run)")
    args = p.parse_args()
    setup_threads(args.threads)
    import numpy as np
    import torch

    from lightning_reweight.samplers.core import (
        WeightedSampler,
        _build_alias_table,
        draw_alias,
        draw_weighted,
    )

    sizes = [10**5, 10**6] if args.quick else [10**6, 10**7, 10**8]
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    rows, figures, series = [], {}, {}
    _progress(f"sizes {sizes}, {args.threads} thread(s)")
    for n in sizes:
        repeats = args.repeats or (3 if args.quick else 5 if n <= 10**6 else 3 if n <= 10**7 else 1)
        _progress(f"N = {n:.0e}: {repeats} repeat(s) of each method, round robin")
        weights = torch.rand(n, generator=torch.Generator().manual_seed(0))
        w64 = weights.double()
        table = _build_alias_table(weights)
        gen = torch.Generator().manual_seed(1)
        methods: dict[str, Callable[[], Any]] = {
            "ours (cold)": lambda w=weights, n=n, g=gen: draw_weighted(w, n, g),
            "ours (cached table)": lambda t=table, n=n, g=gen: draw_alias(t, n, g),
            "ours: table build only": lambda w=weights: _build_alias_table(w) and None,
            "torch WRS": lambda w=w64, n=n, g=gen: torch.multinomial(w, n, True, generator=g),
        }
        if n < 10**8 or args.numpy_1e8:
            p_np = (w64 / w64.sum()).numpy()
            rng = np.random.default_rng(1)
            methods["numpy choice"] = lambda r=rng, n=n, p=p_np: torch.from_numpy(r.choice(n, size=n, p=p))
        results = _round_robin(methods, repeats, f"N = {n:.0e}")
        if "numpy choice" not in methods:
            results["numpy choice"] = {"seconds": float("nan"), "cpu_seconds": float("nan"),
                                       "status": "skipped (minutes; --numpy-1e8)", "output": None}
        ours = results["ours (cold)"]["seconds"]
        for name, r in results.items():
            tv = _tv_binned(r["output"], weights) if r["output"] is not None else float("nan")
            r["output"] = None
            speed = ours / r["seconds"] if r["seconds"] == r["seconds"] else float("nan")
            rows.append({"N": f"{n:.0e}", "method": name, "seconds (median)": _fmt(r["seconds"]),
                         "cpu s (median)": _fmt(r["cpu_seconds"]),
                         "x vs ours cold": "—" if speed != speed else f"{1 / speed:.1f}" if name != "ours (cold)" else "1.0",
                         "status": r["status"], "TV (100 bins)": "—" if tv != tv else f"{tv:.1e}"})
            if name != "ours: table build only":
                series.setdefault(name, []).append((n, r["seconds"]))
        tag = f"1e{len(str(n)) - 1}"
        torch_s, numpy_s = results["torch WRS"]["seconds"], results["numpy choice"]["seconds"]
        cached = results["ours (cached table)"]["seconds"]
        if torch_s == torch_s:
            figures[f"speedup_vs_torch_{tag}"] = torch_s / cached
            figures[f"speedup_vs_torch_{tag}_cold"] = torch_s / ours
            figures[f"speedup_cold_{tag}"] = torch_s / ours
            figures[f"speedup_cached_{tag}"] = torch_s / cached
            torch_cpu = results["torch WRS"]["cpu_seconds"]
            figures[f"speedup_cold_{tag}_cpu"] = torch_cpu / results["ours (cold)"]["cpu_seconds"]
            figures[f"speedup_cached_{tag}_cpu"] = torch_cpu / results["ours (cached table)"]["cpu_seconds"]
        figures[f"seconds_build_{tag}"] = results["ours: table build only"]["seconds"]
        if numpy_s == numpy_s:
            figures[f"speedup_vs_numpy_{tag}"] = numpy_s / cached
            figures[f"speedup_vs_numpy_{tag}_cold"] = numpy_s / ours
        if n == 10**8:
            figures["seconds_1e8"] = ours
            figures["seconds_1e8_cached"] = results["ours (cached table)"]["seconds"]
        del table, results, methods
        gc.collect()
    print_table(rows, "With replacement: one epoch of N draws (kernel only)")

    # end to end: list(sampler), Python iteration included
    e2e = []
    for n in [s for s in sizes if s <= 10**7]:
        _progress(f"end to end, N = {n:.0e}: list(sampler), 3 repeats")
        weights = torch.rand(n, generator=torch.Generator().manual_seed(0))
        ours_sampler = WeightedSampler(weights, seed=0)
        list(ours_sampler)  # build the cached table once, as in training after the first epoch
        theirs = torch.utils.data.WeightedRandomSampler(weights, n, replacement=True)
        res = _round_robin({"WeightedSampler": lambda s=ours_sampler: len(list(s)),
                            "WeightedRandomSampler": lambda s=theirs: len(list(s))}, 3, f"e2e N = {n:.0e}")
        a, b = res["WeightedSampler"]["seconds"], res["WeightedRandomSampler"]["seconds"]
        e2e.append({"N": f"{n:.0e}", "WeightedSampler list()": _fmt(a), "WeightedRandomSampler list()": _fmt(b),
                    "speedup": f"{b / a:.1f}"})
        figures[f"speedup_e2e_1e{len(str(n)) - 1}"] = b / a
    print_table(e2e, "End to end: list(sampler) per epoch, Python iteration included (ours: table cached)")

    # without replacement: a full weighted permutation
    worep = []
    for n in [s for s in [10**5, 10**6] if s <= max(sizes)]:
        _progress(f"without replacement, N = {n:.0e}: 3 repeats")
        weights = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 1e-3
        gen = torch.Generator().manual_seed(2)
        rng = np.random.default_rng(2)
        p_np = (weights.double() / weights.double().sum()).numpy()
        w64 = weights.double()
        methods = {"ours (exp. keys)": lambda w=weights, n=n, g=gen: draw_weighted(w, n, g, replacement=False),
                   "torch WRS (replacement=False)":
                       lambda w=w64, n=n, g=gen: torch.multinomial(w, n, False, generator=g)}
        if n <= 10**5:
            methods["numpy choice (replace=False)"] = lambda r=rng, n=n, p=p_np: r.choice(n, size=n, replace=False, p=p)
        res = _round_robin(methods, 3, f"no-replacement N = {n:.0e}")
        ours = res["ours (exp. keys)"]["seconds"]
        for name, r in res.items():
            worep.append({"N": f"{n:.0e}", "method": name, "seconds (median)": _fmt(r["seconds"]),
                          "x vs ours": "1.0" if name.startswith("ours") else f"{r['seconds'] / ours:.1f}",
                          "status": r["status"]})
        if n == 10**6:
            figures["speedup_noreplace_vs_torch_1e6"] = res["torch WRS (replacement=False)"]["seconds"] / ours
    print_table(worep, "Without replacement: a full weighted permutation of N")

    _progress("first draw in a fresh process (numba import + compile cache), 3 processes")
    first = [_first_draw_seconds() for _ in range(3)]
    figures["seconds_first_draw"] = statistics.median(first)
    print(f"\nfirst small draw in a fresh process (median of 3): {figures['seconds_first_draw']:.2f} s")

    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\nfigures:", {k: round(v, 3) for k, v in figures.items()})
    write_json(args.json, figures, table=rows, end_to_end=e2e, without_replacement=worep,
               meta_bench={"sizes": sizes, "threads": args.threads})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in series.items():
            pts = [(x, y) for x, y in pts if y == y]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        ax.axvline(2**24, color="gray", linestyle=":", label="2^24 (torch limit)")
        ax.set(xscale="log", yscale="log", xlabel="N (draws = weights)", ylabel="time per epoch (s, median, log scale)",
               title="Weighted draws with replacement, 1 thread")
        legend_outside(ax)
        save_plot(fig, args.out, "sampler_speed", quick=args.quick)
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
