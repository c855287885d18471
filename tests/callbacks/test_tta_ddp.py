"""2-process CPU DDP: EATA (Tent shares all but the sample selection) keeps γ/β, optimiser state and ``m``
identical on both ranks, equal to a single-process reference that sees both ranks' batches (BatchNorm statistics
per rank, selection, ``m`` and loss global)."""

from pathlib import Path

import torch

from lightning_reweight.rules.tta import softmax_entropy
from tests.helpers import run_ddp_script

from .test_tta import source_tta_logits
from .tta_reference import make_data, make_model, reference_adapt

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "tta_ddp.py"


def test_tta_ddp_state_identical_and_equal_to_reference(tmp_path):
    model = make_model()
    x, _ = make_data(32)
    e0 = float(softmax_entropy(source_tta_logits(model, x)).median())
    run_ddp_script(SCRIPT, tmp_path, repr(e0))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    a, b = r0["eata"], r1["eata"]
    torch.testing.assert_close(a["adapted"], b["adapted"], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=0, atol=0)
    torch.testing.assert_close(a["extra"], b["extra"], rtol=0, atol=0)
    assert a["counters"] == b["counters"]
    # DistributedSampler(shuffle=False): rank r reads samples r, r+2, ...; 2 steps of 8 per rank
    shards = [x[0::2], x[1::2]]
    steps = [[s[i:i + 8] for s in shards] for i in (0, 8)]
    fx, _ = make_data(16, seed=5)
    fisher_batches = [fx[:8], fx[8:]]
    ref = reference_adapt(model, steps, method="eata", e0=e0, d_margin=0.4, alpha=3.0, fisher_batches=fisher_batches,
                          lr=1e-2)
    eata = r0["eata"]
    for k, v in ref["params"].items():
        torch.testing.assert_close(eata["adapted"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eata["extra"]["moving_average"], ref["m"], rtol=1e-5, atol=1e-6)
    assert eata["counters"]["samples"] == 32 and eata["counters"]["backward_samples"] == ref["selected"]
    assert 0 < ref["selected"] < 32
