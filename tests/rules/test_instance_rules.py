"""Property and hand-computation tests of the instance rules."""

import math

import pytest
import torch

from lightning_reweight.rules import RULES, KLDRORule, create_rule, effective_sample_size, minmax_normalize
from lightning_reweight.rules.instance import clip_weights

ALL = sorted(RULES)
LOSSES = torch.tensor([0.1, 0.5, 0.9, 2.0, 3.5, 1.2])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("direction", ["up", "down"])
def test_non_negative_mean_one_and_uniform_on_equal_losses(name, direction):
    kw = {} if name == "uniform" else {"direction": direction}
    rule = create_rule(name, **kw)
    w = rule(LOSSES)
    assert w.shape == LOSSES.shape and bool((w >= 0).all())
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(create_rule(name, **kw)(torch.full((5,), 0.7)), torch.ones(5))


@pytest.mark.parametrize("name", ALL)
def test_scale_of_weights_independent_of_batch_order(name):
    perm = torch.randperm(LOSSES.numel(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(create_rule(name)(LOSSES)[perm], create_rule(name)(LOSSES[perm]))


def test_minmax_normalize_range():
    x = minmax_normalize(LOSSES, delta=2.0)
    assert x.min().item() == pytest.approx(-2.0) and x.max().item() == pytest.approx(2.0)


def test_linupper_hand_computation():
    losses = torch.tensor([0.0, 1.0, 2.0, 4.0])
    # x = (2l - 4 - 0)/4 = [-1, -0.5, 0, 1]; f = min(x+1, 1) = [0, .5, 1, 1]; w = 4 softmax(f/0.4)
    f = torch.tensor([0.0, 0.5, 1.0, 1.0])
    expected = 4 * torch.softmax(f / 0.4, 0)
    torch.testing.assert_close(create_rule("linupper", r=0.4)(losses), expected)


def test_quadratic_and_extremes_hand_computation():
    losses = torch.tensor([0.0, 1.0, 2.0])  # x = [-1, 0, 1]
    torch.testing.assert_close(create_rule("quadratic", r=1.0)(losses), 3 * torch.softmax(torch.tensor([0.0, 1, 0]), 0))
    torch.testing.assert_close(create_rule("extremes", r=0.5)(losses), 3 * torch.softmax(torch.tensor([2.0, 0, 2]), 0))


def test_monotonicity():
    losses = torch.linspace(0, 3, 7)
    up = create_rule("linupper")(losses)
    assert bool((up[1:] >= up[:-1] - 1e-7).all())
    down = create_rule("linupper", direction="down")(losses)
    assert bool((down[1:] <= down[:-1] + 1e-7).all())
    kl = create_rule("kl_dro", r=1.0)(losses)
    assert bool((kl[1:] > kl[:-1]).all())
    kl_down = create_rule("kl_dro", r=1.0, direction="down")(losses)
    assert bool((kl_down[1:] < kl_down[:-1]).all())


def test_kl_dro_hand_computation_and_stability():
    losses = torch.tensor([1.0, 2.0, 3.0])
    e = torch.exp(losses / 2.0)
    torch.testing.assert_close(create_rule("kl_dro", r=2.0)(losses), 3 * e / e.sum())
    huge = torch.tensor([1000.0, 1001.0])
    w = create_rule("kl_dro", r=1.0)(huge)
    assert torch.isfinite(w).all()


def test_kl_dro_ema_normalizer_tracks_running_mean():
    rule = KLDRORule(r=1.0, normalizer="ema", ema_rate=0.5)
    assert rule.normalized is False
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([math.log(3.0), math.log(3.0)])
    torch.testing.assert_close(rule(a), torch.ones(2))           # Z = 1
    w = rule(b)                                                   # Z = 0.5*1 + 0.5*3 = 2 -> w = 3/2
    torch.testing.assert_close(w, torch.full((2,), 1.5))
    state = rule.state_dict()
    clone = KLDRORule(r=1.0, normalizer="ema", ema_rate=0.5)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone(b), rule(b))


def test_clip_and_ess():
    w = torch.tensor([4.0, 0.0, 0.0, 0.0])
    assert effective_sample_size(w).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.ones(8)).item() == pytest.approx(8.0)
    c = clip_weights(torch.tensor([3.0, 0.5, 0.5]), 2.0)
    assert c.mean().item() == pytest.approx(1.0)
    assert c[0] / c[1] == pytest.approx(4.0)


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown weight rule 'nope'"):
        create_rule("nope")
    with pytest.raises(ValueError, match="`r`"):
        create_rule("linupper", r=0.0)
    with pytest.raises(ValueError, match="direction"):
        create_rule("kl_dro", direction="sideways")
    with pytest.raises(ValueError, match="NaN/inf"):
        create_rule("linupper")(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        create_rule("linupper")(torch.ones(2, 2))
    with pytest.raises(TypeError, match="Bad arguments"):
        create_rule("uniform", r=1.0)
