"""Lightning Fabric: the weighting callbacks of ``Fabric(callbacks=[...])`` run the same step as in the Trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn

from lightning_reweight import GroupDRO, LossReweighting, Reweighter, reduce_loss
from tests.helpers import REPO, make_trainer, run_ddp_script

from ._common import BATCH, FixedBatches, N, Tiny, collate, data, global_batches, step_extras


def _callbacks():
    return [LossReweighting("linupper", warmup_steps=2, num_samples=N, log_every_n_steps=1)]


def _sized(*cbs):
    """The training set has N samples (the Trainer's loader here holds one item per step)."""
    for cb in cbs:
        cb.num_samples = N
    return list(cbs)


#: every weighting callback that runs under Fabric (the others refuse, see below)
FACTORIES = {
    "linupper": _callbacks,
    "kl_dro_ema": lambda: [LossReweighting("kl_dro", normalizer="ema", warmup_steps=1, num_samples=N)],
    "group_dro": lambda: _sized(GroupDRO(num_groups=2, step_size=0.5)),
    "febs": lambda: _sized(__import__("lightning_reweight").FairErrorBoundScaling(num_groups=2)),
    "adawac": lambda: [__import__("lightning_reweight").AdaWAC(eta=2.0, num_samples=N)],
    "composed": lambda: _sized(GroupDRO(num_groups=2, step_size=0.5),
                               LossReweighting("quadratic", warmup_steps=1, num_samples=N)),
}


def _trainer_run(tmp_path, batches, factory=_callbacks):
    cbs = factory()
    module = Tiny()
    loader = torch.utils.data.DataLoader(FixedBatches(batches), batch_size=1, collate_fn=collate)
    make_trainer(cbs, tmp_path, max_epochs=1).fit(module, loader)
    return cbs, module


def _fabric_run(batches, cbs=None, state=None, save_at=None, save_path=None, loggers=None, factory=_callbacks):
    cbs = cbs or factory()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=cbs, loggers=loggers)
    module = Tiny()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    model, optimizer = fabric.setup(module, optimizer)
    start = 0
    if state is not None:
        restored = {"model": model, "optimizer": optimizer, "reweight": cbs[0]}
        rest = fabric.load(state, restored)
        start = rest["step"]
    x, y = data()
    for step in range(start, len(batches)):
        if save_at is not None and step == save_at:
            fabric.save(save_path, {"model": model, "optimizer": optimizer, "reweight": cbs[0], "step": step})
        index = batches[step]
        losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
        loss = reduce_loss(model, losses, index, **step_extras(model, index))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return cbs, module, fabric


def _same_tables(a, b):
    if a.table is None:
        assert b.table is None
        return
    for name, col in a.table.state_dict()["columns"].items():
        torch.testing.assert_close(col, b.table.state_dict()["columns"][name], equal_nan=True, msg=name)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_weighting_callback_equals_the_trainer_under_fabric(tmp_path, name):
    batches = global_batches(1)
    ref, ref_module = _trainer_run(tmp_path, batches, FACTORIES[name])
    cbs, module, _ = _fabric_run(batches, factory=FACTORIES[name])
    for a, b in zip(cbs, ref):
        _same_tables(a, b)
        assert (a.last_weights is None) == (b.last_weights is None)
        if a.last_weights is not None:
            torch.testing.assert_close(a.last_weights, b.last_weights)
        torch.testing.assert_close(a.extra_state(), b.extra_state(), equal_nan=True)
    torch.testing.assert_close(module.net.weight, ref_module.net.weight)


def test_fabric_equals_the_trainer_on_the_same_batches(tmp_path):
    batches = global_batches(2)
    ref, ref_module = _trainer_run(tmp_path, batches)
    cbs, module, _ = _fabric_run(batches)
    assert cbs[0].optimizer_steps == len(batches)  # counted from Fabric's optimizer hook
    _same_tables(cbs[0], ref[0])
    torch.testing.assert_close(cbs[0].last_weights, ref[0].last_weights)
    torch.testing.assert_close(module.net.weight, ref_module.net.weight)
    assert (cbs[0].table["weight"] != 1).any()  # past the warm-up the weights moved


