"""All-padding sequences (no target token) take no part in the loss-based rules: `reduce_loss(..., valid=...)`."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import LossReweighting, reduce_loss
from lightning_reweight.rules.instance import loss_based_weights
from lightning_reweight.sequence import sequence_losses
from tests.helpers import make_trainer

_REAL = torch.tensor([[1, 2, 3, 0], [2, 2, -100, -100], [3, 1, 0, 2]])  # three sequences with target tokens
_PAD = torch.full((1, 4), -100)
_LOGITS = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))  # the real rows' token logits


class SeqModel(pl.LightningModule):
    """Fixed token logits per batch row (lr 0): one step's weights and loss, with or without a `valid` mask."""

    def __init__(self, targets: torch.Tensor, pass_valid: bool = True, logits: torch.Tensor | None = None):
        super().__init__()
        self.logits = torch.nn.Parameter(_LOGITS.clone() if logits is None else logits)
        self.targets, self.pass_valid, self.returned = targets, pass_valid, []

    def training_step(self, batch, batch_idx):
        losses, counts = sequence_losses(self.logits, self.targets, return_counts=True)
        extras = {"valid": counts > 0} if self.pass_valid else {}
        loss = reduce_loss(self, losses, **extras)
        self.returned.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _step(tmp_path, order, rule="linupper", steps=1, pass_valid=True, **kw):
    """One run over the rows named in ``order`` ("r0".."r2": real sequences, "pad": no target token)."""
    cb = LossReweighting(rule, track_samples=False, log_every_n_steps=0, **{"warmup_steps": 0, **kw})
    targets = torch.cat([_PAD if k == "pad" else _REAL[int(k[1])][None] for k in order])
    logits = torch.cat([torch.ones(1, 4, 5) if k == "pad" else _LOGITS[int(k[1])][None] for k in order])
    model = SeqModel(targets, pass_valid, logits)
    loader = DataLoader(TensorDataset(torch.zeros(steps)), batch_size=1)
    make_trainer([cb], tmp_path, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0).fit(model, loader)
    return cb, model


def test_padding_rows_move_the_other_rows_weights_without_a_mask():
    # the fault: a padding row's loss 0 becomes the min-max minimum and flattens the real rows' weights
    assert torch.allclose(loss_based_weights(torch.tensor([1.0, 2.0, 2.0])), torch.tensor([0.1183, 1.4409, 1.4409]),
                          atol=1e-4)
    assert torch.allclose(loss_based_weights(torch.tensor([1.0, 2.0, 2.0, 0.0]))[:3], torch.full((3,), 1.2978),
                          atol=1e-4)


@pytest.mark.parametrize("rule,kw", [("linupper", {}), ("quadratic", {}), ("kl_dro", {"normalizer": "ema"}),
                                     ("linupper", {"max_weight": 1.2})])
def test_real_rows_get_the_same_weights_with_and_without_padding_rows(tmp_path, rule, kw):
    alone, alone_model = _step(tmp_path / "a", ["r0", "r1", "r2"], rule, steps=2, **kw)
    order = ["pad", "r0", "r1", "pad", "r2"]
    padded, padded_model = _step(tmp_path / "b", order, rule, steps=2, **kw)
    real = torch.tensor([k != "pad" for k in order])
    # mean-1 rules: the same weights; a rule whose scale matters (the EMA normaliser) is scaled by B / B_real,
    # since `reduce_loss` divides by the whole batch
    scale = 1.0 if padded.rule.normalized else len(order) / 3
    torch.testing.assert_close(padded.last_weights[real], alone.last_weights * scale)
    assert padded.last_weights[~real].tolist() == [0.0, 0.0]
    # the returned loss (the weighted mean over the real rows) and the rule's state do not see the padding
    assert padded_model.returned == pytest.approx(alone_model.returned, rel=1e-6)
    assert padded.rule.state_dict() == pytest.approx(alone.rule.state_dict())
    assert not torch.equal(alone.last_weights, torch.ones(3))  # the rule does weigh the real rows


def test_warmup_gives_padding_rows_weight_zero_and_all_padding_is_a_no_op(tmp_path):
    cb, model = _step(tmp_path / "w", ["r0", "pad", "r1"], warmup_steps=5)
    assert cb.last_weights.tolist() == [1.0, 0.0, 1.0]
    for warmup in (0, 5):
        cb, model = _step(tmp_path / f"e{warmup}", ["pad", "pad"], warmup_steps=warmup)
        assert cb.last_weights.tolist() == [1.0, 1.0] and model.returned == [0.0]  # nothing to weigh: no error


def test_without_the_mask_padding_rows_count(tmp_path):
    cb, _ = _step(tmp_path, ["r0", "r1", "r2", "pad"], pass_valid=False)
    assert float(cb.last_weights[3]) > 0  # documented: without `valid=` every row takes part


def test_a_mask_that_is_not_bool_is_refused_with_the_fix(tmp_path):
    class Counts(SeqModel):
        def training_step(self, batch, batch_idx):
            losses, counts = sequence_losses(self.logits, self.targets, return_counts=True)
            return reduce_loss(self, losses, valid=counts)

    cb = LossReweighting("linupper", track_samples=False, warmup_steps=0, log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"`valid` extra .* bool .*`valid=counts > 0`"):
        trainer.fit(Counts(_REAL), DataLoader(TensorDataset(torch.zeros(1)), batch_size=1))
    with pytest.raises(ValueError, match="valid_key"):
        LossReweighting("linupper", valid_key="")


def test_padding_rows_are_not_recorded_in_the_table():
    """A keyed stream: an all-padding row's loss 0 must not reach its key's table entry."""
    import tempfile
    from pathlib import Path

    from lightning_reweight import LossReweighting, reduce_loss
    from tests.core.conftest import TinyModule
    from tests.core.test_contract import _attach

    module = TinyModule()
    cb = LossReweighting("linupper", warmup_steps=0, num_samples=8)
    _attach(module, [cb], Path(tempfile.mkdtemp()))
    losses = torch.tensor([1.0, 2.0, 0.0, 3.0], requires_grad=True)
    reduce_loss(module, losses, torch.tensor([0, 1, 2, 3]), valid=torch.tensor([True, True, False, True]))
    assert cb.table["count"].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert torch.isnan(cb.table["loss"][2]) or cb.table["loss"][2] != 0


def test_the_valid_rows_are_found_once_per_step():
    """The rule's valid rows serve the table write too: one ``nonzero`` (on a GPU, the one host read the mask
    costs) per step, not a second ``all`` and ``nonzero`` at the commit."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_reweight import Reweighter

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    cb = LossReweighting("linupper", warmup_steps=0, num_samples=8)
    reweighter = Reweighter([cb])
    for valid in ([True, False, True, True], [True] * 4):
        losses = torch.tensor([1.0, 2.0, 0.5, 3.0], requires_grad=True)
        counter = Count()
        with counter:
            reweighter.reduce(losses, torch.tensor([0, 1, 2, 3]), valid=torch.tensor(valid))
        assert counter.ops["nonzero"] == 1 and counter.ops["all"] == 0, counter.ops
    assert cb.table["count"].tolist() == [2, 1, 2, 2, 0, 0, 0, 0]
