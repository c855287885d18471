"""Contract-level input guards: each bad input is refused with a clear message before any state changes."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import GroupBalancing, IndexedDataset, LossReweighting, WeightingCallback, reduce_loss

from .conftest import TinyModule, make_trainer
from .test_contract import _attach


class Recorder(WeightingCallback):
    """Records every hook call; weights 1."""

    def __init__(self, **kw):
        super().__init__(num_samples=10, **kw)
        self.calls = []

    def validate_batch(self, batch, trainer):
        self.calls.append("validate")
        super().validate_batch(batch, trainer)

    def compute_weights(self, batch, trainer, pl_module):
        self.calls.append("compute")
        return torch.ones(len(batch))


@pytest.fixture
def recorder(tmp_path):
    module, cb = TinyModule(), Recorder()
    _attach(module, [cb], tmp_path)
    return module, cb


def test_empty_batch_is_refused_with_a_message(recorder):
    module, cb = recorder
    with pytest.raises(ValueError, match=r"at least one sample.*got 0 .*Recorder.*nothing was updated.*return None"):
        reduce_loss(module, torch.ones(0, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert cb.calls == [] and cb.table is None  # refused before the callback saw anything


def test_two_column_index_is_refused_before_any_computation(recorder):
    module, cb = recorder
    with pytest.raises(ValueError, match=r"`index` to be 1-D .* shape \(4,\), but got shape \(4, 2\)"):
        reduce_loss(module, torch.ones(4, requires_grad=True), torch.zeros(4, 2, dtype=torch.long))
    assert cb.calls == []
    with pytest.raises(ValueError, match=r"`group` to be 1-D"):
        reduce_loss(module, torch.ones(4, requires_grad=True), torch.arange(4), group=torch.zeros(4, 1, dtype=torch.long))
    assert cb.calls == []


@pytest.mark.parametrize("group", [torch.tensor([0.9, 1.0, 0.0, 1.0]), torch.tensor([True, False, True, False])])
def test_float_and_bool_group_ids_are_refused(recorder, group):
    module, cb = recorder
    with pytest.raises(TypeError, match=rf"`group` to hold an integer group id per sample, but got dtype {group.dtype}.*0.9 -> 0"):
        reduce_loss(module, torch.ones(4, requires_grad=True), torch.arange(4), group=group)
    assert cb.calls == [] and cb.table is None  # refused before the callback saw anything


class ShiftedIndex(pl.LightningModule):
    """Passes ``index + shift`` (a wrong index) to reduce_loss; batches carry groups."""

    def __init__(self, shift):
        super().__init__()
        self.net, self.shift, self.steps = torch.nn.Linear(4, 3), shift, 0

    def training_step(self, batch, batch_idx):
        x, y, index, group = batch
        self.steps += 1
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index + self.shift, group=group, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _grouped_loader(n=16):
    g = torch.Generator().manual_seed(0)
    ds = IndexedDataset(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                        groups=torch.arange(n) % 2)
    return DataLoader(ds, batch_size=8)


@pytest.mark.parametrize("shift", [-1, -16, 16])
@pytest.mark.parametrize("make", [
    lambda: GroupBalancing(mode="upweight", tau=1.0, by="group"),
    lambda: LossReweighting(track_samples=False, warmup_steps=0),          # size inferred from the loader
    lambda: LossReweighting(track_samples=False, warmup_steps=0, num_samples=16),
], ids=["balancing-upweight", "reweighting-inferred", "reweighting-explicit"])
def test_table_less_callbacks_check_the_index_range(tmp_path, shift, make):
    """index - 1 used to give wrong weights silently, index - N to wrap; both now stop the step."""
    module = ShiftedIndex(shift)
    lo, hi = (shift, 7 + shift)
    with pytest.raises(IndexError, match=rf"indices in \[0, 16\) \(the training set size\), but got range "
                                         rf"\[{lo}, {hi}\]; nothing was updated"):
        make_trainer([make()], tmp_path).fit(module, _grouped_loader())
    assert module.steps == 1
