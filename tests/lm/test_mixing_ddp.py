"""StreamMixture under 2-process CPU DDP: disjoint and complete shards, exact resume on 2 processes and onto 1."""

from pathlib import Path

import torch

from lightning_reweight.rules.balance import TemperatureSchedule
from tests.ddp_scripts.mixing_ddp import mixture, run
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_scripts" / "mixing_ddp.py"


def _load(out, phase):
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_shard_disjointly_and_resume_exactly_on_two_and_on_one(tmp_path):
    for phase in ("full", "resume"):  # "full" writes part.ckpt after step 5
        run_ddp_script(SCRIPT, tmp_path, phase)
    full, resume = _load(tmp_path, "full"), _load(tmp_path, "resume")
    # the global sequence: step s = rank 0's rows then rank 1's, exactly the 1-process draw with batch 8
    ref = mixture(8)
    ref.schedule, ref.total_sequences = TemperatureSchedule("cooldown"), 96  # what StreamMixing sets
    reference = ref.iter_batches(0, 1)
    for s in range(12):
        # rank r holds rows [4r, 4r + 4) of the global step: disjoint positions whose union is the step
        glued = torch.cat([full[0]["keys"][s], full[1]["keys"][s]])
        assert full[0]["keys"][s].numel() == full[1]["keys"][s].numel() == 4
        assert torch.equal(glued, next(reference)["key"])
    for r in range(2):
        keys = full[r]["keys"][:5] + resume[r]["keys"]
        assert len(keys) == 12 and all(torch.equal(a, b) for a, b in zip(keys, full[r]["keys"]))
        assert resume[r]["mixture"]["position"] == full[r]["mixture"]["position"] == 96
        assert torch.equal(resume[r]["mixture"]["counts"], full[r]["mixture"]["counts"])
    # the 2-process checkpoint resumed on 1 process (batch 8: the same global batch) continues the global sequence
    one = run(tmp_path, "resume1", devices=1, batch_size=8, ckpt=tmp_path / "part.ckpt")
    assert len(one["keys"]) == 7
    for s, keys in enumerate(one["keys"], start=5):
        assert torch.equal(keys, torch.cat([full[0]["keys"][s], full[1]["keys"][s]]))
    assert torch.equal(one["mixture"]["counts"], full[0]["mixture"]["counts"])
