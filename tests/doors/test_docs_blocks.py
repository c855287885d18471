"""Every Python block of docs/fabric.md runs as written (a ``python notest`` block says why it cannot)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO

DOC = REPO / "docs" / "fabric.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_runnable_blocks():
    assert len(BLOCKS) >= 2
    notest = re.findall(r"```python notest\n(.*?)```", DOC.read_text(), flags=re.S)
    assert all(block.lstrip().startswith("#") for block in notest)  # each says why it cannot run


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(block):
    exec(compile(block, str(DOC), "exec"), {"__name__": "docs_block"})
