"""EATA / Tent math: entropy, filters, weights, moving average, Fisher penalty and estimate vs hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight.rules.tta import (
    eata_select,
    eata_weights,
    entropy_margin,
    estimate_fisher,
    fisher_penalty,
    redundancy_mask,
    reliable_mask,
    selected_entropy_loss,
    softmax_entropy,
    tent_select,
    update_moving_average,
)


def test_softmax_entropy_matches_definition_and_is_finite_when_saturated():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, -2.0], [1000.0, 0.0, 0.0, 0.0]])
    p = z[1].softmax(0)
    expected = torch.tensor([math.log(4), float(-(p * p.log()).sum()), 0.0])
    torch.testing.assert_close(softmax_entropy(z), expected)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        softmax_entropy(torch.zeros(4))


def test_entropy_margin_is_0_4_ln_c():
    assert entropy_margin(10) == pytest.approx(0.4 * math.log(10))
    assert entropy_margin(1000) == pytest.approx(0.4 * math.log(1000))
    with pytest.raises(ValueError, match="num_classes"):
        entropy_margin(1)


def test_filters_and_weights_vs_hand_computation():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01],   # confident, class 0
                          [0.01, 0.97, 0.01, 0.01],   # confident, class 1
                          [0.25, 0.25, 0.25, 0.25],   # uniform: unreliable
                          [0.90, 0.05, 0.03, 0.02]])  # confident, class 0 again
    logits = probs.log()
    ent = softmax_entropy(logits)
    e0 = entropy_margin(4)  # 0.4·ln 4 ≈ 0.555
    assert reliable_mask(ent, e0).tolist() == [True, True, False, True]
    # no moving average yet: only the entropy filter
    sel = eata_select(ent, probs, e0, d_margin=0.4, moving_average=None)
    assert sel.selected.tolist() == [True, True, False, True]
    torch.testing.assert_close(sel.weights, torch.where(sel.selected, torch.exp(e0 - ent), torch.zeros(4)))
    # moving average pointing at class 0: |cos| of the class-0 samples is large -> redundant
    m = torch.tensor([0.85, 0.05, 0.05, 0.05])
    cos = torch.stack([F.cosine_similarity(p, m, dim=0) for p in probs])
    expected_nr = (cos.abs() < 0.4).tolist()
    assert expected_nr == [False, True, False, False]  # the uniform sample is close to m too
    assert redundancy_mask(probs, m, 0.4).tolist() == expected_nr
    sel = eata_select(ent, probs, e0, d_margin=0.4, moving_average=m)
    assert sel.selected.tolist() == [False, True, False, False]
    assert sel.weights[1] == pytest.approx(math.exp(e0 - float(ent[1])))
    assert sel.weights[[0, 2, 3]].eq(0).all()
    # the redundancy filter can be disabled
    assert eata_select(ent, probs, e0, None, m).selected.tolist() == [True, True, False, True]
    # confident samples get larger weights; weights are detached
    w = eata_weights(ent.requires_grad_(), e0)
    assert not w.requires_grad and w[0] > w[3]
    with pytest.raises(ValueError, match="one entry per class"):
        redundancy_mask(probs, torch.ones(3), 0.4)


def test_tent_selects_everything_with_unit_weights():
    sel = tent_select(torch.rand(5))
    assert sel.selected.all() and sel.weights.eq(1).all() and sel.reliable.all()


def test_selected_entropy_loss_is_mean_over_selected_and_zero_when_none():
    ent = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = torch.tensor([2.0, 0.0, 1.0])
    loss = selected_entropy_loss(ent, w, 2)
    assert float(loss.detach()) == pytest.approx((2 * 1 + 1 * 3) / 2)
    loss.backward()
    torch.testing.assert_close(ent.grad, w / 2)
    assert float(selected_entropy_loss(ent.detach(), torch.zeros(3), 0)) == 0.0
    # a global count (DDP) scales the local part
    assert float(selected_entropy_loss(ent.detach(), w, 4)) == pytest.approx(5 / 4)


def test_moving_average_update():
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    m = update_moving_average(None, p.sum(0), 2)
    torch.testing.assert_close(m, torch.tensor([0.4, 0.6]))
    m2 = update_moving_average(m, torch.tensor([1.0, 0.0]), 1)
    torch.testing.assert_close(m2, 0.9 * m + 0.1 * torch.tensor([1.0, 0.0]))
    assert update_moving_average(m2, torch.zeros(2), 0) is m2
    assert update_moving_average(None, torch.zeros(2), 0) is None


def test_fisher_penalty_value_and_gradient_vs_hand():
    theta = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([0.5], requires_grad=True),
             "c": torch.tensor([9.0], requires_grad=True)}  # c not regularised
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.5]), "c": torch.tensor([0.0])}
    fisher = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([4.0])}
    alpha = 0.5
    pen = fisher_penalty(theta, fisher, anchor, alpha)
    hand = alpha * (2 * 1 ** 2 + 3 * 1 ** 2 + 4 * (-1.0) ** 2)
    assert float(pen) == pytest.approx(hand)
    pen.backward()
    torch.testing.assert_close(theta["a"].grad, 2 * alpha * fisher["a"] * (theta["a"].detach() - anchor["a"]))
    torch.testing.assert_close(theta["b"].grad, 2 * alpha * fisher["b"] * (theta["b"].detach() - anchor["b"]))
    assert theta["c"].grad is None
    with pytest.raises(KeyError, match="no matching adapted parameter"):
        fisher_penalty({"a": theta["a"]}, fisher, anchor, alpha)


def test_estimate_fisher_vs_analytic_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)  # logits = x @ w
    batches = [torch.randn(5, 3), torch.randn(5, 3), torch.randn(2, 3)]
    fisher, n = estimate_fisher(lambda x: x @ w, batches, {"w": w})
    assert n == 12
    hand = torch.zeros(3, 4)
    for x in batches:
        z = x @ w.detach()
        onehot = F.one_hot(z.argmax(1), 4).float()
        g = x.t() @ (z.softmax(1) - onehot) / x.shape[0]  # ∂ mean CE / ∂w
        hand += g ** 2
    torch.testing.assert_close(fisher["w"], hand / 3)
    assert w.grad is None  # autograd.grad does not touch .grad
    # stops once max_samples are used (whole batches)
    fisher2, n2 = estimate_fisher(lambda x: x @ w, batches, {"w": w}, max_samples=6)
    assert n2 == 10
    with pytest.raises(ValueError, match="empty"):
        estimate_fisher(lambda x: x @ w, [], {"w": w})
