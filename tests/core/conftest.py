import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from tests.helpers import make_trainer  # noqa: F401  (re-exported to the tests here)


class TinyModule(pl.LightningModule):
    """A linear classifier that follows the contract; records the last reduced loss and per-sample losses."""

    def __init__(self, pass_index: bool = True, reduction: str = "none", manual: bool = False, nan_at: int = -1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.pass_index, self.reduction, self.nan_at = pass_index, reduction, nan_at
        self.automatic_optimization = not manual
        self.records = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        losses = F.cross_entropy(self.net(x), y, reduction=self.reduction)
        if batch_idx == self.nan_at:
            losses = losses * torch.tensor(float("nan"))
        loss = reduce_loss(self, losses, index if self.pass_index else None)
        self.records.append((index.clone(), losses.detach().clone(), loss.detach().clone()))
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, index = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        self.log("val_loss", reduce_loss(self, losses, index))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_loader(n=24, batch_size=8, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = IndexedDataset(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


@pytest.fixture
def tiny():
    return TinyModule