def test_warm_up_counts_fabric_optimizer_steps_not_calls():
    cb = LossReweighting("linupper", warmup_steps=2, num_samples=N)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
    model, optimizer = fabric.setup(Tiny(), torch.optim.SGD(Tiny().parameters(), lr=0.1))
    x, y = data()
    for step in range(6):  # accumulate 3 micro-batches per optimizer step
        index = torch.arange(4) + 4 * step
        reduce_loss(model, F.cross_entropy(model(x[index]), y[index], reduction="none"), index)
        uniform = bool((cb.last_weights == 1).all())
        assert uniform == (cb.optimizer_steps < 2), step
        if step % 3 == 2:
            optimizer.step()
    assert cb.optimizer_steps == 2


def test_fabric_resume_equals_the_uninterrupted_run_twice(tmp_path):
    batches = global_batches(2)
    full, full_module, _ = _fabric_run(batches)
    first = tmp_path / "a.ckpt"
    _fabric_run(batches, save_at=2, save_path=first)
    second = tmp_path / "b.ckpt"
    _fabric_run(batches, state=first, save_at=4, save_path=second)  # a checkpoint written after a resume
    resumed, module, _ = _fabric_run(batches, state=second)
    _same_tables(resumed[0], full[0])
    assert resumed[0].optimizer_steps == full[0].optimizer_steps == len(batches)
    torch.testing.assert_close(module.net.weight, full_module.net.weight)


def test_fabric_logs_scalars_and_histograms(tmp_path):
    from lightning.fabric.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run")
    _, _, fabric = _fabric_run(global_batches(1), loggers=[logger])
    logger.finalize("success")
    metrics = Reweighter.for_fabric(fabric).metrics
    assert {"reweight/ess", "reweight/mean", "reweight/max"} <= set(metrics)
    events = EventAccumulator(logger.log_dir).Reload()
    assert "reweight/weights" in events.Tags()["histograms"]
    assert "reweight/ess" in events.Tags()["scalars"]


def test_eval_mode_and_no_callbacks_give_the_plain_mean():
    cb = LossReweighting(num_samples=N)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
    model = fabric.setup(Tiny())
    model.eval()
    losses = torch.rand(4, requires_grad=True)
    assert reduce_loss(model, losses, torch.arange(4)) == losses.mean()
    assert cb.table is None and cb.optimizer_steps == 0
    plain = fabric.setup(Tiny())  # another Fabric's module without callbacks
    other = Fabric(accelerator="cpu", devices=1)
    plain = other.setup(Tiny())
    assert reduce_loss(plain, losses, torch.arange(4)) == losses.mean()


def test_a_plain_module_under_fabric_goes_through_the_fabric():
    cb = GroupDRO(num_groups=2, step_size=0.5)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
    net = fabric.setup(nn.Linear(3, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    losses = F.cross_entropy(net(x), y, reduction="none")
    with pytest.raises(TypeError, match=r"does not know its Fabric.*reduce_loss\(fabric, losses, index\)"):
        reduce_loss(net, losses, torch.arange(6), group=y)
    reduce_loss(fabric, losses, None, group=y)
    assert cb.steps == 1 and not torch.equal(cb.q, torch.full((2,), 0.5))
    with torch.no_grad():  # evaluation under no_grad: the plain mean, no step
        reduce_loss(fabric, F.cross_entropy(net(x), y, reduction="none"), None, group=y)
    assert cb.steps == 1


def test_a_plain_module_without_lightning_is_refused_naming_the_reweighter():
    with pytest.raises(TypeError, match=r"got Linear.*Reweighter\(\[\.\.\.\]\).*reduce_loss\(fabric"):
        reduce_loss(nn.Linear(2, 2), torch.rand(3, requires_grad=True), torch.arange(3))


@pytest.mark.parametrize("world", [2])
def test_two_process_fabric_equals_one_process(tmp_path, world):
    """Each rank takes rows ``r::2`` of every global batch: the table equals the 1-process run's."""
    run_ddp_script(REPO / "tests" / "ddp_scripts" / "fabric_ddp.py", tmp_path)
    batches = global_batches(2)
    single, _, _ = _fabric_run(batches)
    for rank in range(world):
        table = torch.load(tmp_path / f"table_{rank}.pt")
        for name, col in single[0].table.state_dict()["columns"].items():
            torch.testing.assert_close(table[name], col, equal_nan=True, msg=name, rtol=1e-5, atol=1e-6)
    assert BATCH % world == 0


@pytest.mark.parametrize("make, fix", [
    (lambda: __import__("lightning_reweight").GroupBalancing(mode="upsample"), r"TemperatureSampler"),
    (lambda: __import__("lightning_reweight").ImportanceSampling(num_samples=N), r"ImportanceSampler"),
    (lambda: __import__("lightning_reweight").EATA(), r"trainer.test\(\)"),
])
def test_callbacks_that_need_the_trainer_refuse_under_fabric(make, fix):
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[LossReweighting(num_samples=N), make()])
    model = fabric.setup(Tiny())
    with pytest.raises(RuntimeError, match=r"cannot run in Lightning Fabric: .*" + fix):
        reduce_loss(model, torch.rand(4, requires_grad=True), torch.arange(4))


def test_upweighting_reads_groups_from_the_loader_the_door_is_given():
    from lightning_reweight import GroupBalancing, IndexedDataset

    groups = torch.tensor([0] * 18 + [1] * 6)
    dataset = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(N, 1)), groups=groups)
    cb = GroupBalancing(mode="upweight", tau=float("inf"))
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
    model = fabric.setup(Tiny())
    losses = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"group id.*train_dataloader=loader"):
        reduce_loss(model, losses, torch.arange(4))
    Reweighter.for_fabric(fabric, train_dataloader=torch.utils.data.DataLoader(dataset, batch_size=4))
    index = torch.tensor([0, 1, 20, 21])
    reduce_loss(model, losses, index, group=groups[index])
    torch.testing.assert_close(cb.last_weights[2] / cb.last_weights[0], torch.tensor(3.0))  # 18 vs 6 samples


