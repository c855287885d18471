"""Cross-rank guard on 2 "nodes" x 1 CPU process, where node 1's process has global rank 1
but local rank 0: each rank trains its own rows (global-rank shards) and the guard passes; a rank that plans
another sequence or holds a diverged table is caught on every rank, naming the ranks."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_reweight.callbacks.consistency import rank_fingerprint, tensor_fingerprint
from tests.helpers import ddp_env

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "two_nodes_guard_ddp.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_nodes(out: Path, mode: str) -> list[dict]:
    port = str(_free_port())
    procs = []
    for node in range(2):
        env = ddp_env(NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(out), mode], cwd=str(out), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_nodes_each_rank_trains_its_global_shard(tmp_path):
    r = _run_two_nodes(tmp_path, "ok")
    assert [x["global_rank"] for x in r] == [0, 1] and [x["local_rank"] for x in r] == [0, 0]
    assert [x["node_rank"] for x in r] == [0, 1] and [x["sampler_rank"] for x in r] == [0, 1]
    assert all(x["error"] == "" for x in r)  # the guard ran (world size 2) and passed
    for epoch in range(2):
        glob = r[0]["globals"][epoch]
        assert torch.equal(glob, r[1]["globals"][epoch])
        for rank in range(2):
            mine = [i for e, idx in r[rank]["seen"] if e == epoch for i in idx]
            assert mine == glob[rank::2].tolist()


@pytest.mark.parametrize(("mode", "what", "epoch"), [("seed", "planned global sequence", 0),
                                                      ("table", "table column 'ema_loss'", 1)])
def test_guard_catches_a_diverged_rank(tmp_path, mode, what, epoch):
    r = _run_two_nodes(tmp_path, mode)
    for x in r:  # both ranks stop with the same diagnosis
        assert what in x["error"] and "rank(s) [1] differ from rank 0" in x["error"]
        assert f"epoch {epoch}" in x["error"]
        assert max(e for e, _ in x["seen"]) == epoch  # stopped in the epoch where it diverged


def test_fingerprints_are_exact_and_cheap_to_compare():
    t = torch.rand(1000)
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())
    u = t.clone()
    u[500] = torch.nextafter(u[500], torch.tensor(2.0))  # one ulp in one row
    assert tensor_fingerprint(u) != tensor_fingerprint(t)
    assert tensor_fingerprint(t.flip(0)) != tensor_fingerprint(t)  # order matters
    names, values = rank_fingerprint(None, [])
    assert names == [] and values == []


class _Strategy:
    def __init__(self, others):
        self.others, self.root_device = others, torch.device("cpu")

    def all_gather(self, vector):
        return torch.stack([vector, *[f(vector.clone()) for f in self.others]])


def _trainer(*others):
    from types import SimpleNamespace

    return SimpleNamespace(world_size=1 + len(others), global_rank=0, current_epoch=3, callbacks=[],
                           strategy=_Strategy(others))


def test_guard_names_the_diverged_component_and_ranks_without_ddp():
    from lightning_reweight.callbacks.consistency import RankConsistencyError, check_rank_consistency
    from lightning_reweight.samplers import WeightedSampler

    sampler = WeightedSampler(torch.ones(20), seed=1)
    list(sampler)  # plans epoch 0: sets the fingerprint
    same = lambda v: v  # noqa: E731

    def other_seed(v):
        v[1] += 1
        return v

    check_rank_consistency(_trainer(same, same), [sampler])  # three agreeing ranks: passes
    with pytest.raises(RankConsistencyError, match=r"planned global sequence of sampler 0 \(WeightedSampler\): "
                                                   r"rank\(s\) \[2\] differ from rank 0"):
        check_rank_consistency(_trainer(same, other_seed), [sampler])

    def fewer(v):
        v[0] -= 1
        return v

    with pytest.raises(RankConsistencyError, match="number of checked components per rank"):
        check_rank_consistency(_trainer(fewer), [sampler])
