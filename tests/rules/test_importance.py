"""Importance-sampling rules (PA&DA score, update rule, ramp, floor, unbiasing weights)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight.rules.importance import (
    gradnorm_score,
    importance_probabilities,
    mixing_coefficient,
    scatter_ema_,
    unbiasing_weights,
)


def test_gradnorm_score_matches_definition():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    expected = torch.stack([(z[i].softmax(0) - F.one_hot(y[i], 3)).norm() for i in range(2)])
    torch.testing.assert_close(gradnorm_score(z, y), expected)
    torch.testing.assert_close(gradnorm_score(z, F.one_hot(y, 3).float()), expected)
    assert gradnorm_score(torch.tensor([[50.0, -50.0]]), torch.tensor([1]))[0] == pytest.approx(math.sqrt(2), rel=1e-5)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        gradnorm_score(z, torch.tensor([0, -100]))
    with pytest.raises(ValueError, match="(B, C)"):
        gradnorm_score(z[0], y)


def _loop_reference(values, seen, index, new, rate):
    """PA&DA's Python loop (generalised to any rate): first visit sets, later visits average."""
    values, seen = values.clone().double(), seen.clone()
    for i, x in zip(index.tolist(), new.tolist()):
        values[i] = (1 - rate) * values[i] + rate * x if seen[i] else x
        seen[i] = True
    return values, seen


def _fixed_shape(values, seen, index, new, rate):
    """The GPU path of ``scatter_ema_`` (fixed shapes, no host sync), run on the CPU."""
    from lightning_reweight.rules.importance import _scatter_ema_fixed

    idx_s, order = torch.sort(index, stable=True)
    _scatter_ema_fixed(values, seen, idx_s, new.double()[order], rate)


@pytest.mark.parametrize("path", ["host", "fixed_shape", "float_seen"])
@pytest.mark.parametrize("rate", [0.5, 0.1, 1.0])
def test_scatter_ema_equals_sequential_loop_with_duplicates(rate, path):
    """Host path, the fixed-shape GPU path, and a float ``seen`` column (the table's ``is_seen``, > 0 = seen)."""
    g = torch.Generator().manual_seed(0)
    values = torch.zeros(20, dtype=torch.float64)
    seen = torch.zeros(20, dtype=torch.float32 if path == "float_seen" else torch.bool)
    update = _fixed_shape if path == "fixed_shape" else scatter_ema_
    ref_v, ref_s = values.clone(), seen.clone()
    for _ in range(5):
        index = torch.randint(0, 20, (15,), generator=g)  # many duplicates
        new = torch.rand(15, generator=g, dtype=torch.float64)
        ref_v, ref_s = _loop_reference(ref_v, ref_s > 0, index, new, rate)
        update(values, seen, index, new, rate)
        torch.testing.assert_close(values, ref_v)
        assert torch.equal(seen > 0, ref_s)


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_scatter_ema_without_repeats_equals_sequential_loop(rate):
    g = torch.Generator().manual_seed(1)
    values, seen = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.bool)
    ref_v, ref_s = values.clone(), seen.clone()
    for _ in range(4):
        index = torch.randperm(50, generator=g)[:20]  # distinct: the one-step path
        new = torch.rand(20, generator=g, dtype=torch.float64)
        ref_v, ref_s = _loop_reference(ref_v, ref_s, index, new, rate)
        scatter_ema_(values, seen, index, new, rate)
        torch.testing.assert_close(values, ref_v)
        assert torch.equal(seen, ref_s)


def test_pada_pairwise_mean_by_hand():
    v, s = torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    scatter_ema_(v, s, torch.tensor([1, 1, 1]), torch.tensor([4.0, 2.0, 1.0]), 0.5)
    assert v[1] == pytest.approx(((4 + 2) / 2 + 1) / 2)  # 2.0
    assert v[0] == 0 and v[2] == 0 and s.tolist() == [False, True, False]
    # a zero score still counts as seen (unlike the official `!= 0` test)
    scatter_ema_(v, s, torch.tensor([0, 0]), torch.tensor([0.0, 1.0]), 0.5)
    assert v[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="smoothing"):
        scatter_ema_(v, s, torch.tensor([0]), torch.tensor([1.0]), 0.0)


def test_mixing_coefficient_ramp_and_floor():
    assert [mixing_coefficient(e, 4) for e in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert mixing_coefficient(3, 4, floor=0.5) == 0.5
    assert mixing_coefficient(10, None, floor=0.1) == 0.1
    with pytest.raises(ValueError, match="floor"):
        mixing_coefficient(0, 4, floor=1.5)


def test_importance_probabilities_with_floor():
    s = torch.tensor([3.0, 1.0, 0.0, 0.0])
    p = importance_probabilities(s, mixing=0.2)
    expected = 0.8 * torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64) + 0.2 / 4
    torch.testing.assert_close(p, expected)
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p.min()) == pytest.approx(0.2 / 4)  # the floor
    # all-zero scores -> uniform; power sharpens; unseen="mean" fills unscored samples
    torch.testing.assert_close(importance_probabilities(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    p2 = importance_probabilities(s, power=2.0)
    assert float(p2[0]) == pytest.approx(0.9)
    seen = torch.tensor([True, True, False, False])
    p3 = importance_probabilities(s, seen=seen, unseen="mean")
    torch.testing.assert_close(p3, torch.tensor([3, 1, 2, 2], dtype=torch.float64) / 8)
    nan_scores = torch.tensor([1.0, float("nan")])
    torch.testing.assert_close(importance_probabilities(nan_scores, unseen="mean"), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="mixing"):
        importance_probabilities(s, mixing=-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        importance_probabilities(torch.tensor([-1.0, 1.0]))


def test_unbiasing_weights_make_the_estimator_unbiased():
    n = 5
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1], dtype=torch.float64)
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    raw = 1.0 / (n * p)
    assert float((p * raw * loss).sum()) == pytest.approx(float(loss.mean()))  # E_p[w l] = mean l
    w = unbiasing_weights(p[[0, 2, 2]], n)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[1] / w[0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="floor"):
        unbiasing_weights(torch.tensor([0.0, 1.0]), 2)
