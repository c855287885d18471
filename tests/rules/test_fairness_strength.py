"""FEBS and GroupDRO kernels: every error path, the papers' defaults, hand-computed values and the numpy twins.

Written against survivors of ``scripts/mutate.py rules/fairness.py``.
"""

import inspect
import math

import numpy as np
import pytest
import torch

from lightning_reweight.rules import fairness as fr


def _stats(probs, target):
    return fr.soft_dice_stats(probs, target)


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_are_the_papers():
    sig = inspect.signature
    assert sig(fr.febs_group_scales).parameters["gamma"].default == 1.0  # FairSeg: γ = 1
    assert sig(fr.febs_dice_loss).parameters["gamma"].default == 1.0
    assert sig(fr.febs_dice_loss).parameters["smooth"].default == 1e-5
    assert sig(fr.febs_dice_loss).parameters["reduction"].default == "batch"
    assert sig(fr.group_dro_update).parameters["step_size"].default == 0.01  # GroupDRO: η = 0.01
    assert sig(fr.update_group_errors).parameters["momentum"].default == 1.0  # FairSeg: per-batch errors
    for fn in (fr.group_sums, fr.group_means, fr.febs_loss_multipliers, fr.sample_scales, fr.group_dro_sample_weights):
        assert sig(fn).parameters["ignore_index"].default == -1


# ------------------------------------------------------------------------------------------------ groups
def test_group_sums_and_means_exclude_ignored_rows():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0])
    group = torch.tensor([0, 1, 1, -1])
    sums, counts = fr.group_sums(values, group, 3)
    assert sums.tolist() == [1.0, 6.0, 0.0] and counts.tolist() == [1, 2, 0]
    means, _ = fr.group_means(values, group, 3)
    assert means.tolist() == [1.0, 3.0, 0.0]  # absent group: 0 (no division by zero)
    sums2, _ = fr.group_sums(values.reshape(4, 1).repeat(1, 2), group, 3)
    assert sums2.tolist() == [[1.0, 1.0], [6.0, 6.0], [0.0, 0.0]]
    sums_all, counts_all = fr.group_sums(values, torch.tensor([0, 1, 1, 0]), 2, ignore_index=None)
    assert sums_all.tolist() == [9.0, 6.0] and counts_all.tolist() == [2, 2]


def test_update_group_errors_momentum_torch_and_numpy():
    errors, seen = torch.tensor([1.0, 5.0, 7.0]), torch.tensor([True, True, False])
    batch, present = torch.tensor([3.0, 9.0, 2.0]), torch.tensor([True, False, True])
    new, new_seen = fr.update_group_errors(errors, seen, batch, present, momentum=0.25)
    assert new.tolist() == [1.5, 5.0, 2.0]  # blended; absent kept; first observation set
    assert new_seen.tolist() == [True, True, True]
    assert fr.update_group_errors(errors, seen, batch, present)[0].tolist() == [3.0, 5.0, 2.0]
    new_np, seen_np = fr.update_group_errors(errors.numpy(), seen.numpy(), batch.numpy(), present.numpy(), 0.25)
    assert isinstance(new_np, np.ndarray) and new_np.tolist() == new.tolist()
    assert seen_np.tolist() == new_seen.tolist()


# ------------------------------------------------------------------------------------------------ FEBS
def test_febs_group_scales_hand_values_and_numpy_twin():
    errors = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    present = torch.tensor([True, True, False, True])
    s = fr.febs_group_scales(errors, present)
    expected = [math.tanh(1.0), math.tanh(0.5), 1.0, math.tanh(0.25)]
    assert s.tolist() == pytest.approx(expected)
    s2 = fr.febs_group_scales(errors, present, gamma=2.0)
    assert s2.tolist() == pytest.approx([math.tanh(1.0), math.tanh(0.25), 1.0, math.tanh(0.0625)])
    s_np = fr.febs_group_scales(errors.numpy(), present.numpy())
    assert isinstance(s_np, np.ndarray) and s_np.tolist() == pytest.approx(expected)
    assert fr.febs_group_scales(errors, torch.zeros(4, dtype=torch.bool)).tolist() == [1.0] * 4
    # a present group with error 0 is the easiest (ratio 1); every other group's ratio is then 0
    z = fr.febs_group_scales(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([True, True]))
    assert z.tolist() == pytest.approx([math.tanh(1.0), 0.0])


def test_febs_loss_multipliers_mean_one_and_ignored_samples():
    scales = torch.tensor([0.5, 0.25], dtype=torch.float64)
    group = torch.tensor([0, 1, 1, -1])
    m = fr.febs_loss_multipliers(scales, group)
    # inv = [2, 4]; grouped mean = (2 + 4 + 4) / 3
    assert m.tolist() == pytest.approx([2 / (10 / 3), 4 / (10 / 3), 4 / (10 / 3), 1.0])
    assert m[:3].mean().item() == pytest.approx(1.0)
    counts = torch.tensor([1, 2])
    assert torch.equal(fr.febs_loss_multipliers(scales, group, counts=counts), m)
    assert fr.febs_loss_multipliers(scales, torch.tensor([-1, -1])).tolist() == [1.0, 1.0]
    floored = fr.febs_loss_multipliers(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0, 1]),
                                       min_scale=0.5)
    assert floored.tolist() == pytest.approx([2 / 1.5, 1 / 1.5])


