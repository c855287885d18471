"""A plain loop without Lightning: ``Reweighter`` holds the callbacks, gathers through ``torch.distributed``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight import GroupDRO, LossReweighting, Reweighter
from lightning_reweight.state.validate import CheckpointStateError
from tests.helpers import REPO, run_ddp_script

from ._common import N, Tiny, data, global_batches


def _loop(batches, reweighter=None, start=0, stop=None, accumulate=1):
    cb = LossReweighting("linupper", warmup_steps=2, num_samples=N)
    module = Tiny()
    reweighter = reweighter or Reweighter([cb], model=module, accumulate_grad_batches=accumulate)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x, y = data()
    for step, index in enumerate(batches[start:stop], start):
        loss = reweighter.reduce(F.cross_entropy(module(x[index]), y[index], reduction="none"), index)
        loss.backward()
        if (step + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    return reweighter


def test_plain_loop_equals_the_fabric_and_trainer_step():
    from .test_fabric import _fabric_run

    batches = global_batches(2)
    loop = _loop(batches)
    fabric_cbs, _, _ = _fabric_run(batches)
    cb = loop.callbacks[0]
    assert cb.optimizer_steps == len(batches)
    for name, col in cb.table.state_dict()["columns"].items():
        torch.testing.assert_close(col, fabric_cbs[0].table.state_dict()["columns"][name], equal_nan=True)


def test_accumulation_counts_optimizer_steps():
    loop = _loop(global_batches(2), accumulate=3)
    assert loop.micro_steps == 6 and loop.callbacks[0].optimizer_steps == 2


class _Run:
    """A plain training loop whose whole state (model, optimizer, reweighter) can be saved and restored."""

    def __init__(self):
        self.module = Tiny()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.5)
        self.reweighter = Reweighter([LossReweighting("linupper", warmup_steps=2, num_samples=N)],
                                     model=self.module)
        self.step = 0

    def train(self, batches, until):
        x, y = data()
        while self.step < until:
            index = batches[self.step]
            loss = self.reweighter.reduce(F.cross_entropy(self.module(x[index]), y[index], reduction="none"), index)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.step += 1
        return self

    def save(self, path):
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "reweight": self.reweighter.state_dict(), "step": self.step}, path)

    @classmethod
    def load(cls, path):
        run, state = cls(), torch.load(path, weights_only=False)
        run.module.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.reweighter.load_state_dict(state["reweight"])
        run.step = state["step"]
        return run


def test_state_dict_round_trip_and_a_second_resume_are_exact(tmp_path):
    batches = global_batches(2)
    full = _Run().train(batches, len(batches))
    _Run().train(batches, 2).save(tmp_path / "a.pt")
    _Run.load(tmp_path / "a.pt").train(batches, 4).save(tmp_path / "b.pt")  # written after a resume
    resumed = _Run.load(tmp_path / "b.pt").train(batches, len(batches))
    a, b = resumed.reweighter.callbacks[0], full.reweighter.callbacks[0]
    assert a.optimizer_steps == b.optimizer_steps == len(batches)
    assert resumed.reweighter.micro_steps == len(batches)
    for name, col in a.table.state_dict()["columns"].items():
        torch.testing.assert_close(col, b.table.state_dict()["columns"][name], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(resumed.module.net.weight, full.module.net.weight, rtol=0, atol=0)


def test_load_refuses_other_callbacks_and_bad_entries_before_assigning():
    state = _loop(global_batches(1)).state_dict()
    other = Reweighter([GroupDRO(num_groups=2)])
    with pytest.raises(CheckpointStateError, match=r"other callbacks.*same callbacks"):
        other.load_state_dict(state)
    target = Reweighter([LossReweighting("linupper", warmup_steps=2, num_samples=N)])
    key = target.callbacks[0].state_key
    state["callbacks"][key]["table"]["columns"]["weight"] = torch.full((N,), float("nan"))
    with pytest.raises(CheckpointStateError, match=r"weight"):
        target.load_state_dict(state)
    assert target.micro_steps == 0 and target.callbacks[0].table is None
    with pytest.raises(CheckpointStateError, match=r"micro_steps"):
        target.load_state_dict({"callbacks": {}, "micro_steps": -1, "epoch": 0})


def test_eval_mode_is_the_plain_mean_and_changes_nothing():
    module = Tiny()
    cb = LossReweighting(num_samples=N)
    reweighter = Reweighter([cb], model=module)
    module.eval()
    losses = torch.rand(4)
    assert reweighter.reduce(losses, torch.arange(4)) == losses.mean()
    assert cb.table is None and reweighter.micro_steps == 0


def test_constructor_refusals():
    with pytest.raises(TypeError, match=r"weighting callbacks.*got str"):
        Reweighter(["linupper"])
    with pytest.raises(ValueError, match=r"distinct `state_key`s.*name="):
        Reweighter([LossReweighting(num_samples=4), LossReweighting(num_samples=4)])
    with pytest.raises(ValueError, match=r"accumulate_grad_batches.*positive int"):
        Reweighter([], accumulate_grad_batches=0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bogus'"):
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        Reweighter.for_fabric(fabric)
        Reweighter.for_fabric(fabric, bogus=1)


def test_losses_without_gradient_in_training_are_refused_before_any_state_changes():
    cb = LossReweighting(num_samples=N)
    reweighter = Reweighter([cb])
    with pytest.raises(ValueError, match=r"carry gradient.*no_grad.*eval\(\)"):
        reweighter.reduce(torch.rand(4), torch.arange(4))
    assert int(cb.table["count"].sum()) == 0 and reweighter.micro_steps == 0 and cb.optimizer_steps == 0


def test_two_processes_equal_one_and_refuse_together(tmp_path):
    run_ddp_script(REPO / "tests" / "ddp_scripts" / "reweighter_ddp.py", tmp_path)
    single = _loop(global_batches(2)).callbacks[0]
    for rank in range(2):
        table = torch.load(tmp_path / f"table_{rank}.pt")
        for name, col in single.table.state_dict()["columns"].items():
            torch.testing.assert_close(table[name], col, equal_nan=True, rtol=1e-5, atol=1e-6)
    r0, r1 = (json.loads((tmp_path / f"refusals_{r}.json").read_text()) for r in range(2))
    assert r1["float_index"].startswith("TypeError") and "integer dataset index" in r1["float_index"]
    assert r0["float_index"].startswith("StepInputError") and "[1]" in r0["float_index"]
    assert r0["wide_index"].startswith("ValueError") and "1-D" in r0["wide_index"]
    assert r1["wide_index"].startswith("StepInputError") and "[0]" in r1["wide_index"]
    assert r1["column_losses"].startswith("ValueError") and "1-D per-sample" in r1["column_losses"]
    assert r0["column_losses"].startswith("StepInputError") and "[1]" in r0["column_losses"]
    assert r0["no_grad"].startswith("ValueError") and "gradient" in r0["no_grad"]
    assert r1["no_grad"].startswith("StepInputError") and "[0]" in r1["no_grad"]
    for r in (r0, r1):
        assert r["same_keys"].startswith("ValueError") and "two ranks" in r["same_keys"]
        assert "every rank reads the same data" in r["same_keys"] and r["unchanged"]
