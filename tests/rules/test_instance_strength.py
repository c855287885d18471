"""Instance rules: every error path, the papers' defaults, the boundaries and the device (GPU) path on CPU tensors.

Written against survivors of ``scripts/mutate.py rules/instance.py``: each test pins behaviour a small change to
``rules/instance.py`` would break.
"""

import inspect
import math

import pytest
import torch

from lightning_reweight.rules import instance
from lightning_reweight.rules.instance import (
    all_finite,
    check_losses,
    clip_weights,
    effective_sample_size,
    extremes_score,
    kl_dro_weights,
    linupper_score,
    log_mean_exp,
    loss_based_weights,
    minmax_normalize,
    quadratic_score,
    softmax_weights,
)
from lightning_reweight.rules.registry import KLDRORule, LossBasedRule


# ------------------------------------------------------------------------------------------------ check_losses
def test_check_losses_refuses_non_tensors_with_type_error():
    with pytest.raises(TypeError, match=r"Expected argument `losses` to be a torch.Tensor, but got list"):
        check_losses([1.0, 2.0])


def test_check_losses_refuses_integer_losses_naming_the_dtype():
    with pytest.raises(TypeError, match=r"floating tensor, but got dtype torch.int64"):
        check_losses(torch.tensor([1, 2, 3]))


def test_check_losses_refuses_2d_and_names_reduction_none():
    with pytest.raises(ValueError, match=r"1-D .*shape \(2, 3\).*reduction='none'"):
        check_losses(torch.ones(2, 3))


def test_check_losses_names_at_most_five_bad_positions():
    losses = torch.zeros(10)
    losses[[1, 2, 4, 6, 7, 9]] = float("nan")
    with pytest.raises(ValueError, match=r"positions \[1, 2, 4, 6, 7\]\. No weight") as err:
        check_losses(losses)
    assert "lower the learning rate" in str(err.value)
    with pytest.raises(ValueError, match=r"positions \[0\]"):
        check_losses(torch.tensor([float("-inf"), 1.0]))


def test_check_losses_returns_detached_float32():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = check_losses(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, torch.tensor([1.0, 2.0]))


def test_all_finite_short_cut_and_overflowing_sum():
    assert all_finite(torch.tensor([1.0, -2.0]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), 1.0]))
    assert all_finite(torch.tensor([3e38, 3e38], dtype=torch.float32))  # the sum overflows, the values do not


# ---------------------------------------------------------------------------------------- normalisation, scores
def test_minmax_normalize_defaults_delta_one_and_eps():
    x = minmax_normalize(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(x, torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(minmax_normalize(torch.tensor([0.0, 1.0, 2.0]), delta=2.0), torch.tensor([-2.0, 0.0, 2.0]))
    # a range below eps (1e-6 by default) is divided by eps: values far inside [-δ, δ]
    tiny = minmax_normalize(torch.tensor([0.0, 1e-8], dtype=torch.float64))
    assert tiny.tolist() == pytest.approx([-0.01, 0.01])
    assert minmax_normalize(torch.tensor([0.0, 1e-8], dtype=torch.float64), eps=1e-8).tolist() == pytest.approx([-1, 1])
    assert torch.equal(minmax_normalize(torch.full((4,), 3.0)), torch.zeros(4))


def test_minmax_normalize_huge_losses_do_not_overflow():
    x = minmax_normalize(torch.tensor([3e38, 0.0, 1.5e38], dtype=torch.float32))
    assert x.dtype == torch.float32
    assert x.tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("losses", [[0.0, 1.0, 2.0, 5.0], [3e38, 0.0, 1.5e38], [2.0, 2.0], [0.0, 1e-8]])
@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_minmax_device_path_equals_host_path(losses, delta):
    """The GPU branch (tensor ops, no host read) run on CPU tensors gives the host path's values."""
    t = torch.tensor(losses, dtype=torch.float32)
    device = instance._minmax_normalize_device(t, delta, 1e-6)
    assert device.dtype == t.dtype
    torch.testing.assert_close(device, minmax_normalize(t, delta), atol=1e-6, rtol=1e-6)


def test_minmax_device_branch_taken_for_non_cpu_tensors():
    out = minmax_normalize(torch.empty(5, device="meta"))
    assert out.device.type == "meta" and out.shape == (5,) and out.dtype == torch.float32


def test_score_defaults_are_delta_one():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    for fn in (linupper_score, quadratic_score, extremes_score):
        assert inspect.signature(fn).parameters["delta"].default == 1.0
    assert torch.equal(linupper_score(x), torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0]))
    assert torch.equal(quadratic_score(x), torch.tensor([0.0, 0.75, 1.0, 0.75, 0.0]))
    assert torch.equal(extremes_score(x), x.abs())
    assert torch.equal(linupper_score(x, 2.0), torch.tensor([1.0, 1.5, 2.0, 2.0, 2.0]))
    assert torch.equal(quadratic_score(x, 2.0), 1 - x.square() / 4)


def test_softmax_weights_mean_one_and_temperature():
    s = torch.tensor([0.0, 1.0])
    w = softmax_weights(s, 1.0)
    assert w.sum().item() == pytest.approx(2.0)
    assert (w[1] / w[0]).item() == pytest.approx(math.e)
    assert (softmax_weights(s, 0.5)[1] / softmax_weights(s, 0.5)[0]).item() == pytest.approx(math.e**2)
    assert softmax_weights(s.double(), 1.0).dtype == torch.float64


