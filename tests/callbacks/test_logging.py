"""Logging steps on a device: the weights, groups and per-group state reach the host in one transfer each."""

import types

import pytest
import torch

from lightning_reweight.callbacks.logging import log_weight_stats, to_host


def _fake_copy(monkeypatch):
    """``Tensor.cpu`` of a meta tensor returns known values (0, 1, 2, ... mod 3) and is counted; any other read
    of a meta tensor raises, as it cannot be read."""
    copies, cpu = [], torch.Tensor.cpu

    def fake(t, *args, **kwargs):
        if t.device.type != "meta":
            return cpu(t, *args, **kwargs)
        copies.append(t.numel())
        return (torch.arange(t.numel(), dtype=t.dtype) % 3).reshape(t.shape)

    monkeypatch.setattr(torch.Tensor, "cpu", fake)
    return copies


def test_to_host_one_transfer_keeps_shapes_dtypes_and_cpu_tensors(monkeypatch):
    copies = _fake_copy(monkeypatch)
    here = torch.tensor([1.5, 2.5])
    a = torch.empty(2, 3, device="meta", dtype=torch.float32)
    b = torch.empty(4, device="meta", dtype=torch.int64)
    c = torch.empty(3, device="meta", dtype=torch.bool)
    out = to_host(a, None, here, b, c)
    assert copies == [13]  # one transfer for the three device tensors
    assert out[1] is None and out[2] is here
    assert [(t.shape, t.dtype, t.device.type) for t in (out[0], out[3], out[4])] == [
        ((2, 3), torch.float32, "cpu"), ((4,), torch.int64, "cpu"), ((3,), torch.bool, "cpu")]
    # the buffer is split in order: a = 0..5, b = 6..9, c = 10..12 (mod 3)
    assert out[0].flatten().tolist() == [0, 1, 2, 0, 1, 2] and out[3].tolist() == [0, 1, 2, 0]
    assert out[4].tolist() == [True, True, False]  # 1, 2, 0
    assert to_host(here, None) == [here, None]  # nothing on a device: no copy
    assert copies == [13]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the float64 buffer round trip through a "
                                                          "real device")
def test_to_host_is_exact_for_large_ids_and_float64():
    x = torch.tensor([2**52 + 1, -3], dtype=torch.int64)
    y = torch.tensor([0.1, 1e300], dtype=torch.float64)
    xs, ys = to_host(x.cuda(), y.cuda())
    assert torch.equal(xs, x) and torch.equal(ys, y)


def test_log_weight_stats_reads_a_device_batch_once(monkeypatch):
    copies = _fake_copy(monkeypatch)
    logged = {}
    trainer = types.SimpleNamespace(
        is_global_zero=True, global_step=7, callback_metrics={},
        loggers=[types.SimpleNamespace(log_metrics=lambda m, step: logged.update(m))])
    weights = torch.empty(6, device="meta")
    groups = torch.empty(6, device="meta", dtype=torch.int64)
    stats = log_weight_stats(trainer, None, "rw", weights, groups, histogram=False)
    assert copies == [12]  # weights and groups together, nothing read from the device after
    # host values: weights 0,1,2,0,1,2; groups 0,1,2,0,1,2 -> group g has mean weight g
    assert stats["mean"] == 1.0 and stats["max"] == 2.0
    assert [stats[f"group_{g}/mean"] for g in range(3)] == [0.0, 1.0, 2.0]
    assert logged["rw/group_2/mass"] == pytest.approx(4 / 6)
