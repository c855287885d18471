"""The CPU (numpy) EMA step of ``KLDRORule`` against the float64 torch computation it replaced.

``_reference`` is the previous CPU path verbatim (tilt, cap, ``logsumexp``, ``logaddexp``, ``exp(z − log Z)``
in float64 torch). The numpy path computes the same quantities with one exp pass (``e · exp(c − log Z)``), so
it may differ from it by float64 rounding only: the float32 weights agree to one float32 rounding step (and
are nearly always bit-identical), ``log Z`` to float64 resolution. Checked over many steps (the state carries),
extreme and outlier losses, tiny and huge temperatures, both directions, every cap / rate setting.
"""

import math

import numpy as np
import pytest
import torch

from lightning_reweight.rules import KLDRORule, instance


@pytest.fixture(params=["numba", "numpy"], autouse=True)
def host_path(request, monkeypatch):
    """Every test runs on the compiled kernel and on the numpy fallback."""
    if request.param == "numba":
        assert instance.host_kernels() is not None, "numba is a dependency: the kernel path must be available"
    else:
        monkeypatch.setattr(instance, "USE_NUMBA", False)
    return request.param


def _reference(losses, r, direction, log_z, ema_rate, outlier_cap):
    """The float64 torch EMA step of KLDRORule before the numpy path (returns weights, new log Z)."""
    z = losses.double() / r
    z = z if direction == "up" else -z
    if log_z is not None and outlier_cap is not None:
        z = z.clamp(max=log_z + math.log(outlier_cap))
    batch_log_z = float(torch.logsumexp(z, dim=0) - math.log(z.numel()))
    if log_z is None or ema_rate == 1:
        new = batch_log_z
    else:
        a = ema_rate
        new = float(np.logaddexp(math.log1p(-a) + log_z, math.log(a) + batch_log_z))
    return torch.exp(z - new).to(losses.dtype), new


def _ulps(a, b):
    """Distance in float32 units in the last place (both non-negative)."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def _batches(kind, n, g):
    base = torch.rand(n, generator=g) * 3
    if kind == "plain":
        return [torch.rand(n, generator=g) * 3 for _ in range(12)]
    if kind == "outliers":  # a spike of +80, +200, +1e4 among ordinary losses, then ordinary losses again
        out = []
        for spike in (80.0, 200.0, 1e4, 0.0, 0.0, 0.0):
            b = torch.rand(n, generator=g) * 3
            b[0] += spike
            out.append(b)
        return out
    if kind == "drop":  # the losses fall by orders of magnitude: every tilt far below the running normaliser
        return [base + 1e3, base + 1e3, base, base * 1e-3, base]
    if kind == "huge":  # finite float32 extremes
        return [torch.tensor([0.0, 3e38, 1.5e38, 1.0] * (n // 4 or 1))[:max(n, 1)], base, base * 1e30]
    if kind == "spread":  # losses across many decades
        return [torch.rand(n, generator=g) * 10.0 ** torch.randint(-6, 6, (n,), generator=g).float()
                for _ in range(6)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["plain", "outliers", "drop", "huge", "spread"])
@pytest.mark.parametrize("r", [1e-3, 0.5, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize(("ema_rate", "outlier_cap"), [(0.1, 1e3), (0.5, 1.5), (0.1, None), (1.0, 1e3)])
@pytest.mark.parametrize("n", [1, 7, 1024])
def test_host_step_equals_the_float64_torch_step(kind, r, direction, ema_rate, outlier_cap, n):
    g = torch.Generator().manual_seed(n)
    rule = KLDRORule(r=r, direction=direction, normalizer="ema", ema_rate=ema_rate, outlier_cap=outlier_cap)
    log_z = None
    for losses in _batches(kind, n, g):
        expected, log_z_expected = _reference(losses, r, direction, log_z, ema_rate, outlier_cap)
        weights, pending = rule.propose(losses)
        assert weights.dtype == torch.float32 and weights.shape == losses.shape
        assert isinstance(pending, float)
        assert pending == pytest.approx(log_z_expected, rel=1e-13, abs=1e-13)
        assert bool(torch.isfinite(weights).all()) == bool(torch.isfinite(expected).all())
        assert _ulps(weights, expected) <= 1, (weights, expected)
        rule.commit(pending)
        log_z = log_z_expected  # the reference carries its own state


def test_host_step_is_nearly_always_bit_identical():
    g = torch.Generator().manual_seed(0)
    rule = KLDRORule(normalizer="ema")
    log_z, same, total = None, 0, 0
    for _ in range(50):
        losses = torch.rand(1024, generator=g) * 4
        expected, log_z = _reference(losses, 1.0, "up", log_z, 0.1, 1e3)
        weights, pending = rule.propose(losses)
        rule.commit(pending)
        same += int((weights == expected).sum())
        total += losses.numel()
    assert same / total > 0.999


def test_host_step_dtypes_and_purity():
    rule = KLDRORule(normalizer="ema")
    rule(torch.tensor([0.0, 1.0]))
    before = rule.log_normalizer
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        losses = torch.tensor([0.5, 2.0, 1.0], dtype=dtype, requires_grad=dtype == torch.float64)
        weights, pending = rule.propose(losses, validate=False)
        assert weights.dtype == dtype and not weights.requires_grad
        expected, log_z = _reference(losses.detach().float(), 1.0, "up", before, 0.1, 1e3)
        torch.testing.assert_close(weights.float(), expected, rtol=1e-2 if dtype != torch.float64 else 1e-6, atol=0)
        assert pending == pytest.approx(log_z, rel=1e-13)
        assert rule.log_normalizer == before  # propose changes nothing
    losses = torch.rand(64, dtype=torch.float64)
    expected, _ = _reference(losses.float(), 1.0, "up", before, 0.1, 1e3)  # the check makes them float32
    assert _ulps(rule.propose(losses)[0], expected) <= 1


def test_all_tilts_underflowing_against_the_running_normaliser():
    """Every ``exp(z − log Z_prev)`` underflows: the batch adds nothing measurable and the weights are 0."""
    rule = KLDRORule(normalizer="ema")
    rule(torch.full((4,), 2000.0))
    before = rule.log_normalizer
    weights, pending = rule.propose(torch.zeros(4))
    expected, log_z = _reference(torch.zeros(4), 1.0, "up", before, 0.1, 1e3)
    assert pending == log_z == math.log1p(-0.1) + before
    assert torch.equal(weights, expected) and float(weights.sum()) == 0.0