# ---------------------------------------------------------------------------------------- Sow et al. defaults
def test_loss_based_defaults_are_the_papers():
    params = inspect.signature(loss_based_weights).parameters
    assert params["strategy"].default == "linupper"
    assert params["delta"].default == 1.0
    assert params["r"].default == 0.4
    assert params["direction"].default == "up"
    rule = LossBasedRule()
    assert (rule.strategy, rule.delta, rule.r, rule.direction) == ("linupper", 1.0, 0.4, "up")
    losses = torch.tensor([0.0, 1.0, 3.0])
    expected = 3 * torch.softmax(linupper_score(minmax_normalize(losses)) / 0.4, 0)
    torch.testing.assert_close(loss_based_weights(losses), expected)


def test_unknown_strategy_is_a_value_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"one of \['extremes', 'linupper', 'quadratic'\], but got 'upper'"):
        loss_based_weights(torch.tensor([1.0, 2.0]), strategy="upper")


def test_direction_down_negates_the_score():
    losses = torch.tensor([0.0, 1.0, 2.0])
    up, down = loss_based_weights(losses, "extremes"), loss_based_weights(losses, "extremes", direction="down")
    assert up[0] > up[1] and down[0] < down[1]
    score = extremes_score(minmax_normalize(losses))
    torch.testing.assert_close(down, softmax_weights(-score, 0.4))


# ---------------------------------------------------------------------------------------------------- KL-DRO
def test_kl_dro_default_r_is_one_and_batch_normaliser_gives_mean_one():
    assert inspect.signature(kl_dro_weights).parameters["r"].default == 1.0
    assert KLDRORule().r == 1.0 and KLDRORule().ema_rate == 0.1
    losses = torch.tensor([0.0, 1.0])
    w = kl_dro_weights(losses)
    assert w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0)
    assert (w[1] / w[0]).item() == pytest.approx(math.e)
    down = kl_dro_weights(losses, direction="down")
    assert (down[0] / down[1]).item() == pytest.approx(math.e)


def test_kl_dro_log_normalizer_float_and_tensor():
    losses = torch.tensor([0.0, 2.0])
    by_float = kl_dro_weights(losses, r=2.0, log_normalizer=1.0)
    assert by_float.tolist() == pytest.approx([math.exp(-1.0), 1.0])
    by_tensor = kl_dro_weights(losses, r=2.0, log_normalizer=torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(by_tensor, by_float)
    assert kl_dro_weights(losses, log_normalizer=0).tolist() == pytest.approx([1.0, math.e**2])


def test_log_mean_exp():
    z = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    assert log_mean_exp(z).item() == pytest.approx(math.log(2.0))


# ------------------------------------------------------------------------------------------------ clip, ESS
def test_clip_weights_none_clip_only_and_renormalised():
    w = torch.tensor([4.0, 1.0, 1.0])
    assert clip_weights(w, None) is w
    assert clip_weights(w, 2.0, renormalize=False).tolist() == [2.0, 1.0, 1.0]
    c = clip_weights(w, 2.0)
    assert c.tolist() == pytest.approx([1.5, 0.75, 0.75])  # clipped, then mean 1 once
    assert clip_weights(torch.zeros(2), 1.0).tolist() == [0.0, 0.0]  # no division by zero


def test_effective_sample_size_kish_and_unit_mass_branch():
    """``unit_mass=True`` takes ``min(Kish, Σw)``: uniformly tiny weights report the collapse. (The callback's CPU
    path computes these sums in a compiled kernel; this is the torch path every other device takes.)"""
    tiny = torch.full((8,), 0.01)
    assert effective_sample_size(tiny).item() == pytest.approx(8.0)
    assert effective_sample_size(tiny, unit_mass=True).item() == pytest.approx(0.08)
    big = torch.tensor([2.0, 2.0, 0.0, 0.0])
    assert effective_sample_size(big, unit_mass=True).item() == pytest.approx(2.0)  # Kish 2 < Σw 4
    assert effective_sample_size(torch.zeros(3)).item() == 0.0  # no division by zero
    assert effective_sample_size(torch.ones(3)).dtype == torch.float32


def test_effective_sample_size_meta_tensors():
    out = effective_sample_size(torch.empty(4, device="meta"), unit_mass=True)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == ()


def test_weight_mass_kernel_equals_torch_path(monkeypatch):
    """The compiled ``(Σw, Σw²)`` of the callback's CPU path and its torch fallback, on the same inputs."""
    from lightning_reweight.callbacks.loss_reweighting import _weight_mass

    g = torch.Generator().manual_seed(0)
    for w in (torch.rand(1001, generator=g), torch.rand(7, generator=g, dtype=torch.float64) * 1e3):
        if instance.host_kernels() is None:
            pytest.skip("numba is not available")
        compiled = _weight_mass(w)
        monkeypatch.setattr(instance, "USE_NUMBA", False)
        assert instance.host_kernels() is None
        fallback = _weight_mass(w)
        monkeypatch.setattr(instance, "USE_NUMBA", True)
        assert compiled[0] == pytest.approx(fallback[0], rel=1e-12)
        assert compiled[1] == pytest.approx(fallback[1], rel=1e-12)