def test_check_class_ids_errors_name_the_fix():
    with pytest.raises(TypeError, match=r"integer class ids, but got dtype torch.float32; .*target.long\(\)"):
        fr.check_class_ids(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\), but got values in \[0, 2\]; .*one channel per class"):
        fr.check_class_ids(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
        fr.check_class_ids(torch.tensor([-1, 1]), 2)
    assert fr.check_class_ids(torch.tensor([0, 1], dtype=torch.int32), 2).dtype == torch.int64
    assert fr.check_class_ids(torch.tensor([1]), 2).tolist() == [1]  # the upper id num_classes - 1 is valid


def test_soft_dice_stats_values_and_shape_errors():
    probs = torch.tensor([[[0.25, 0.75], [0.75, 0.25]]])  # (B=1, C=2, 2 pixels)
    target = torch.tensor([[1, 0]])
    inter, z, y = fr.soft_dice_stats(probs, target)
    # one-hot target: class 0 at pixel 1, class 1 at pixel 0
    torch.testing.assert_close(inter, torch.tensor([[0.75, 0.75]]))
    torch.testing.assert_close(z, torch.tensor([[0.625, 0.625]]))
    assert y.tolist() == [[1.0, 1.0]]
    one_hot = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(fr.soft_dice_stats(probs, one_hot)[0], inter)
    with pytest.raises(ValueError, match=r"shape \(B, C, \.\.\.\), but got \(3,\); .*class channel at dim 1"):
        fr.soft_dice_stats(torch.ones(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected `target` of shape \(1, 2\) \(labels\) or \(1, 2, 2\) "
                                         r"\(one-hot\), but got \(1, 2, 3\); pass one label map per sample"):
        fr.soft_dice_stats(probs, torch.zeros(1, 3, dtype=torch.long))


def test_scaled_dice_loss_reductions_and_class_weights():
    probs = torch.tensor([[[0.25, 0.75], [0.75, 0.25]], [[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[1, 0], [0, 1]])
    inter, z, y = fr.soft_dice_stats(probs, target)
    per_sample = fr.scaled_dice_loss(inter, z, y, reduction="none", smooth=0.0)
    # sample 0: each class 1 - 2·0.75/(0.625 + 1); sample 1 is perfect
    assert per_sample.tolist() == pytest.approx([1 - 1.5 / 1.625, 0.0])
    pooled = fr.scaled_dice_loss(inter, z, y, smooth=0.0)
    assert pooled.shape == ()
    i, zz, yy = inter.sum(0), z.sum(0), y.sum(0)
    assert pooled.item() == pytest.approx(((1 - 2 * i / (zz + yy)).sum() / 2).item())
    scaled = fr.scaled_dice_loss(inter, z, y, torch.tensor([0.5, 1.0]), smooth=0.0, reduction="none")
    s_i, s_z = inter[0] * 0.5, z[0] * 0.25
    assert scaled[0].item() == pytest.approx(((1 - 2 * s_i / (s_z + y[0])).sum() / 2).item())
    weighted = fr.scaled_dice_loss(inter, z, y, class_weights=[2.0, 0.0], reduction="none", smooth=0.0)
    assert weighted.tolist() == pytest.approx([2.0 * (1 - 1.5 / 1.625) / 2, 0.0])
    with pytest.raises(ValueError, match=r"'batch' or 'none', but got 'mean'"):
        fr.scaled_dice_loss(inter, z, y, reduction="mean")
    with pytest.raises(ValueError, match=r"2 entries, but got shape \(3,\); give one weight per class"):
        fr.scaled_dice_loss(inter, z, y, class_weights=[1.0, 1.0, 1.0])


def test_febs_dice_loss_per_sample_and_errors():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 3, 5, generator=g), 1)
    target = torch.randint(0, 3, (4, 5), generator=g)
    group = torch.tensor([0, 1, 1, -1])
    per_sample = fr.febs_dice_loss(probs, target, group, 2, reduction="none")
    assert per_sample.shape == (4,)
    inter, z, y = fr.soft_dice_stats(probs, target)
    errors, counts = fr.group_dice_errors(inter, z, y, group, 2)
    scales = fr.febs_group_scales(errors, counts > 0)
    expected = fr.scaled_dice_loss(inter, z, y, fr.sample_scales(scales, group), reduction="none")
    torch.testing.assert_close(per_sample, expected)
    unscaled = fr.scaled_dice_loss(inter, z, y, reduction="none")
    assert per_sample[3].item() == pytest.approx(unscaled[3].item())  # ignore_index: scale 1
    assert not torch.allclose(per_sample[:3], unscaled[:3])
    with pytest.raises(ValueError, match=r"'batch' or 'none', but got 'sum'"):
        fr.febs_dice_loss(probs, target, group, 2, reduction="sum")
    with pytest.raises(ValueError, match=r"one group id per sample \(4\), but got 3; pass the batch's `group`"):
        fr.febs_dice_loss(probs, target, group[:3], 2)
    with pytest.raises(ValueError, match=r"Expected `target` of shape"):
        fr.febs_dice_loss(probs, target[:, :4], group, 2)


def test_group_dice_errors_zero_for_absent_groups():
    probs = torch.tensor([[[0.25, 0.75], [0.75, 0.25]]])
    inter, z, y = fr.soft_dice_stats(probs, torch.tensor([[1, 0]]))
    errors, counts = fr.group_dice_errors(inter, z, y, torch.tensor([1]), 3, smooth=0.0)
    assert counts.tolist() == [0, 1, 0]
    assert errors[0].item() == 0.0 and errors[2].item() == 0.0
    assert errors[1].item() == pytest.approx(2 * (1 - 1.5 / 1.625))


def test_sample_scales_ignored_ids():
    s = fr.sample_scales(torch.tensor([0.5, 0.25]), torch.tensor([1, -1, 0]))
    assert s.tolist() == [0.25, 1.0, 0.5]
    assert fr.sample_scales(torch.tensor([0.5, 0.25]), torch.tensor([255, 0]), ignore_index=255).tolist() == [1.0, 0.5]


# ------------------------------------------------------------------------------------------------ GroupDRO
def test_dro_adjustment_values():
    assert fr.dro_adjustment(None, None, 3).tolist() == [0.0, 0.0, 0.0]
    assert fr.dro_adjustment(0.0, None, 2).tolist() == [0.0, 0.0]  # C = 0: no counts needed
    adj = fr.dro_adjustment(2.0, [4, 16], 2)
    assert adj.dtype == torch.float64 and adj.tolist() == [1.0, 0.5]
    assert fr.dro_adjustment([0.0, 3.0], [0, 9], 2).tolist() == [0.0, 1.0]  # C_g = 0 and no samples: fine


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), [1.0, -0.5]])
def test_dro_adjustment_refuses_negative_or_non_finite_c(bad):
    with pytest.raises(ValueError, match=r"finite and ≥ 0, but got .*; use 0 \(or None\)"):
        fr.dro_adjustment(bad, [1, 1], 2)


