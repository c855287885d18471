"""Shared fixtures of the language-model / streaming tests: a small synthetic text file."""

import pytest
import torch


@pytest.fixture
def text_file(tmp_path):
    """A 6 000-character ASCII text (deterministic), so the stream tests run in seconds."""
    g = torch.Generator().manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    idx = torch.randint(0, len(words), (1400,), generator=g).tolist()
    text = " ".join(words[i] for i in idx)[:6000]
    path = tmp_path / "input.txt"
    path.write_text(text)
    return path
