"""reduce_loss: hand computation of loss and gradients, composition, manual optimisation, bad input."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_reweight import LossReweighting, MissingIndexError, WeightingCallback, reduce_loss
from lightning_reweight.rules import loss_based_weights

from .conftest import TinyModule, make_loader, make_trainer


class FixedWeights(WeightingCallback):
    """Weights = a fixed per-sample factor (by dataset index)."""

    def __init__(self, factors, **kw):
        super().__init__(track_samples=False, **kw)
        self.factors = factors

    def compute_weights(self, batch, trainer, pl_module):
        return self.factors[batch.index]


def _attach(module, callbacks, tmp_path):
    trainer = make_trainer(callbacks, tmp_path)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.state.fn, trainer.state.stage = "fit", "train"
    trainer.training = True
    return trainer


def test_loss_and_gradients_equal_hand_computation(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    cb = LossReweighting("linupper", r=0.4, warmup_steps=0, num_samples=10)
    _attach(module, [cb], tmp_path)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    index = torch.tensor([0, 2, 4, 6, 8, 9])
    losses = F.cross_entropy(module.net(x), y, reduction="none")
    loss = reduce_loss(module, losses, index)
    grads = torch.autograd.grad(loss, list(module.net.parameters()))

    losses2 = F.cross_entropy(module.net(x), y, reduction="none")
    w = loss_based_weights(losses2.detach(), "linupper", 1.0, 0.4)
    ref = (w * losses2).mean()
    ref_grads = torch.autograd.grad(ref, list(module.net.parameters()))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # the table recorded the batch
    torch.testing.assert_close(cb.table["loss"][index], losses2.detach())
    torch.testing.assert_close(cb.table["weight"][index], w)
    assert cb.table["count"][index].tolist() == [1] * 6 and int(cb.table["count"].sum()) == 6


def test_composition_multiplies_then_renormalises(tmp_path):
    module = TinyModule()
    f1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    f2 = torch.tensor([4.0, 1.0, 1.0, 0.5])
    _attach(module, [FixedWeights(f1, name="a"), FixedWeights(f2, name="b")], tmp_path)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    loss = reduce_loss(module, losses, torch.arange(4))
    prod = f1 * f2
    w = prod * 4 / prod.sum()
    torch.testing.assert_close(loss, (w * losses).mean())


def test_no_callbacks_or_eval_is_plain_mean(tmp_path):
    module = TinyModule()
    losses = torch.tensor([1.0, 3.0])
    assert reduce_loss(module, losses, None).item() == 2.0  # no trainer at all
    trainer = _attach(module, [LossReweighting(warmup_steps=0, num_samples=4)], tmp_path)
    trainer.training = False
    trainer.state.stage = "validate"
    assert reduce_loss(module, losses, None).item() == 2.0


def test_fit_with_automatic_and_manual_optimisation_agree(tmp_path):
    results = []
    for manual in (False, True):
        module = TinyModule(manual=manual)
        cb = LossReweighting("kl_dro", r=1.0, warmup_steps=0)
        make_trainer([cb], tmp_path, max_epochs=2).fit(module, make_loader())
        results.append((module.net.weight.detach().clone(), cb.table["weight"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_warmup_gives_uniform_weights(tmp_path):
    module = TinyModule()
    cb = LossReweighting("linupper", warmup_steps=3)
    make_trainer([cb], tmp_path, max_epochs=1).fit(module, make_loader(n=32, batch_size=8))
    # steps 0..2 uniform -> plain mean; step 3 reweighted
    for step, (_, losses, loss) in enumerate(module.records):
        if step < 3:
            torch.testing.assert_close(loss, losses.mean())
        else:
            assert not torch.allclose(loss, losses.mean())


def test_missing_index_shows_the_two_lines(tmp_path):
    module = TinyModule(pass_index=False)
    with pytest.raises(MissingIndexError, match=r'reduction="none"[\s\S]*reduce_loss\(self, losses, batch_index\)'):
        make_trainer([LossReweighting()], tmp_path).fit(module, make_loader())


def test_scalar_loss_is_rejected(tmp_path):
    module = TinyModule(reduction="mean")
    with pytest.raises(ValueError, match="reduction='mean'"):
        make_trainer([LossReweighting()], tmp_path).fit(module, make_loader())


def test_nan_loss_raises_and_leaves_table_untouched(tmp_path):
    module = TinyModule(nan_at=1)
    cb = LossReweighting(warmup_steps=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        make_trainer([cb], tmp_path).fit(module, make_loader())
    # only the first batch (8 samples) was recorded
    assert int(cb.table["count"].sum()) == 8
    assert int(torch.isfinite(cb.table["loss"]).sum()) == 8


def test_out_of_range_index_and_size_mismatch(tmp_path):
    module = TinyModule()
    cb = LossReweighting(warmup_steps=0, num_samples=4)
    _attach(module, [cb], tmp_path)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        reduce_loss(module, torch.ones(2, requires_grad=True), torch.tensor([0, 7]))
    assert int(cb.table["count"].sum()) == 0
    with pytest.raises(ValueError, match="one dataset index per sample"):
        reduce_loss(module, torch.ones(3, requires_grad=True), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        reduce_loss(module, torch.ones(2, requires_grad=True), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        reduce_loss(module, torch.ones(2, 3, requires_grad=True), torch.tensor([0, 1]))


def test_all_zero_and_negative_weights_are_errors(tmp_path):
    module = TinyModule()
    _attach(module, [FixedWeights(torch.zeros(4))], tmp_path)
    with pytest.raises(ValueError, match="All per-sample weights"):
        reduce_loss(module, torch.ones(2, requires_grad=True), torch.tensor([0, 1]))
    module2 = TinyModule()
    _attach(module2, [FixedWeights(torch.tensor([-1.0, 1.0, 1.0, 1.0]))], tmp_path)
    with pytest.raises(ValueError, match="negative"):
        reduce_loss(module2, torch.ones(2, requires_grad=True), torch.tensor([0, 1]))


def test_unknown_rule_and_bad_arguments():
    with pytest.raises(ValueError, match="Unknown weight rule 'linear'.*linupper"):
        LossReweighting("linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        LossReweighting(warmup_steps=-1)
    with pytest.raises(ValueError, match="max_weight"):
        LossReweighting(max_weight=0.5)
    with pytest.raises(ValueError, match="num_samples"):
        LossReweighting(num_samples=0)


def test_validation_does_not_touch_state(tmp_path):
    module = TinyModule()
    cb = LossReweighting(warmup_steps=0)
    trainer = make_trainer([cb], tmp_path, max_epochs=1, limit_val_batches=2)
    trainer.fit(module, make_loader(), make_loader())
    assert int(cb.table["count"].sum()) == 24  # training samples only
    assert isinstance(trainer.callback_metrics["val_loss"], torch.Tensor)
    assert pl.__version__


class RawWeights(FixedWeights):
    normalized = False


def test_unnormalised_factors_keep_their_scale(tmp_path):
    module = TinyModule()
    f1 = torch.tensor([1.0, 3.0, 1.0, 3.0])        # mean-1 callback: renormalised
    f2 = torch.tensor([0.5, 0.5, 0.25, 0.25])       # unnormalised callback: kept as is
    cbs = [FixedWeights(f1, name="a"), RawWeights(f2, name="b")]
    _attach(module, cbs, tmp_path)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    loss = reduce_loss(module, losses, torch.arange(4))
    w = f1 * 4 / f1.sum() * f2
    torch.testing.assert_close(loss, (w * losses).mean())
    # each callback logs its own factor, not the product
    torch.testing.assert_close(cbs[0].last_weights, f1)
    torch.testing.assert_close(cbs[1].last_weights, f2)


def test_callback_without_opinion_logs_nothing(tmp_path):
    class Silent(WeightingCallback):
        pass

    module = TinyModule()
    silent = Silent(num_samples=4)
    _attach(module, [silent, FixedWeights(torch.tensor([1.0, 2.0, 3.0, 4.0]))], tmp_path)
    reduce_loss(module, torch.ones(4, requires_grad=True), torch.arange(4))
    assert silent.last_weights is None and silent._last is None
    assert int(silent.table["count"].sum()) == 4  # still records the batch
