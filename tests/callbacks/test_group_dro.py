"""GroupDRO: exponentiated-gradient q vs hand computation, the weight identity, checkpoints, errors, logging."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_reweight.callbacks.group_dro import GroupDRO
from lightning_reweight.rules.fairness import (
    dro_adjustment,
    group_dro_sample_weights,
    group_dro_update,
    group_means,
)

from .fairness_helpers import GroupedModule, make_grouped_loader, make_trainer


def test_update_by_hand_absent_group_decays():
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    new = group_dro_update(q, torch.tensor([1.0, 2.0, 0.0]), step_size=0.5)  # group 2 absent: loss 0
    e = [math.exp(0.5), math.exp(1.0), 1.0]
    torch.testing.assert_close(new, torch.tensor([v / sum(e) for v in e], dtype=torch.float64))


def test_sample_weights_give_the_group_dro_objective():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(20, generator=g)
    group = torch.tensor([0] * 9 + [1] * 6 + [3] * 4 + [-1])  # group 2 absent, one unknown sample
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    w = group_dro_sample_weights(q, group, 4)
    means, counts = group_means(losses.double(), group, 4)
    objective = float((q * means).sum())  # absent group: mean 0
    assert float((w.double() * losses.double()).sum() / 20) == pytest.approx(objective, rel=1e-6)
    # hand values: w_i = q_g * B / n_g ; unknown sample 0
    assert float(w[0]) == pytest.approx(0.1 * 20 / 9, rel=1e-6)
    assert float(w[10]) == pytest.approx(0.2 * 20 / 6, rel=1e-6)
    assert float(w[-1]) == 0.0
    assert float(w.mean()) == pytest.approx(0.1 + 0.2 + 0.4, rel=1e-6)  # Σ_{present} q_g


def test_adjustment_per_group_and_mixed_zero_warning():
    torch.testing.assert_close(dro_adjustment(2.0, [4, 16, 1], 3), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(dro_adjustment([0.0, 1.0, 1.0], [4, 16, 1], 3),
                               torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))
    with pytest.warns(UserWarning, match="mixes zeros"):
        GroupDRO(num_groups=3, adjustment=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="group_counts"):
        dro_adjustment(1.0, None, 3)
    with pytest.raises(ValueError, match="adjustment"):
        GroupDRO(num_groups=3, adjustment=-1.0)


def _replay(records, num_groups, step_size, adj=None):
    """Independent replay: q ← q·exp(η(ℓ_g + adj_g)) / Σ, then loss = Σ q_g ℓ̄_g."""
    q = [1 / num_groups] * num_groups
    losses_out = []
    for _, group, losses, _ in records:
        lg = []
        for k in range(num_groups):
            members = [float(v) for v, gg in zip(losses, group) if int(gg) == k]
            lg.append(sum(members) / len(members) if members else 0.0)
        a = adj or [0.0] * num_groups
        q = [qk * math.exp(step_size * (lk + ak)) for qk, lk, ak in zip(q, lg, a)]
        total = sum(q)
        q = [v / total for v in q]
        losses_out.append(sum(qk * lk for qk, lk in zip(q, lg)))
    return q, losses_out


def test_callback_q_and_loss_match_hand_replay(tmp_path):
    cb = GroupDRO(step_size=0.5)  # num_groups inferred from the IndexedDataset's groups
    module = GroupedModule(lr=0.3)
    groups = torch.tensor([0, 0, 1, 2, 0, 1, 0, 0] * 3)  # group 2 absent from no batch; unequal sizes
    make_trainer([cb], tmp_path, max_epochs=2).fit(module, make_grouped_loader(groups=groups, batch_size=8))
    assert cb.num_groups == 3 and cb.steps == 6
    q, losses = _replay(module.records, 3, 0.5)
    torch.testing.assert_close(cb.q, torch.tensor(q, dtype=torch.float64))
    for (_, _, _, loss), expected in zip(module.records, losses):
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_adjustment_inferred_from_training_counts(tmp_path):
    groups = torch.tensor([0, 0, 0, 1] * 6)  # train counts 18 and 6
    cb = GroupDRO(step_size=0.2, adjustment=1.0)
    module = GroupedModule(lr=0.0)
    make_trainer([cb], tmp_path).fit(module, make_grouped_loader(groups=groups))
    q, _ = _replay(module.records, 2, 0.2, adj=[1 / math.sqrt(18), 1 / math.sqrt(6)])
    torch.testing.assert_close(cb.q, torch.tensor(q, dtype=torch.float64))


def test_checkpoint_round_trip(tmp_path):
    def loader():
        return make_grouped_loader(n=30, batch_size=7, num_groups=3, seed=3)

    pl.seed_everything(0)
    full_cb, full = GroupDRO(step_size=0.3), GroupedModule()
    make_trainer([full_cb], tmp_path / "a", max_epochs=3).fit(full, loader())

    pl.seed_everything(0)
    first_cb = GroupDRO(step_size=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    make_trainer([first_cb, ckpt], tmp_path / "b", max_epochs=1, enable_checkpointing=True).fit(GroupedModule(), loader())
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(path, weights_only=False)["callbacks"][first_cb.state_key]
    torch.testing.assert_close(saved["extra"]["q"], first_cb.q)

    resumed_cb = GroupDRO(step_size=0.3)
    make_trainer([resumed_cb], tmp_path / "c", max_epochs=3).fit(GroupedModule(), loader(), ckpt_path=path)
    torch.testing.assert_close(resumed_cb.q, full_cb.q)
    assert resumed_cb.steps == full_cb.steps == 15
    # an old checkpoint without GroupDRO keys still loads
    fresh = GroupDRO()
    fresh.load_state_dict({})
    assert fresh.q is None and fresh.steps == 0


def test_missing_and_bad_group_ids_raise_before_any_update(tmp_path):
    cb = GroupDRO(num_groups=3)
    with pytest.raises(ValueError, match="group id per sample"):
        make_trainer([cb], tmp_path).fit(GroupedModule(pass_group=False), make_grouped_loader())
    cb = GroupDRO(num_groups=2)
    with pytest.raises(ValueError, match=r"ids in \[0, 2\)"):
        make_trainer([cb], tmp_path).fit(GroupedModule(), make_grouped_loader(num_groups=3))
    assert cb.steps == 0 and torch.allclose(cb.q, torch.full((2,), 0.5, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="step_size"):
        GroupDRO(step_size=0)
    with pytest.raises(ValueError, match="num_groups"):
        GroupDRO(num_groups=0)
    with pytest.raises(ValueError, match="one number or 3"):
        GroupDRO(num_groups=3, adjustment=[1.0, 1.0])


def test_tensorboard_logs_q_and_group_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = GroupDRO(step_size=0.1, log_every_n_steps=1)
    make_trainer([cb], tmp_path, logger=logger, log_every_n_steps=1).fit(GroupedModule(), make_grouped_loader())
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"group_dro/q/group_0", "group_dro/q/group_2", "group_dro/loss/group_1", "group_dro/ess"} <= scalars
    assert "group_dro/weights" in acc.Tags()["histograms"]
    last_q = [acc.Scalars(f"group_dro/q/group_{k}")[-1].value for k in range(3)]
    assert last_q == pytest.approx(cb.q.tolist(), rel=1e-5)


# ------------------------------------------------------------------ lifecycle: atomic steps, validated state
def test_rejected_step_leaves_q_and_steps_unchanged(tmp_path):
    from .fairness_helpers import RejectAt

    cb = GroupDRO(step_size=0.5)
    module = GroupedModule(lr=0.0)
    with pytest.raises(ValueError, match="negative or non-finite weights"):
        make_trainer([cb, RejectAt(step=2)], tmp_path).fit(module, make_grouped_loader(n=32, batch_size=8))
    assert cb.steps == 2  # steps 0 and 1 committed, the rejected step 2 not
    q, _ = _replay(module.records[:2], 3, 0.5)
    torch.testing.assert_close(cb.q, torch.tensor(q, dtype=torch.float64))


@pytest.mark.parametrize(
    ("extra", "key", "match"),
    [
        ({"q": torch.tensor([float("nan"), 0.5], dtype=torch.float64), "steps": 3}, "q", "NaN"),
        ({"q": torch.tensor([-1.0, 2.0], dtype=torch.float64), "steps": 3}, "q", ">= 0"),
        ({"q": torch.tensor([0.2, 0.2], dtype=torch.float64), "steps": 3}, "q", "summing to 1"),
        ({"q": torch.tensor([0.5, 0.5], dtype=torch.float64), "steps": -4}, "steps", ">= 0"),
        ({"q": torch.tensor([0.5, 0.5], dtype=torch.float64)}, "steps", "missing"),
        ({"steps": 3}, "q", "missing"),
    ],
)
def test_bad_checkpoint_state_is_refused_before_anything_is_assigned(extra, key, match):
    from lightning_reweight.state.validate import CheckpointStateError

    cb = GroupDRO(num_groups=2)
    with pytest.raises(CheckpointStateError, match=match) as err:
        cb.load_state_dict({"table": None, "extra": extra})
    assert err.value.key == key and "GroupDRO" in str(err.value)
    assert cb.q is None and cb.steps == 0
    with pytest.raises(CheckpointStateError, match=r"expected 2 groups \(num_groups=2\), but the checkpoint's 'q' has 3"
                                                   r".*pass `num_groups=3`"):
        GroupDRO(num_groups=2).load_state_dict({"extra": {"q": torch.full((3,), 1 / 3, dtype=torch.float64),
                                                          "steps": 1}})


def test_all_ignored_batch_raises_its_own_message_and_advances_nothing(tmp_path):
    cb = GroupDRO(num_groups=3)
    groups = torch.tensor([-1] * 8 + [0, 1, 2, 0] * 2)  # the first batch has no known group
    with pytest.raises(ValueError, match="every sample of this batch has group ignore_index=-1"):
        make_trainer([cb], tmp_path).fit(GroupedModule(), make_grouped_loader(n=16, groups=groups))
    assert cb.steps == 0 and torch.equal(cb.q, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_non_negative_ignore_index_and_float_group_ids():
    q = torch.tensor([0.25, 0.75], dtype=torch.float64)
    group = torch.tensor([0, 1, 255, 1])
    w = group_dro_sample_weights(q, group, 2, ignore_index=255)
    torch.testing.assert_close(w, torch.tensor([0.25 * 4, 0.75 * 4 / 2, 0.0, 0.75 * 4 / 2]))
    GroupDRO(num_groups=2, ignore_index=255)
    with pytest.raises(ValueError, match="ignore_index"):
        GroupDRO(num_groups=3, ignore_index=1)  # a valid group id cannot mean "unknown"
    from lightning_reweight.rules.balance import check_groups

    with pytest.raises(TypeError, match="integer ids"):
        check_groups(torch.tensor([0.9, 1.0]), 2, -1)
    with pytest.raises(TypeError, match="integer ids"):
        check_groups(torch.tensor([True, False]), 2, -1)


# ------------------------------------------------------------------ a checkpoint of data with other groups
def _two_group_checkpoint(tmp_path, cls=GroupDRO):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    make_trainer([cls(), ckpt], tmp_path / "a", enable_checkpointing=True).fit(
        GroupedModule(), make_grouped_loader(n=16, num_groups=2))
    return next((tmp_path / "ckpt").glob("*.ckpt"))


@pytest.mark.parametrize("cls", ["GroupDRO", "FairErrorBoundScaling"])
def test_inferred_num_groups_refuses_a_checkpoint_of_another_group_count(tmp_path, cls):
    """``num_groups`` inferred: a 2-group checkpoint on 3-group data is refused before the first step, naming
    both counts and the fix (not one step later with a group-id error, nor trained on with 2 groups)."""
    from lightning_reweight.callbacks.febs import FairErrorBoundScaling
    from lightning_reweight.state.validate import TrainingSetChangedError

    cls = {"GroupDRO": GroupDRO, "FairErrorBoundScaling": FairErrorBoundScaling}[cls]
    path = _two_group_checkpoint(tmp_path, cls)
    resumed, module = cls(), GroupedModule()
    with pytest.raises(TrainingSetChangedError, match=r"checkpoint's 2 groups, but its group ids give 3 groups.*"
                                                      r"pass `num_groups=2`.*deleting `checkpoint\['callbacks'\]"):
        make_trainer([resumed], tmp_path / "b", max_epochs=2).fit(module, make_grouped_loader(n=24, num_groups=3),
                                                                  ckpt_path=path)
    assert module.records == [] and resumed.steps == 2  # no step taken: the restored state is as saved
    state = resumed.q if cls is GroupDRO else resumed.errors
    assert state.numel() == 2
    # the same data as the checkpoint's resumes
    make_trainer([cls()], tmp_path / "c", max_epochs=2).fit(GroupedModule(), make_grouped_loader(n=16, num_groups=2),
                                                            ckpt_path=path)


def test_explicit_num_groups_refuses_a_checkpoint_of_another_group_count_at_load(tmp_path):
    from lightning_reweight.state.validate import CheckpointStateError

    path = _two_group_checkpoint(tmp_path)
    resumed, module = GroupDRO(num_groups=3), GroupedModule()
    with pytest.raises(CheckpointStateError, match=r"expected 3 groups \(num_groups=3\), but the checkpoint's 'q' has 2"
                                                   r".*deleting `checkpoint\['callbacks'\]"):
        make_trainer([resumed], tmp_path / "b", max_epochs=2).fit(module, make_grouped_loader(n=24, num_groups=3),
                                                                  ckpt_path=path)
    assert module.records == [] and resumed.q is None and resumed.steps == 0


def test_restored_groups_are_checked_at_the_first_step_when_the_data_set_has_no_group_ids(tmp_path):
    """Group ids only in the batches (no ``groups`` on the data set): the first step names the checkpoint's
    group count and the fix, and changes nothing."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight.state.validate import TrainingSetChangedError

    cb = GroupDRO()
    q = torch.tensor([0.3, 0.7], dtype=torch.float64)
    cb.load_state_dict({"table": None, "extra": {"q": q.clone(), "steps": 4}})
    n = 12
    ds = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)), torch.arange(n), torch.arange(n) % 3)
    module = GroupedModule()
    with pytest.raises(TrainingSetChangedError, match=r"group ids below the checkpoint's 2 groups.*group id 2.*"
                                                      r"No state was updated.*pass `num_groups=2`"):
        make_trainer([cb], tmp_path).fit(module, DataLoader(ds, batch_size=6))
    assert torch.equal(cb.q, q) and cb.steps == 4
