"""Shared benchmark plumbing: the ``--quick`` / ``--json`` / ``--out`` convention, tables, timing, plots.

Every benchmark::

    python benchmarks/NAME.py [--quick] [--json PATH] [--out DIR] [--seeds N]

prints a table, writes ``{"figures": {name: number}, "table": [...], "meta": {...}}`` to ``--json``, and
saves PNG plots under ``--out`` (default ``benchmarks/results/``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run (under a minute)")
    p.add_argument("--json", type=Path, default=None, help="write {'figures': {...}, ...} here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for PNG plots")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p


def setup_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def print_table(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """Print rows (dicts with the same keys) as an aligned text table; returns the text."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = ("\n" + title + "\n" if title else "\n") + "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path | None, figures: dict[str, float], **extra: Any) -> None:
    if path is None:
        return
    payload = {"figures": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in figures.items()},
               "meta": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}}
    payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def plot_path(out: Path, name: str, quick: bool) -> Path:
    """Where a plot goes: ``OUT/NAME.png``, or ``OUT/NAME_quick.png`` for a ``--quick`` run, so a smoke run never
    overwrites the plot of a full run."""
    return Path(out) / f"{name}{'_quick' if quick else ''}.png"


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """A legend to the right of the axes, so it never covers bars or curves (``save_plot`` keeps it in the file)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def save_plot(fig: Any, out: Path, name: str, *, quick: bool) -> Path:
    """Save ``fig`` as ``plot_path(out, name, quick)``. Every plot has a title and units on its axes; scores are
    in %."""
    path = plot_path(out, name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
    return path


class Progress:
    """One line per stage with the elapsed time, so long runs show they are alive::

        progress = Progress("tta")
        progress("training the source model")      # [tta    0.0s] training the source model
        ...
        progress.done()                            # [tta  412.3s] done
    """

    def __init__(self, name: str):
        self.name = name
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.name} {self.elapsed:7.1f}s] {message}", flush=True)

    def done(self) -> None:
        self("done")
