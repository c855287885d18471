"""Item 4 under 2-process CPU DDP: disjoint rank shards and an exact mid-epoch resume (also onto 1 process)."""

from pathlib import Path

import torch

from lightning_reweight.data.text import CharStreamDataModule
from tests.helpers import run_ddp_script
from tests.lm.test_text_stream import _fit

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_scripts" / "lm_stream_ddp.py"


def _load(out, phase):
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_process_stream_resumes_exactly_and_onto_one_process(text_file, tmp_path):
    for phase in ("full", "part", "resume"):
        run_ddp_script(SCRIPT, tmp_path, str(text_file), phase)
    full, part, resume = _load(tmp_path, "full"), _load(tmp_path, "part"), _load(tmp_path, "resume")
    # 337 windows / (4 per rank x 2 ranks) = 42 steps per epoch: 60 steps cross an epoch
    for r in range(2):
        keys = part[r]["keys"] + resume[r]["keys"]
        assert len(keys) == len(full[r]["keys"]) == 60
        assert all(torch.equal(a, b) for a, b in zip(keys, full[r]["keys"]))  # exact continuation per rank
        for p, q in zip(resume[r]["params"], full[r]["params"]):
            torch.testing.assert_close(p, q)
    # ranks hold disjoint windows at every step, and the per-sample tables are identical on both ranks
    for a, b in zip(full[0]["keys"], full[1]["keys"]):
        assert not set(a.tolist()) & set(b.tolist())
    for name, col in full[0]["table"]["columns"].items():
        torch.testing.assert_close(col, full[1]["table"]["columns"][name], equal_nan=True, rtol=0, atol=0)
    count = full[0]["table"]["columns"]["count"]
    # epoch 0: 42 steps of 8 (the 337th window does not fill one per rank: dropped with a warning), then 18
    assert int(count.sum()) == 60 * 8 and int((count == 0).sum()) <= 1
    # the 2-process order is the global order: step j is chunk j of the epoch, split r::2
    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=4, seed=1)
    dm.setup()
    order = dm.train_stream.order(0)
    for j in range(25):
        chunk = order[j * 8:(j + 1) * 8]
        assert part[0]["keys"][j].tolist() == chunk[0::2].tolist()
        assert part[1]["keys"][j].tolist() == chunk[1::2].tolist()
    # the same 2-process checkpoint resumed on ONE process continues the global order where it stopped
    assert part[0]["stream"]["position"] == 25 * 8
    one, _, _, one_dm = _fit(text_file, tmp_path / "one", 25 + 10, ckpt=str(tmp_path / "part.ckpt"))
    assert torch.cat(one).tolist() == order[200:240].tolist()
    assert one_dm.state_dict()["position"] == 240
