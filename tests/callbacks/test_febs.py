"""FEBS: scales and FEBS-Dice vs hand/reference computations; the classification callback; checkpoints; errors."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_reweight.callbacks.febs import FairErrorBoundScaling, FEBSDiceLoss
from lightning_reweight.rules.fairness import febs_dice_loss, febs_group_scales, febs_loss_multipliers

from .fairness_helpers import GroupedModule, make_grouped_loader, make_trainer


def test_scales_by_hand_min_over_present_groups():
    errors = torch.tensor([0.2, 0.4, 0.8])
    all_present = febs_group_scales(errors, torch.tensor([True, True, True]))
    torch.testing.assert_close(all_present, torch.tanh(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)))
    # group 0 absent: the min runs over groups 1, 2 (the official code's min over all would give 0 everywhere)
    some = febs_group_scales(torch.tensor([0.0, 0.4, 0.8]), torch.tensor([False, True, True]))
    torch.testing.assert_close(some, torch.tensor([1.0, math.tanh(1.0), math.tanh(0.5)], dtype=torch.float64))
    # gamma
    g2 = febs_group_scales(errors, torch.ones(3, dtype=torch.bool), gamma=2.0)
    torch.testing.assert_close(g2, torch.tanh(torch.tensor([1.0, 0.25, 0.0625], dtype=torch.float64)))


def test_classification_multipliers_inverse_scales_mean_one():
    scales = torch.tensor([math.tanh(1.0), math.tanh(0.5), 1.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1, -1])
    m = febs_loss_multipliers(scales, group)
    inv = [1 / math.tanh(1.0)] * 2 + [1 / math.tanh(0.5)] * 3
    mean_inv = sum(inv) / 5
    expected = [v / mean_inv for v in inv] + [1.0]
    torch.testing.assert_close(m, torch.tensor(expected))
    assert float(m.mean()) == pytest.approx(1.0)
    assert float(m[2] / m[0]) == pytest.approx(math.tanh(1.0) / math.tanh(0.5))  # harder group weighs more


def _reference_febs_dice(probs, onehot, group, gamma=1.0, smooth=1e-5):
    """Pixel-level FEBS-Dice as in the FairSeg code (min over present groups; all groups present here)."""
    def dice_loss(score, target):
        inter = (score * target).sum()
        return 1 - (2 * inter + smooth) / ((score * score).sum() + (target * target).sum() + smooth)

    num_classes = probs.shape[1]
    ids = sorted(set(group.tolist()))
    err = {k: sum(float(dice_loss(probs[group == k][:, c], onehot[group == k][:, c])) for c in range(num_classes))
           for k in ids}
    lo = min(err.values())
    w = torch.tensor([math.tanh((lo / err[int(k)]) ** gamma) for k in group])
    scaled = probs * w[:, None, None, None]
    return sum(dice_loss(scaled[:, c], onehot[:, c]) for c in range(num_classes)) / num_classes, err, w


def test_febs_dice_matches_pixel_level_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 5, 5, generator=g)
    target = torch.randint(0, 3, (6, 5, 5), generator=g)
    group = torch.tensor([0, 1, 1, 2, 0, 2])
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    ref, err, w = _reference_febs_dice(probs, onehot, group, gamma=1.0)
    assert float(febs_dice_loss(probs, target, group, 3)) == pytest.approx(float(ref), rel=1e-5)
    loss_fn = FEBSDiceLoss(num_groups=3)
    out = loss_fn(logits, target, group)
    assert float(out) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(loss_fn.group_error.float(), torch.tensor([err[0], err[1], err[2]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.last_scale.float()[group], w, rtol=1e-5, atol=1e-6)
    # the easiest group gets tanh(1)
    assert float(loss_fn.last_scale.max()) == pytest.approx(math.tanh(1.0))


def test_febs_dice_gradient_binary_and_ignore_index():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 6, 6, generator=g, requires_grad=True)
    mask = torch.randint(0, 2, (4, 1, 6, 6), generator=g).float()  # a (B, 1, H, W) float mask
    group = torch.tensor([0, 1, -1, 1])
    loss = FEBSDiceLoss(num_groups=2)(z, mask, group)
    loss.backward()
    loss = loss.detach()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().sum()) > 0
    # one sigmoid channel == two softmax channels [0, z]
    two = torch.cat([torch.zeros_like(z), z], dim=1).detach()
    ref = FEBSDiceLoss(num_groups=2)(two, mask[:, 0].long(), group)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    # the unknown sample is left out of the group errors and unscaled
    probs = torch.cat([1 - z.sigmoid(), z.sigmoid()], 1).detach()
    onehot = torch.cat([1 - mask, mask], 1)
    keep = group >= 0
    _, err, _ = _reference_febs_dice(probs[keep], onehot[keep], group[keep])
    lo = min(err.values())
    w = torch.tensor([math.tanh(lo / err[0]), math.tanh(lo / err[1]), 1.0, math.tanh(lo / err[1])])
    scaled = probs * w[:, None, None, None]
    smooth = 1e-5
    expected = sum(1 - (2 * (scaled[:, c] * onehot[:, c]).sum() + smooth)
                   / ((scaled[:, c] ** 2).sum() + (onehot[:, c] ** 2).sum() + smooth) for c in range(2)) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_febs_dice_state_momentum_eval_and_state_dict():
    g = torch.Generator().manual_seed(2)
    loss_fn = FEBSDiceLoss(num_groups=2, momentum=0.5)
    a = (torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 2, (4, 4, 4), generator=g), torch.tensor([0, 0, 1, 1]))
    b = (torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 2, (4, 4, 4), generator=g), torch.tensor([0, 1, 0, 1]))
    loss_fn(*a)
    e1 = loss_fn.group_error.clone()
    FEBSDiceLoss(num_groups=2)(*b)
    once = FEBSDiceLoss(num_groups=2)
    once(*b)
    loss_fn(*b)
    torch.testing.assert_close(loss_fn.group_error, 0.5 * e1 + 0.5 * once.group_error)
    state = loss_fn.state_dict()
    assert {"group_error", "group_seen", "last_scale"} <= set(state)
    restored = FEBSDiceLoss(num_groups=2, momentum=0.5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.group_error, loss_fn.group_error)
    restored.eval()
    before = restored.group_error.clone()
    restored(*a)
    torch.testing.assert_close(restored.group_error, before)  # evaluation does not move the state


def test_febs_dice_bad_inputs():
    with pytest.raises(ValueError, match=r"ids in \[0, 2\)"):
        FEBSDiceLoss(num_groups=2)(torch.randn(2, 2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="momentum"):
        FEBSDiceLoss(num_groups=2, momentum=0.0)
    with pytest.raises(ValueError, match="one group id per sample"):
        FEBSDiceLoss(num_groups=2)(torch.randn(2, 2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), torch.tensor([0]))


def _replay_febs(records, num_groups, gamma=1.0, momentum=1.0):
    errors, seen = [0.0] * num_groups, [False] * num_groups
    out = []
    for _, group, losses, _ in records:
        present = []
        for k in range(num_groups):
            members = [float(v) for v, gg in zip(losses, group) if int(gg) == k]
            if members:
                mean = sum(members) / len(members)
                errors[k] = (1 - momentum) * errors[k] + momentum * mean if seen[k] else mean
                seen[k] = True
                present.append(k)
        lo = min(errors[k] for k in present)
        scale = {k: math.tanh((lo / errors[k]) ** gamma) for k in present}
        inv = [1 / scale[int(gg)] for gg in group if int(gg) >= 0]
        mean_inv = sum(inv) / len(inv)
        weights = [1.0 if int(gg) < 0 else (1 / scale[int(gg)]) / mean_inv for gg in group]
        out.append(sum(w * float(v) for w, v in zip(weights, losses)) / len(losses))
    return errors, out


def test_callback_weights_match_hand_replay(tmp_path):
    cb = FairErrorBoundScaling(momentum=0.5)
    module = GroupedModule(lr=0.3)
    groups = torch.tensor([0, 1, 1, 2, -1, 1, 0, 2] * 3)
    make_trainer([cb], tmp_path, max_epochs=2).fit(module, make_grouped_loader(groups=groups))
    errors, losses = _replay_febs(module.records, 3, momentum=0.5)
    torch.testing.assert_close(cb.errors, torch.tensor(errors, dtype=torch.float64))
    for (_, _, _, loss), expected in zip(module.records, losses):
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_callback_checkpoint_round_trip(tmp_path):
    def loader():
        return make_grouped_loader(n=30, batch_size=7, num_groups=3, seed=4)

    pl.seed_everything(0)
    full_cb = FairErrorBoundScaling(momentum=0.3)
    make_trainer([full_cb], tmp_path / "a", max_epochs=3).fit(GroupedModule(), loader())
    pl.seed_everything(0)
    first_cb = FairErrorBoundScaling(momentum=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    make_trainer([first_cb, ckpt], tmp_path / "b", max_epochs=1, enable_checkpointing=True).fit(GroupedModule(), loader())
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    resumed_cb = FairErrorBoundScaling(momentum=0.3)
    make_trainer([resumed_cb], tmp_path / "c", max_epochs=3).fit(GroupedModule(), loader(), ckpt_path=path)
    torch.testing.assert_close(resumed_cb.errors, full_cb.errors)
    torch.testing.assert_close(resumed_cb.seen, full_cb.seen)
    assert resumed_cb.steps == full_cb.steps == 15


def test_callback_errors_and_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(ValueError, match="group id per sample"):
        make_trainer([FairErrorBoundScaling(num_groups=3)], tmp_path).fit(GroupedModule(pass_group=False),
                                                                          make_grouped_loader())
    with pytest.raises(ValueError, match="gamma"):
        FairErrorBoundScaling(gamma=-1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = FairErrorBoundScaling(log_every_n_steps=1)
    make_trainer([cb], tmp_path, logger=logger, log_every_n_steps=1).fit(GroupedModule(), make_grouped_loader())
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"febs/scale/group_0", "febs/error/group_2", "febs/mean", "febs/group_1/mean"} <= scalars
    assert all(abs(e.value - 1) < 1e-5 for e in acc.Scalars("febs/mean"))


def test_febs_dice_in_segmentation_module(tmp_path):
    """FEBSDiceLoss plugs into SegmentationModule's ``dice_loss`` hook; its state is saved with the model."""
    from torch.utils.data import DataLoader, Dataset

    from lightning_reweight import IndexedDataset
    from lightning_reweight.models.segmenter import SegmentationModule

    class Windows(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(8, 3, 32, 32, generator=g)
            self.m = (self.x[:, 0] > 0.3).long()

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"image": self.x[i], "mask": self.m[i]}

    ds = IndexedDataset(Windows(), groups=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    model = SegmentationModule(encoder_name="tu-mobilenetv3_small_050", encoder_depth=4,
                               decoder_channels=[16, 16, 8, 8], in_channels=3, num_groups=3, optimizer="adam",
                               lr=1e-3, dice_loss=FEBSDiceLoss(num_groups=3))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    make_trainer([ckpt], tmp_path, max_steps=2, enable_checkpointing=True).fit(model, DataLoader(ds, batch_size=4))
    assert bool(model.dice_loss.group_seen.all())
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    torch.testing.assert_close(state["dice_loss.group_error"], model.dice_loss.group_error)


# ------------------------------------------------------------------ lifecycle: atomic steps, validated state
def test_rejected_step_leaves_errors_and_steps_unchanged(tmp_path):
    from .fairness_helpers import RejectAt

    cb = FairErrorBoundScaling(momentum=0.5)
    module = GroupedModule(lr=0.0)
    with pytest.raises(ValueError, match="negative or non-finite weights"):
        make_trainer([cb, RejectAt(step=2)], tmp_path).fit(module, make_grouped_loader(n=32, batch_size=8))
    assert cb.steps == 2
    errors, _ = _replay_febs(module.records[:2], 3, momentum=0.5)
    torch.testing.assert_close(cb.errors, torch.tensor(errors, dtype=torch.float64))


@pytest.mark.parametrize(
    ("extra", "key", "match"),
    [
        ({"errors": torch.tensor([float("nan"), 0.5], dtype=torch.float64), "seen": torch.tensor([True, True]),
          "steps": 1}, "errors", "NaN"),
        ({"errors": torch.tensor([0.1, 0.5], dtype=torch.float64), "seen": torch.tensor([1, 1]), "steps": 1},
         "seen", "bool"),
        ({"errors": torch.tensor([0.1, 0.5], dtype=torch.float64), "seen": torch.tensor([True, False]), "steps": 1},
         "errors", "not seen"),
        ({"errors": torch.tensor([0.1, 0.5], dtype=torch.float64), "steps": 1}, "seen", "missing"),
        ({"errors": torch.tensor([0.1, 0.5], dtype=torch.float64), "seen": torch.tensor([True, True]), "steps": 1.5},
         "steps", "int"),
    ],
)
def test_bad_checkpoint_state_is_refused(extra, key, match):
    from lightning_reweight.state.validate import CheckpointStateError

    cb = FairErrorBoundScaling(num_groups=2)
    with pytest.raises(CheckpointStateError, match=match) as err:
        cb.load_state_dict({"table": None, "extra": extra})
    assert err.value.key == key
    assert cb.errors is None and cb.steps == 0


def test_all_ignored_batch_is_a_no_op(tmp_path):
    cb = FairErrorBoundScaling(num_groups=3)
    groups = torch.tensor([-1] * 8 + [0, 1, 2, 0, 1, 2, 0, 1])
    module = GroupedModule(lr=0.0)
    make_trainer([cb], tmp_path).fit(module, make_grouped_loader(n=16, groups=groups))
    assert cb.steps == 1  # only the second batch counted
    _, _, losses, loss = module.records[0]
    assert float(loss) == pytest.approx(float(losses.mean()), rel=1e-6)  # multipliers 1
    errors, _ = _replay_febs(module.records[1:], 3)
    torch.testing.assert_close(cb.errors, torch.tensor(errors, dtype=torch.float64))


def test_febs_dice_non_negative_ignore_index():
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(4, 2, 5, 5, generator=g), torch.randint(0, 2, (4, 5, 5), generator=g)
    a = FEBSDiceLoss(num_groups=2, ignore_index=255)(logits, target, torch.tensor([0, 1, 255, 1]))
    b = FEBSDiceLoss(num_groups=2, ignore_index=-1)(logits, target, torch.tensor([0, 1, -1, 1]))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    with pytest.raises(ValueError, match="ignore_index"):
        FEBSDiceLoss(num_groups=2, ignore_index=1)
    with pytest.raises(TypeError, match="integer ids"):
        FEBSDiceLoss(num_groups=2)(logits, target, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_febs_dice_paired_views_update_state_once_per_sample():
    g = torch.Generator().manual_seed(4)
    l1, l2 = torch.randn(4, 2, 5, 5, generator=g), torch.randn(4, 2, 5, 5, generator=g)
    t1, t2 = torch.randint(0, 2, (4, 5, 5), generator=g), torch.randint(0, 2, (4, 5, 5), generator=g)
    group = torch.tensor([0, 1, 0, 1])
    paired = FEBSDiceLoss(num_groups=2, momentum=0.5)
    warm = (torch.randn(4, 2, 5, 5, generator=g), torch.randint(0, 2, (4, 5, 5), generator=g), group)
    paired(*warm)
    e0 = paired.group_error.clone()
    out = paired(l1, t1, group, logits2=l2, target2=t2)
    # one EMA step with the error of both views' pooled pixels (not two steps, one per view)
    both = FEBSDiceLoss(num_groups=2)
    both(torch.cat([l1, l2]), torch.cat([t1, t2]), torch.cat([group, group]))
    torch.testing.assert_close(paired.group_error, 0.5 * e0 + 0.5 * both.group_error)
    s = paired.last_scale[group].float()
    from lightning_reweight.rules.fairness import scaled_dice_loss, soft_dice_stats

    expected = 0.5 * sum(scaled_dice_loss(*soft_dice_stats(lg.softmax(1), t), s) for lg, t in ((l1, t1), (l2, t2)))
    assert float(out) == pytest.approx(float(expected), rel=1e-5)


def test_febs_dice_buffers_are_validated_at_load():
    from lightning_reweight.state.validate import CheckpointStateError

    state = FEBSDiceLoss(num_groups=2).state_dict()
    state["group_error"] = torch.tensor([float("nan"), 0.1], dtype=torch.float64)
    fresh = FEBSDiceLoss(num_groups=2)
    with pytest.raises(CheckpointStateError, match="NaN") as err:
        fresh.load_state_dict(state)
    assert err.value.key == "group_error" and torch.equal(fresh.group_error, torch.zeros(2, dtype=torch.float64))
    state = FEBSDiceLoss(num_groups=2).state_dict()
    del state["group_seen"]
    with pytest.raises(CheckpointStateError, match="missing key"):
        FEBSDiceLoss(num_groups=2).load_state_dict(state)
