"""Temperature sampling, upweighting and Cooldown ("Upsample or Upweight?", Li et al., NAACL 2025)."""

import math

import pytest
import torch

from lightning_reweight.rules.balance import (
    SCHEDULES,
    TemperatureSchedule,
    check_counts,
    cooldown_tau,
    create_schedule,
    group_counts,
    sample_probabilities,
    temperature_distribution,
    upweight_factors,
)

COUNTS = [5000.0, 500.0, 50.0]


def test_temperature_distribution_by_hand():
    # tau = 2: sqrt counts 30, 10 -> 0.75, 0.25
    torch.testing.assert_close(temperature_distribution([900, 100], 2.0), torch.tensor([0.75, 0.25], dtype=torch.float64))
    # tau = 1: proportional
    p1 = temperature_distribution(COUNTS, 1.0)
    torch.testing.assert_close(p1, torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS))
    # tau = 5 by hand
    r = [c ** 0.2 for c in COUNTS]
    torch.testing.assert_close(temperature_distribution(COUNTS, 5.0), torch.tensor([x / sum(r) for x in r], dtype=torch.float64))
    # tau = inf: uniform over non-empty groups; tau = 100 is close to it
    torch.testing.assert_close(temperature_distribution([10, 0, 1000], math.inf), torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    assert (temperature_distribution(COUNTS, 100.0) - 1 / 3).abs().max() < 0.02


def test_temperature_is_stable_for_huge_counts_and_small_tau():
    p = temperature_distribution([1e12, 1e6, 0], 0.05)  # n^20 overflows float64 without log space
    assert torch.isfinite(p).all() and p[0] == pytest.approx(1.0) and p[2] == 0


def test_upweight_identity_and_mean_one():
    c = torch.tensor([5000.0, 500.0, 50.0, 0.0], dtype=torch.float64)
    for tau in (0.5, 1.0, 3.0, 5.0, math.inf):
        w = upweight_factors(c, tau)
        p1 = c / c.sum()
        # Thm 1: p(g; tau) = p(g; 1) * w_g  (upweight == upsample in expectation)
        torch.testing.assert_close(p1 * w, temperature_distribution(c, tau))
        assert float((p1 * w).sum()) == pytest.approx(1.0)  # weights average 1 under proportional sampling
        assert w[3] == 0
    torch.testing.assert_close(upweight_factors(c, 1.0)[:3], torch.ones(3, dtype=torch.float64))


def test_upweight_equals_upsample_in_expectation_on_a_loss():
    # E_{i ~ uniform}[w_{g_i} l_i] == E_{i ~ temperature sampling}[l_i] for any per-sample loss
    groups = torch.tensor([0] * 50 + [1] * 10 + [2] * 3)
    loss = torch.rand(groups.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tau in (2.0, 5.0, math.inf):
        w = upweight_factors(group_counts(groups), tau)[groups]
        p = sample_probabilities(groups, tau)
        assert float((w * loss).mean()) == pytest.approx(float((p * loss).sum()), rel=1e-12)


def test_sample_probabilities_uniform_within_group():
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    p = sample_probabilities(groups, math.inf)
    torch.testing.assert_close(p, torch.tensor([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2, dtype=torch.float64))
    assert float(sample_probabilities(groups, 1.0).sum()) == pytest.approx(1.0)
    torch.testing.assert_close(sample_probabilities(groups, 1.0), torch.full((6,), 1 / 6, dtype=torch.float64))
    # a declared but empty group is fine
    assert sample_probabilities(groups, 2.0, num_groups=5).shape == (6,)


def test_cooldown_values():
    assert [cooldown_tau(t) for t in (0.0, 0.25, 0.4999, 0.5, 0.75, 1.0)] == [5, 5, 5, 1, 1, 1]
    assert cooldown_tau(0.3, switch_fraction=0.25) == 1.0
    assert cooldown_tau(0.2, 1.0, 5.0) == 1.0 and cooldown_tau(0.6, 1.0, 5.0) == 5.0  # increasing variant
    # linear: whole run for switch 0.5
    assert cooldown_tau(0.0, shape="linear") == 5.0
    assert cooldown_tau(0.25, shape="linear") == pytest.approx(4.0)
    assert cooldown_tau(0.5, shape="linear") == pytest.approx(3.0)
    assert cooldown_tau(1.0, shape="linear") == pytest.approx(1.0)
    # switch 0.75: window [0.5, 1.0]
    assert cooldown_tau(0.4, switch_fraction=0.75, shape="linear") == 5.0
    assert cooldown_tau(0.875, switch_fraction=0.75, shape="linear") == pytest.approx(2.0)
    assert cooldown_tau(0.5, shape="cosine") == pytest.approx(3.0)
    assert cooldown_tau(0.25, shape="cosine") == pytest.approx(5 - 4 * (1 - math.cos(math.pi / 4)) / 2)
    # the gradual shapes keep the step's time-average temperature
    grid = [i / 1000 for i in range(1000)]
    for shape in ("linear", "cosine"):
        mean = sum(cooldown_tau(t, shape=shape) for t in grid) / len(grid)
        assert mean == pytest.approx(3.0, abs=0.01)


def test_schedule_object_and_registry():
    s = TemperatureSchedule("cooldown")
    assert (s(0.0), s(0.49), s(0.5), s(1.0)) == (5.0, 5.0, 1.0, 1.0)
    assert TemperatureSchedule("constant", tau=3.0)(0.9) == 3.0
    for name in SCHEDULES:
        assert callable(create_schedule(name))
    with pytest.raises(ValueError, match="Expected one of"):
        create_schedule("warmup")
    assert "cooldown" in repr(s)


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), True, "5"])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="Expected argument `tau` to be a positive number"):
        temperature_distribution(COUNTS, tau)