def test_dro_adjustment_shape_and_count_errors():
    with pytest.raises(ValueError, match=r"one number or 3 numbers \(one per group\), but got 2"):
        fr.dro_adjustment([1.0, 1.0], [1, 1, 1], 3)
    with pytest.raises(ValueError, match=r"group counts `group_counts` .*but got None; pass `group_counts`"):
        fr.dro_adjustment(1.0, None, 2)
    with pytest.raises(ValueError, match=r"`group_counts` to have 2 entries \(one per group\), but got 3"):
        fr.dro_adjustment(1.0, [1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"training samples, but got counts \[5.0, 0.0\]; set C_g = 0"):
        fr.dro_adjustment(1.0, [5, 0], 2)


def test_group_dro_update_hand_values_and_numpy_twin():
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    losses = torch.tensor([1.0, 0.0])
    new = fr.group_dro_update(q, losses, step_size=1.0)
    assert new.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    default = fr.group_dro_update(q, losses)
    assert default[0].item() == pytest.approx(math.exp(0.01) / (math.exp(0.01) + 1))
    adj = fr.group_dro_update(q, losses, 1.0, adjustment=torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert adj.tolist() == pytest.approx([0.5, 0.5])
    new_np = fr.group_dro_update(q.numpy(), losses.numpy(), 1.0, adjustment=np.array([0.0, 0.5]))
    expected = fr.group_dro_update(q, losses, 1.0, adjustment=torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert isinstance(new_np, np.ndarray) and new_np.tolist() == pytest.approx(expected.tolist())


def test_group_dro_sample_weights_objective():
    q = torch.tensor([0.25, 0.75])
    group = torch.tensor([0, 1, 1, -1])
    w = fr.group_dro_sample_weights(q, group, 2)
    assert w.tolist() == pytest.approx([0.25 * 4 / 1, 0.75 * 4 / 2, 0.75 * 4 / 2, 0.0])
    losses = torch.tensor([1.0, 2.0, 4.0, 100.0])
    assert (w * losses).mean().item() == pytest.approx(0.25 * 1.0 + 0.75 * 3.0)
    assert torch.equal(fr.group_dro_sample_weights(q, group, 2, counts=torch.tensor([1, 2])), w)


def test_absent_last_groups_keep_their_slots():
    sums, counts = fr.group_sums(torch.tensor([2.0]), torch.tensor([0]), 3)
    assert sums.tolist() == [2.0, 0.0, 0.0] and counts.tolist() == [1, 0, 0]
    sums2, _ = fr.group_sums(torch.ones(1, 2), torch.tensor([0]), 3)
    assert sums2.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    m = fr.febs_loss_multipliers(torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), torch.tensor([0, 0]))
    assert m.tolist() == [1.0, 1.0]
    w = fr.group_dro_sample_weights(torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0, 0]), 3)
    assert w.tolist() == [0.5, 0.5]