def _sampled_run(tmp_path, stop=None, resume=None):
    """Fabric + WeightedSampler + LossReweighting; returns the indices drawn and the callback."""
    from lightning_reweight import IndexedDataset, WeightedSampler

    cb = LossReweighting("linupper", warmup_steps=1, num_samples=N)
    sampler = WeightedSampler(torch.linspace(1, 3, N), num_samples=N, replacement=False, seed=3)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
    Reweighter.for_fabric(fabric, samplers=[sampler])
    model = fabric.setup(Tiny())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    # not `fabric.setup_dataloaders`: its loader sets the sampler's epoch to its own iter() count, which restarts
    # at 0 in a resumed process (the sampler refuses that, see below); set the epoch here instead
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(x, y)), batch_size=4,
                                         sampler=sampler)
    seen, step = [], 0
    if resume is not None:
        step = fabric.load(resume, {"model": model, "optimizer": optimizer, "reweight": cb, "sampler": sampler})["step"]
    for epoch in range(step // 6, 2):
        sampler.set_epoch(epoch)
        for xb, yb, index in loader:
            if stop is not None and step == stop:
                fabric.save(tmp_path / "mid.ckpt", {"model": model, "optimizer": optimizer, "reweight": cb,
                                                    "sampler": sampler, "step": step})
                return seen, cb
            loss = reduce_loss(model, F.cross_entropy(model(xb), yb, reduction="none"), index)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            seen.append(index)
            step += 1
    return seen, cb


def test_fabric_resumes_the_sampler_mid_epoch_exactly(tmp_path):
    full, full_cb = _sampled_run(tmp_path)
    head, _ = _sampled_run(tmp_path, stop=8)  # epoch 1, batch 2 of 6
    tail, cb = _sampled_run(tmp_path, resume=tmp_path / "mid.ckpt")
    assert torch.equal(torch.cat(head + tail), torch.cat(full))  # nothing skipped or replayed
    _same_tables(cb, full_cb)


def test_fabric_loader_resetting_the_epoch_after_a_resume_is_refused(tmp_path):
    from lightning_reweight import IndexedDataset, WeightedSampler

    _sampled_run(tmp_path, stop=8)

    sampler = WeightedSampler(torch.linspace(1, 3, N), num_samples=N, replacement=False, seed=3)
    fabric = Fabric(accelerator="cpu", devices=1)
    sampler.load_state_dict(torch.load(tmp_path / "mid.ckpt", weights_only=False)["sampler"])
    x, y = data()
    loader = fabric.setup_dataloaders(
        torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(x, y)), batch_size=4,
                                    sampler=sampler), use_distributed_sampler=False)
    with pytest.raises(RuntimeError, match=r"set_epoch\(0\) would discard the restored position.*epoch 1"):
        next(iter(loader))
