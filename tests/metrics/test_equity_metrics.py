"""Equity-scaled metrics and GroupwiseMetric against hand computations and references."""

import statistics

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.regression import MeanSquaredError

from lightning_reweight.metrics import (
    EquityScaledAccuracy,
    EquityScaledAUROC,
    EquityScaledDice,
    EquityScaledIoU,
    GroupwiseMetric,
    equity_scale,
    equity_scaled_accuracy,
    equity_scaled_auroc,
    equity_scaled_dice,
    equity_scaled_iou,
    per_image_dice,
    per_image_iou,
)


def test_worked_equity_scaling_example():
    # P = 0.8, P_0 = 0.9, P_1 = 0.6: sum of gaps 0.1 + 0.2 = 0.3 -> 0.8 / 1.3
    assert float(equity_scale(torch.tensor(0.8), torch.tensor([0.9, 0.6]))) == pytest.approx(0.8 / 1.3)
    std = statistics.stdev([0.9, 0.6])  # sample std, as the FairSeg code
    assert float(equity_scale(torch.tensor(0.8), torch.tensor([0.9, 0.6]), mode="std")) == pytest.approx(0.8 / (1 + std))
    assert float(equity_scale(torch.tensor(0.8), torch.tensor([0.9, 0.6]), alpha=2.0)) == pytest.approx(0.8 / 1.6)
    # absent groups are left out; one group -> std 0
    present = torch.tensor([True, False])
    assert float(equity_scale(torch.tensor(0.8), torch.tensor([0.9, 0.0]), present)) == pytest.approx(0.8 / 1.1)
    assert float(equity_scale(torch.tensor(0.8), torch.tensor([0.9, 0.0]), present, mode="std")) == pytest.approx(0.8)


def test_es_accuracy_hand_computation_with_unknown_group():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    target = torch.tensor([1, 0, 0, 0, 1, 1])
    group = torch.tensor([0, 0, 1, 1, -1, 1])
    # correct: [1, 0, 1, 1, 1, 0]; P = 4/6 (the -1 sample counts in P); P_0 = 1/2; P_1 = 2/3
    p, p0, p1 = 4 / 6, 1 / 2, 2 / 3
    expected = p / (1 + abs(p - p0) + abs(p - p1))
    assert float(equity_scaled_accuracy(preds, target, group, 2)) == pytest.approx(expected)
    # logits and binary probabilities give the same labels
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert float(equity_scaled_accuracy(logits, target, group, 2)) == pytest.approx(expected)
    probs = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.7, 0.3])
    assert float(equity_scaled_accuracy(probs, target, group, 2)) == pytest.approx(expected)
    m = EquityScaledAccuracy(num_groups=2)
    m.update(preds[:4], target[:4], group[:4])
    m.update(preds[4:], target[4:], group[4:])
    assert float(m.compute()) == pytest.approx(expected, rel=1e-6)


