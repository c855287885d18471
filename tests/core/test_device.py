"""The device path: GlobalBatch and tables on the losses' device, and a step without host synchronisation."""

from types import SimpleNamespace

import pytest
import torch

from lightning_reweight import WeightingCallback, reduce_loss
from lightning_reweight.engine import _batch_device

from .conftest import TinyModule
from .test_contract import _attach


class OnDevice(WeightingCallback):
    """A device-ready toy callback (pure tensor ops, no host reads)."""

    device_ready = True

    def compute_weights(self, batch, trainer, pl_module):
        return 1.0 + batch.losses / batch.losses.sum()


META = torch.device("meta")


def test_batch_stays_on_the_losses_device_only_when_every_callback_is_device_ready():
    losses = torch.empty(4, device=META)
    assert _batch_device(losses, [OnDevice(num_samples=8)]) == META
    assert _batch_device(losses, [OnDevice(num_samples=8), WeightingCallback()]) == torch.device("cpu")
    assert _batch_device(losses, [OnDevice(num_samples=8, device="cpu")]) == torch.device("cpu")
    assert _batch_device(torch.empty(4), [OnDevice(num_samples=8)]) == torch.device("cpu")


def test_table_is_created_on_the_modules_device():
    module_on_meta = SimpleNamespace(device=META)
    assert OnDevice(num_samples=8).ensure_table(None, module_on_meta)["loss"].device == META
    assert OnDevice(num_samples=8, device="cpu").ensure_table(None, module_on_meta)["loss"].device.type == "cpu"
    assert WeightingCallback(num_samples=8).ensure_table(None, module_on_meta)["loss"].device.type == "cpu"


def test_device_table_restored_from_a_cpu_checkpoint_moves_to_the_device():
    state = OnDevice(num_samples=8, device="cpu")
    state.ensure_table(None)
    cb = OnDevice(num_samples=8)
    cb.load_state_dict(state.state_dict())
    assert cb.ensure_table(None, SimpleNamespace(device=META))["weight"].device == META


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that a GPU step issues no host sync "
                                                          "(torch.cuda.set_sync_debug_mode('error'))")
@pytest.mark.parametrize("sync_checks", [False, True])
def test_gpu_step_issues_no_host_sync(tmp_path, sync_checks):
    module = TinyModule()
    cb = OnDevice(num_samples=64, sync_checks=sync_checks)
    _attach(module, [cb], tmp_path)
    module.to("cuda")
    x, index = torch.randn(16, 4, device="cuda"), torch.randperm(64, device="cuda")[:16]
    losses = module.net(x).logsumexp(-1)
    reduce_loss(module, losses, index)  # first step: allocates the table
    assert cb.table["loss"].device.type == "cuda"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if sync_checks:  # exactly the two documented host reads
            with pytest.raises(RuntimeError, match="synchroniz"):
                reduce_loss(module, module.net(x).logsumexp(-1), index)
        else:
            loss = reduce_loss(module, module.net(x).logsumexp(-1), index)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if not sync_checks:
        cb.check_deferred()
        assert int(cb.table["count"].sum()) == 32
