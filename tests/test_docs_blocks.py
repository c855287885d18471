"""Every Python block of README.md and docs/*.md runs as written, each in a fresh namespace in an empty working
directory (so what a block writes stays out of the repository).

A block fenced ```` ```python notest ```` cannot run on its own (it needs a data set, a GPU, a package that is
not a dependency, or it is a fragment of a method) and says why in a comment on its first line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python( notest)?[ \t]*\n(.*?)^```", flags=re.S | re.M)


def python_blocks(text: str) -> list[tuple[bool, str]]:
    """``(runs, code)`` for every fenced Python block; ``runs`` is False for ```` ```python notest ````."""
    return [(not notest, code) for notest, code in FENCE.findall(text)]


BLOCKS = [(page, i, code) for page in PAGES for i, (runs, code) in enumerate(python_blocks(page.read_text())) if runs]
NOTEST = [(page, code) for page in PAGES for runs, code in python_blocks(page.read_text()) if not runs]


def test_the_extractor_finds_runnable_and_notest_blocks():
    text = "```python\nx = 1\n```\n\n```python notest\n# needs a GPU\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(True, "x = 1\n"), (False, "# needs a GPU\ny = 2\n")]
    assert len(BLOCKS) >= 20 and any(page.name == "README.md" for page, _, _ in BLOCKS)


@pytest.mark.parametrize("page,code", NOTEST, ids=[f"{p.name}:notest{i}" for i, (p, _) in enumerate(NOTEST)])
def test_a_notest_block_says_why(page, code):
    assert code.lstrip().startswith("#"), f"a `python notest` block in {page.name} must start with a comment saying why"


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{p.relative_to(ROOT)}:block{i}" for p, i, _ in BLOCKS])
def test_block_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.relative_to(ROOT)} (block {index})", "exec"), {"__name__": "docs_block"})
