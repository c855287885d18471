"""Benchmark plots: a ``--quick`` run writes ``NAME_quick.png`` (never the full run's file), legends sit outside
the axes, and every script's plot call passes ``quick`` and labels its axes and title."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks._common import legend_outside, plot_path, save_plot

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if "save_plot(" in p.read_text() and p.name != "_common.py")


def test_quick_and_full_runs_write_different_files(tmp_path):
    assert plot_path(tmp_path, "tta", quick=False) == tmp_path / "tta.png"
    assert plot_path(tmp_path, "tta", quick=True) == tmp_path / "tta_quick.png"


def test_save_plot_writes_the_quick_name_and_the_legend_covers_no_bar(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    bars = ax.bar([0, 1, 2], [90.0, 95.0, 99.0], label="accuracy")
    ax.set(title="t", ylabel="accuracy (%)")
    legend = legend_outside(ax)
    full = save_plot(fig, tmp_path / "out", "demo", quick=False)
    quick = save_plot(fig, tmp_path / "out", "demo", quick=True)
    assert full.name == "demo.png" and quick.name == "demo_quick.png" and full.is_file() and quick.is_file()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(bar.get_window_extent(renderer)) for bar in bars)
    assert box.x0 >= ax.get_window_extent(renderer).x1  # to the right of the axes
    with pytest.raises(TypeError):
        save_plot(fig, tmp_path, "demo")  # `quick` must be given: no script can forget it
    plt.close(fig)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_plot_has_a_quick_name_a_title_and_units(script):
    source = script.read_text()
    calls = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "save_plot"]
    assert calls and all(any(k.arg == "quick" for k in call.keywords) for call in calls)
    assert "set_title(" in source or "suptitle(" in source or "title=" in source
    assert "ylabel" in source and "(" in source.split("ylabel", 1)[1].split("\n", 1)[0]  # a unit in brackets
    assert ".legend(" not in source  # legends go through legend_outside
