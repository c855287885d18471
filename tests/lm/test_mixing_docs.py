"""Every Python block of docs/mixing.md runs as written."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO

DOC = REPO / "docs" / "mixing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_runnable_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(block):
    exec(compile(block, str(DOC), "exec"), {"__name__": "docs_block"})
