"""AdaWAC's mirror step: hand computation, simplex, duplicates, overflow safety, bad input."""

import math

import pytest
import torch

from lightning_reweight.rules.adawac import adawac_mirror_step, adawac_update


def official(b_sup, b_cons, l_sup, l_cons, eta):
    """The paper's update written out: multiply by exp(η ℓ), then L1-normalise."""
    w0, w1 = b_sup * math.exp(eta * l_sup), b_cons * math.exp(eta * l_cons)
    return w0 / (w0 + w1), w1 / (w0 + w1)


def test_one_step_matches_hand_computation():
    b_sup = torch.tensor([0.5, 0.3, 0.9])
    b_cons = 1 - b_sup
    l_sup = torch.tensor([1.0, 0.2, 0.05])
    l_cons = torch.tensor([0.25, 0.9, 0.05])
    new_sup, new_cons = adawac_mirror_step(b_sup, b_cons, l_sup, l_cons, eta=8.0)
    for i in range(3):
        e_sup, e_cons = official(float(b_sup[i]), float(b_cons[i]), float(l_sup[i]), float(l_cons[i]), 8.0)
        assert float(new_sup[i]) == pytest.approx(e_sup, rel=1e-6)
        assert float(new_cons[i]) == pytest.approx(e_cons, rel=1e-6)
    # first case by hand: ½e^8 / (½e^8 + ½e^2) = 1 / (1 + e^-6)
    assert float(new_sup[0]) == pytest.approx(1 / (1 + math.exp(-6)), rel=1e-6)
    # equal losses leave the weights where they were
    assert float(new_sup[2]) == pytest.approx(0.9, rel=1e-6)


def test_weights_stay_on_simplex_even_for_huge_losses():
    g = torch.Generator().manual_seed(0)
    b_sup = torch.rand(1000, generator=g)
    l_sup = torch.rand(1000, generator=g) * 10 ** torch.randint(-3, 4, (1000,), generator=g)
    l_cons = torch.rand(1000, generator=g) * 10 ** torch.randint(-3, 4, (1000,), generator=g)
    s, c = b_sup, 1 - b_sup
    for _ in range(5):  # several steps; exp(8·1000) would overflow float32 in the naive form
        s, c = adawac_mirror_step(s, c, l_sup, l_cons, eta=8.0)
        assert torch.isfinite(s).all() and torch.isfinite(c).all()
        assert (s >= 0).all() and (c >= 0).all() and (s <= 1).all()
        torch.testing.assert_close(s + c, torch.ones_like(s))
    # a saturated weight can come back (the naive float32 form would be stuck at exactly 0)
    s, c = adawac_mirror_step(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([0.0]), 8.0)
    s, c = adawac_mirror_step(s, c, torch.tensor([20.0]), torch.tensor([0.0]), 8.0)
    assert float(s) > 0.5


def test_eta_zero_keeps_init_and_update_handles_duplicates():
    col_sup, col_cons = torch.full((10,), 0.5), torch.full((10,), 0.5)
    rows, s, c = adawac_update(col_sup, col_cons, torch.tensor([3, 1]), torch.tensor([1.0, 2.0]),
                               torch.tensor([0.0, 0.5]), eta=0.0)
    assert rows.tolist() == [1, 3] and torch.equal(s, torch.full((2,), 0.5))
    # sample 4 drawn twice: the same as two sequential steps
    rows, s, c = adawac_update(col_sup, col_cons, torch.tensor([4, 7, 4]), torch.tensor([0.3, 0.1, 0.6]),
                               torch.tensor([0.1, 0.2, 0.2]), eta=2.0)
    s1, c1 = official(0.5, 0.5, 0.3, 0.1, 2.0)
    s2, _ = official(s1, c1, 0.6, 0.2, 2.0)
    assert rows.tolist() == [4, 7]
    assert float(s[0]) == pytest.approx(s2, rel=1e-6)
    assert float(s[1]) == pytest.approx(official(0.5, 0.5, 0.1, 0.2, 2.0)[0], rel=1e-6)
    assert torch.equal(col_sup, torch.full((10,), 0.5))  # inputs untouched


@pytest.mark.parametrize("eta", [-1.0, float("nan"), float("inf"), "8"])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="Expected argument `eta`"):
        adawac_mirror_step(torch.full((2,), 0.5), torch.full((2,), 0.5), torch.ones(2), torch.ones(2), eta)


def test_bad_shapes():
    half = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        adawac_mirror_step(half, half, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        adawac_mirror_step(half, half, torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="one index per loss"):
        adawac_update(half, half, torch.tensor([0, 1]), torch.ones(3), torch.ones(3))


def test_fixed_shape_update_of_a_gpu_batch_equals_the_host_update_with_duplicates():
    """The GPU path (no ``torch.unique``: every position carries its sample's new weights) equals the host
    path row by row, repeats included."""
    from lightning_reweight.rules.adawac import _device_update

    g = torch.Generator().manual_seed(0)
    col_sup = torch.rand(12, generator=g)
    col_cons = 1 - col_sup
    index = torch.tensor([4, 7, 4, 0, 11, 7, 4])
    sup, cons = torch.rand(7, generator=g), torch.rand(7, generator=g)
    rows, s, c, inverse = adawac_update(col_sup, col_cons, index, sup, cons, eta=2.0, return_inverse=True)
    rows_d, s_d, c_d, inverse_d = _device_update(col_sup, col_cons, index, sup, cons, 2.0, True)
    assert torch.equal(rows_d, index) and torch.equal(inverse_d, torch.arange(7))
    torch.testing.assert_close(s_d, s[inverse])
    torch.testing.assert_close(c_d, c[inverse])