@pytest.mark.parametrize(
    "counts, match",
    [
        ([1.0, -2.0], "finite counts >= 0"),
        ([0, 0], "at least one non-empty group"),
        ([], "non-empty 1-D"),
        ([[1, 2]], "non-empty 1-D"),
        ([1.0, float("inf")], "finite counts >= 0"),
        (["a"], "1-D sequence of numbers"),
    ],
)
def test_bad_counts_raise(counts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_counts(counts)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="switch_fraction"):
        cooldown_tau(0.1, switch_fraction=1.0)
    with pytest.raises(ValueError, match="shape"):
        cooldown_tau(0.1, shape="exp")
    with pytest.raises(ValueError, match="tau_start"):
        TemperatureSchedule("cooldown", tau_start=0)
    with pytest.raises(ValueError, match="finite"):
        cooldown_tau(0.1, tau_start=math.inf, shape="linear")
    with pytest.raises(ValueError, match="ids >= 0"):
        group_counts(torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="ids < num_groups"):
        sample_probabilities(torch.tensor([0, 3]), 1.0, num_groups=3)
    with pytest.raises(TypeError, match="integer ids"):
        group_counts(torch.tensor([0.0, 1.0]))


def test_one_group_id_validator_for_balancing_and_fairness():
    from lightning_reweight.rules import balance, fairness

    assert fairness.check_groups is balance.check_groups  # one validator, re-exported
    check = balance.check_groups
    with pytest.raises(TypeError, match="integer ids.*0.9 -> 0"):
        check(torch.tensor([0.9, 1.0]))
    with pytest.raises(TypeError, match="integer ids"):
        check(torch.tensor([True, False]), 2, -1)
    torch.testing.assert_close(check(torch.tensor([0, 255, 1]), 2, 255), torch.tensor([0, 255, 1]))
    torch.testing.assert_close(check([1, -1], 2, -1), torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"ids in \[0, 2\) or ignore_index=-1, but got \[5\]"):
        check(torch.tensor([0, 5, -1]), 2, -1)
    with pytest.raises(ValueError, match="outside the group ids"):
        check(torch.tensor([0, 1]), 3, 1)
    assert check(torch.zeros(0, dtype=torch.long), 2, -1, allow_empty=True).numel() == 0
