"""Per-token -> per-sequence losses (``sequence_losses``)."""

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight.sequence import sequence_losses


def test_mean_over_non_ignored_tokens_matches_per_row_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, 3:] = -100  # padding
    targets[2, 0] = -100
    losses, counts = sequence_losses(logits, targets, return_counts=True)
    assert losses.shape == (3,) and counts.tolist() == [3, 5, 4]
    for b in range(3):
        keep = targets[b] != -100
        expected = F.cross_entropy(logits[b][keep], targets[b][keep])
        torch.testing.assert_close(losses[b], expected)
    losses.sum().backward()  # gradient flows; padded positions get none
    assert logits.grad is not None and float(logits.grad[0, 3:].abs().sum()) == 0.0


def test_sum_reduction_and_custom_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    targets[1, 2:] = 0
    mean = sequence_losses(logits, targets, ignore_index=0)
    total, counts = sequence_losses(logits, targets, ignore_index=0, reduction="sum", return_counts=True)
    torch.testing.assert_close(total, mean * counts.float())


def test_empty_sequence_is_zero_or_error():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    losses = sequence_losses(logits, targets).detach()
    assert torch.isfinite(losses).all() and float(losses[1]) == 0.0 and float(losses[0]) > 0
    with pytest.raises(ValueError, match=r"sequences \[1\] have none"):
        sequence_losses(logits, targets, empty="error")


def test_shape_errors():
    with pytest.raises(ValueError, match="Expected logits of shape"):
        sequence_losses(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected targets of shape"):
        sequence_losses(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
