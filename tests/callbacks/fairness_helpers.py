"""A tiny grouped classification setup shared by the FEBS / GroupDRO callback tests."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.base import WeightingCallback
from tests.helpers import make_trainer  # noqa: F401  (re-exported to the tests here)


class GroupedModule(pl.LightningModule):
    """Linear classifier following the contract with group ids; records each step's indices, losses, loss."""

    def __init__(self, lr: float = 0.1, pass_group: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.lr, self.pass_group = lr, pass_group
        self.records = []

    def training_step(self, batch, batch_idx):
        x, y, index, group = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        loss = reduce_loss(self, losses, index, group=group if self.pass_group else None)
        self.records.append((index.clone(), group.clone(), losses.detach().clone(), loss.detach().clone()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_grouped_loader(n=24, batch_size=8, num_groups=3, seed=0, groups=None, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    if groups is None:
        groups = torch.arange(n) % num_groups
    ds = IndexedDataset(TensorDataset(x, y), groups=groups)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)




class RejectAt(WeightingCallback):
    """A later callback whose weights are rejected (negative) at step ``step``: that step must change no state."""

    def __init__(self, step: int):
        super().__init__(track_samples=False, log_every_n_steps=0)
        self.step = step

    def compute_weights(self, batch, trainer, pl_module):
        if batch.global_step == self.step:
            return -torch.ones(len(batch))
        return None
