"""Every real weighting callback is ``device_ready``: on a non-CPU batch its step issues no host read.

The CPU check runs each step on the ``meta`` device, where any host read (``.item()``, ``.tolist()``,
``bool(tensor)``, ``torch.unique``, ``bincount``, boolean-mask indexing, ...) raises; the contract's host-read
helper is also counted. A CUDA test repeats it with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

import lightning_reweight.engine as contract
from lightning_reweight import (
    AdaWAC,
    FairErrorBoundScaling,
    GroupBalancing,
    GroupDRO,
    ImportanceSampling,
    LossReweighting,
    reduce_loss,
)
from lightning_reweight.engine import _batch_device

from ..core.conftest import TinyModule
from ..core.test_contract import _attach

N, B, G = 64, 16, 4


def _groups() -> torch.Tensor:
    return torch.arange(N) % G


FACTORIES = {
    "loss_reweighting_linupper": lambda **kw: LossReweighting("linupper", warmup_steps=0, num_samples=N, **kw),
    "loss_reweighting_kl_dro_ema": lambda **kw: LossReweighting("kl_dro", normalizer="ema", num_samples=N, **kw),
    "group_dro": lambda **kw: GroupDRO(num_groups=G, **kw),
    "fair_error_bound_scaling": lambda **kw: FairErrorBoundScaling(num_groups=G, **kw),
    "group_balancing_upweight": lambda **kw: GroupBalancing(mode="upweight", tau=1e9, **kw),
    "group_balancing_upsample": lambda **kw: GroupBalancing(mode="upsample", tau=1e9, **kw),
    "importance_sampling": lambda **kw: ImportanceSampling(score="loss", **kw),
    "adawac": lambda **kw: AdaWAC(eta=2.0, num_samples=N, **kw),
}


def _prepare(cb, trainer) -> None:
    """What ``fit`` would have set up before the first step (the callbacks that read the data set)."""
    if isinstance(cb, GroupBalancing):
        cb.groups, cb.counts = _groups(), torch.bincount(_groups(), minlength=G)
    if isinstance(cb, ImportanceSampling):
        cb.num_samples = N


def _step(module, device, index, x):
    losses = module.net(x).logsumexp(-1)
    extras = {"consistency": losses.detach() * 0.5} if device is not None else {}
    return reduce_loss(module, losses, index, group=index % G, **extras)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_real_callback_is_device_ready_and_forwards_the_options(name):
    cb = FACTORIES[name](fresh_table=True, device="cpu", sync_checks=False)
    assert cb.device_ready
    assert cb.fresh_table and cb.device == torch.device("cpu") and not cb.sync_checks
    assert _batch_device(torch.empty(4, device="meta"), [FACTORIES[name]()]) == torch.device("meta")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_step_on_a_device_makes_no_host_read(name, tmp_path, monkeypatch):
    module = TinyModule()
    cb = FACTORIES[name](sync_checks=False, log_every_n_steps=0)
    trainer = _attach(module, [cb], tmp_path)
    _prepare(cb, trainer)
    module.to("meta")
    reads = []
    monkeypatch.setattr(contract, "_host", lambda values: reads.append(values) or [True] * len(values))

    def forbidden(*args, **kwargs):
        raise AssertionError("a host read on the device path")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    x, index = torch.randn(B, 4, device="meta"), torch.arange(B, device="meta")
    loss = _step(module, "meta", index, x)  # the first step allocates the state on the device
    assert loss.device.type == "meta" and loss.shape == ()
    # the second reuses it: no host-to-device copy either (from pageable memory a copy synchronises on CUDA),
    # neither an explicit `.to(device)` of a CPU tensor nor a Python scalar / CPU tensor assigned into
    # device memory (`t[idx] = True` copies a CPU scalar; `index_fill_` or a device tensor does not)
    to, setitem = torch.Tensor.to, torch.Tensor.__setitem__

    def no_upload(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            raise AssertionError("a host-to-device copy on the device path")
        return out

    def no_scalar_store(self, key, value):
        if self.device.type != "cpu" and (not isinstance(value, torch.Tensor) or value.device.type == "cpu"):
            raise AssertionError(f"a host value ({type(value).__name__}) stored into device memory")
        return setitem(self, key, value)

    monkeypatch.setattr(torch.Tensor, "to", no_upload)
    monkeypatch.setattr(torch.Tensor, "__setitem__", no_scalar_store)
    loss = _step(module, "meta", index, x)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
    assert loss.device.type == "meta" and loss.shape == ()
    assert reads == []
    assert len(cb._deferred) >= 2  # the checks were deferred (the contract, and the callback's own), not read
    if cb.table is not None:
        assert cb.table["count"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that a GPU step of every callback "
                                                          "issues no host sync (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_gpu_step_of_every_callback_issues_no_host_sync(name, tmp_path):
    module = TinyModule()
    cb = FACTORIES[name](sync_checks=False, log_every_n_steps=0)
    trainer = _attach(module, [cb], tmp_path)
    _prepare(cb, trainer)
    module.to("cuda")
    x, index = torch.randn(B, 4, device="cuda"), torch.randperm(N, device="cuda")[:B]
    _step(module, "cuda", index, x)  # first step: moves or allocates the state on the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(module, "cuda", index, x).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cb.check_deferred()  # both steps were valid
