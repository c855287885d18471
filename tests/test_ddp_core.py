"""2-process CPU DDP: LossReweighting tables identical on both ranks; uneven gathers are exact."""

from pathlib import Path

import torch

from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).parent / "ddp_scripts" / "loss_reweighting_ddp.py"


def test_ddp_tables_identical_and_gather_exact(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["rank"] == 0 and r1["rank"] == 1
    t0, t1 = r0["table"]["columns"], r1["table"]["columns"]
    assert set(t0) == {"loss", "ema_loss", "count", "weight"}
    for name in t0:
        torch.testing.assert_close(t0[name], t1[name], equal_nan=True, rtol=0, atol=0)
    # every sample seen: 3 epochs over 37 samples (DistributedSampler pads one duplicate per epoch)
    assert int(t0["count"].sum()) == 3 * 38 + 8  # + the 8-sample exactness probe below
    assert bool((t0["count"] >= 3).all())
    # the weights moved away from 1 after warm-up and the models stayed in sync
    assert not torch.allclose(t0["weight"], torch.ones_like(t0["weight"]))
    torch.testing.assert_close(r0["weight"], r1["weight"])
    # uneven gather: rank 0 gave 2 rows, rank 1 gave 3 rows, ordered by rank
    idx, val, extra = r0["uneven"]
    assert idx.tolist() == [0, 1, 100, 101, 102]
    assert val.tolist() == [0, 0, 1, 1, 1]
    assert extra.shape == (5, 2) and extra[2:].eq(1).all()
    # rank-averaged gradients of the uneven split equal the single-process weighted mean
    assert r0["grad_err"] is not None and r0["grad_err"] < 1e-6 and r1["grad_err"] < 1e-6
    for a, b in zip(r0["uneven"], r1["uneven"]):
        torch.testing.assert_close(a, b)
    # a NaN loss on rank 1 only, then an out-of-range index on rank 0 only: both ranks raise together, no table moved
    for r, nan_message in ((r0, "another rank has NaN/inf"), (r1, "NaN/inf at batch positions [0, 1]")):
        (nan_err, index_err), unchanged = r["rejected"]["messages"], r["rejected"]["unchanged"]
        assert nan_err.startswith("ValueError") and nan_message in nan_err
        assert index_err.startswith("IndexError") and "[0, 37)" in index_err and "[0, 37]" in index_err
        assert unchanged
