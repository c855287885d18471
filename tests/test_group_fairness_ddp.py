"""2-process CPU DDP (one launch for both checks):

* GroupDRO q and FEBS errors are identical on both ranks and equal a replay of the *global* batches;
* equity-scaled and group-wise metrics computed in DDP equal the single-process values on all the data.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import BinaryAccuracy

from lightning_reweight.metrics import (
    GroupwiseMetric,
    equity_scaled_accuracy,
    equity_scaled_auroc,
    equity_scaled_dice,
    equity_scaled_iou,
)
from lightning_reweight.rules.fairness import group_dro_update, group_means, update_group_errors
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).parent / "ddp_scripts" / "group_fairness_ddp.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("group_fairness_ddp")
    run_ddp_script(SCRIPT, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _script():
    spec = importlib.util.spec_from_file_location("group_fairness_ddp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_group_state_identical_and_global(ranks):
    r0, r1 = ranks
    torch.testing.assert_close(r0["q"], r1["q"], rtol=0, atol=0)
    torch.testing.assert_close(r0["errors"], r1["errors"], rtol=0, atol=0)
    assert r0["steps"] == r1["steps"] == (8, 8)  # 2 epochs x 4 steps
    # replay from the global batches = rank 0's rows then rank 1's rows of each step
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    errors, seen = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
    local_only_q = q.clone()
    for (_, g0, l0), (_, g1, l1) in zip(r0["records"], r1["records"]):
        group, losses = torch.cat([g0, g1]), torch.cat([l0, l1]).double()
        means, counts = group_means(losses, group, 3)
        q = group_dro_update(q, means, 0.5)
        errors, seen = update_group_errors(errors, seen, means, counts > 0, 0.5)
        local_means, _ = group_means(l0.double(), g0, 3)
        local_only_q = group_dro_update(local_only_q, local_means, 0.5)
    torch.testing.assert_close(r0["q"], q)
    torch.testing.assert_close(r0["errors"], errors)
    assert not torch.allclose(local_only_q, q)  # a per-rank (local) update would have diverged


def test_metrics_equal_single_process(ranks):
    r0, r1 = ranks[0]["metrics"], ranks[1]["metrics"]
    seg_logits, seg_target, scores, target, group = _script().make_val_data()
    g = 4
    ref = {
        "es_dice": equity_scaled_dice(seg_logits, seg_target, group, g),
        "es_iou": equity_scaled_iou(seg_logits, seg_target, group, g, mode="std"),
        "es_acc": equity_scaled_accuracy(scores, target, group, g),
        "es_auc": equity_scaled_auroc(scores, target, group, g),
    }
    single = GroupwiseMetric(BinaryAccuracy(), g, prefix="acc_")
    single.update(scores, target, group)
    ref.update(single.compute())
    assert "acc_group_3" in ref  # group 3 lives on rank 0 only; rank 1 still reports it
    # each rank saw half of the data, yet both computed the global values
    assert r0["local_count"] + r1["local_count"] == int((group >= 0).sum())
    assert 0 < r1["local_count"] < int((group >= 0).sum())
    for key, value in ref.items():
        assert r0[key] == pytest.approx(float(value), rel=1e-5), key
        assert r1[key] == pytest.approx(float(value), rel=1e-5), key