def _masks():
    # two 2x3 images; image 0: pred {0,1}, target {0,2} -> inter 1, |P| 2, |T| 2 -> Dice 0.5, IoU 1/3
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 0]]])
    target = torch.tensor([[[1, 0, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]])
    # image 1: both empty -> zero_division (1.0); image 2: inter 2, |P| 4, |T| 2 -> Dice 4/6, IoU 2/4
    return pred, target


def test_per_image_dice_and_iou_by_hand():
    pred, target = _masks()
    torch.testing.assert_close(per_image_dice(pred, target), torch.tensor([0.5, 1.0, 4 / 6], dtype=torch.float64))
    torch.testing.assert_close(per_image_iou(pred, target), torch.tensor([1 / 3, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(per_image_dice(pred, target, zero_division=0.0)[1], torch.tensor(0.0, dtype=torch.float64))
    # (B, 2, H, W) scores -> argmax; (B, H, W) logits -> sigmoid > 0.5
    scores = torch.stack([1 - pred.float(), pred.float()], dim=1)
    torch.testing.assert_close(per_image_dice(scores, target), per_image_dice(pred, target))
    logits = pred.float() * 8 - 4
    torch.testing.assert_close(per_image_dice(logits, target), per_image_dice(pred, target))
    # background included: image 0 background Dice: P_bg 4 px, T_bg 4 px, inter 3 -> 6/8
    both = per_image_dice(pred, target, include_background=True)
    assert float(both[0]) == pytest.approx((0.75 + 0.5) / 2)


def test_es_dice_and_iou_worked_example():
    pred, target = _masks()
    group = torch.tensor([0, 1, 0])
    dice = [0.5, 1.0, 4 / 6]
    p = sum(dice) / 3
    p0, p1 = (dice[0] + dice[2]) / 2, dice[1]
    expected = p / (1 + abs(p - p0) + abs(p - p1))
    assert float(equity_scaled_dice(pred, target, group, 2)) == pytest.approx(expected)
    iou = [1 / 3, 1.0, 0.5]
    p = sum(iou) / 3
    expected_iou = p / (1 + abs(p - (iou[0] + iou[2]) / 2) + abs(p - iou[1]))
    assert float(equity_scaled_iou(pred, target, group, 2)) == pytest.approx(expected_iou)
    std_form = p / (1 + statistics.stdev([(iou[0] + iou[2]) / 2, iou[1]]))
    assert float(equity_scaled_iou(pred, target, group, 2, mode="std")) == pytest.approx(std_form)
    for cls, fn in ((EquityScaledDice, equity_scaled_dice), (EquityScaledIoU, equity_scaled_iou)):
        m = cls(num_groups=2)
        for i in range(3):
            m.update(pred[i:i + 1], target[i:i + 1], group[i:i + 1])
        assert float(m.compute()) == pytest.approx(float(fn(pred, target, group, 2)), rel=1e-6)


def test_class_accumulation_equals_functional_random():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (40, 6, 6), generator=g)
    group = torch.randint(-1, 4, (40,), generator=g)
    m = EquityScaledDice(num_groups=4, num_classes=3)
    for chunk in range(0, 40, 7):
        m.update(logits[chunk:chunk + 7], target[chunk:chunk + 7], group[chunk:chunk + 7])
    ref = equity_scaled_dice(logits, target, group, 4, num_classes=3)
    assert float(m.compute()) == pytest.approx(float(ref), rel=1e-6)


def test_es_auroc_against_sklearn():
    g = torch.Generator().manual_seed(1)
    n = 200
    group = torch.randint(0, 3, (n,), generator=g)
    target = torch.randint(0, 2, (n,), generator=g)
    scores = (target.float() * (1 + group.float()) + torch.randn(n, generator=g)).sigmoid()
    overall = roc_auc_score(target.numpy(), scores.numpy())
    per = [roc_auc_score(target[group == k].numpy(), scores[group == k].numpy()) for k in range(3)]
    expected = overall / (1 + sum(abs(overall - a) for a in per))
    assert float(equity_scaled_auroc(scores, target, group, 3)) == pytest.approx(expected, rel=1e-5)
    m = EquityScaledAUROC(num_groups=3)
    m.update(scores[:90], target[:90], group[:90])
    m.update(scores[90:], target[90:], group[90:])
    assert float(m.compute()) == pytest.approx(expected, rel=1e-5)
    # a group with a single class has no AUROC: it is left out
    target2 = target.clone()
    target2[group == 2] = 1
    overall2 = roc_auc_score(target2.numpy(), scores.numpy())
    per2 = [roc_auc_score(target2[group == k].numpy(), scores[group == k].numpy()) for k in range(2)]
    expected2 = overall2 / (1 + sum(abs(overall2 - a) for a in per2))
    assert float(equity_scaled_auroc(scores, target2, group, 3)) == pytest.approx(expected2, rel=1e-5)


@pytest.mark.parametrize("bad", [torch.tensor([0, 2]), torch.tensor([0, -2]), torch.tensor([0.0, 1.0])])
def test_bad_group_ids_raise(bad):
    preds, target = torch.tensor([1, 0]), torch.tensor([1, 1])
    with pytest.raises((ValueError, TypeError), match="group"):
        equity_scaled_accuracy(preds, target, bad, 2)
    with pytest.raises((ValueError, TypeError), match="group"):
        EquityScaledAccuracy(num_groups=2).update(preds, target, bad)
    with pytest.raises((ValueError, TypeError), match="group"):
        GroupwiseMetric(BinaryAccuracy(), 2).update(preds, target, bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one id per sample"):
        equity_scaled_accuracy(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="mode"):
        EquityScaledDice(num_groups=2, mode="max")
    with pytest.raises(ValueError, match="num_groups"):
        EquityScaledAccuracy(num_groups=0)
    with pytest.raises(ValueError, match="target"):
        per_image_dice(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))


def test_groupwise_metric_matches_per_group_reference():
    g = torch.Generator().manual_seed(2)
    preds = torch.rand(60, generator=g)
    target = torch.randint(0, 2, (60,), generator=g)
    group = torch.randint(-1, 3, (60,), generator=g)
    gm = GroupwiseMetric(BinaryAccuracy(), num_groups=4, group_names=["a", "b", "c", "d"], prefix="val/acc_")
    gm.update(preds[:25], target[:25], group[:25])
    gm.update(preds[25:], target[25:], group[25:])
    out = gm.compute()
    ref = {}
    for k, name in enumerate("abc"):
        ref[name] = BinaryAccuracy()(preds[group == k], target[group == k])
        assert float(out[f"val/acc_{name}"]) == pytest.approx(float(ref[name]))
    assert "val/acc_d" not in out  # group 3 never seen: not reported, not in worst/gap
    values = torch.stack(list(ref.values()))
    assert float(out["val/acc_worst"]) == pytest.approx(float(values.min()))
    assert float(out["val/acc_gap"]) == pytest.approx(float(values.max() - values.min()))
    # ignore_index (-1) samples count in "overall" only
    assert float(out["val/acc_overall"]) == pytest.approx(float(BinaryAccuracy()(preds, target)))
    gm.reset()
    assert float(gm.group_counts().sum()) == 0


def test_groupwise_lower_is_better_and_forward():
    gm = GroupwiseMetric(MeanSquaredError(), num_groups=2)
    preds, target, group = torch.tensor([0.0, 1.0, 0.0, 3.0]), torch.zeros(4), torch.tensor([0, 0, 1, 1])
    batch = gm(preds, target, group)
    assert float(batch["group_0"]) == pytest.approx(0.5) and float(batch["group_1"]) == pytest.approx(4.5)
    assert float(batch["worst"]) == pytest.approx(4.5)  # MSE: worst is the max
    out = gm.compute()
    assert float(out["worst"]) == pytest.approx(4.5) and float(out["gap"]) == pytest.approx(4.0)


def test_groupwise_bad_names():
    with pytest.raises(ValueError, match="group_names"):
        GroupwiseMetric(BinaryAccuracy(), 2, group_names=["a"])
    with pytest.raises(ValueError, match="reserved"):
        GroupwiseMetric(BinaryAccuracy(), 2, group_names=["a", "worst"])
    with pytest.raises(TypeError, match="Metric"):
        GroupwiseMetric(lambda p, t: p, 2)
