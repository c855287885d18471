"""2-process CPU DDP: WeightedSampler shards are disjoint and together equal the global draw; mid-epoch
resume is exact on both ranks; Lightning's re-wrapping (``use_distributed_sampler=True``) raises."""

from pathlib import Path

import torch

from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "weighted_sampler_ddp.py"


def test_weighted_sampler_under_ddp(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    assert [x["rank"] for x in r] == [0, 1]
    assert r[0]["len"] == r[1]["len"] == 23  # ceil(45 / 2)
    for epoch in range(2):
        torch.testing.assert_close(r[0]["globals"][epoch], r[1]["globals"][epoch], rtol=0, atol=0)
        g = r[0]["globals"][epoch]
        per_rank = [torch.tensor([i for e, b in x["full"] if e == epoch for i in b]) for x in r]
        assert per_rank[0].numel() == per_rank[1].numel() == 23
        rebuilt = torch.empty(46, dtype=torch.int64)
        rebuilt[0::2], rebuilt[1::2] = per_rank  # disjoint positions, union = the global draw
        assert torch.equal(rebuilt, g)
    assert not torch.equal(r[0]["globals"][0], r[0]["globals"][1])
    for x in r:  # interrupted at step 10 (epoch 1, batch 2) and resumed: same indices, same order
        assert [b for _, b in x["resumed"]] == [b for _, b in x["full"]]
        assert "use_distributed_sampler=False" in x["raised"]
