"""Item 1: ``reduce_loss(self, losses)`` without an index when every callback needs only the global batch."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_reweight import GroupDRO, LossReweighting, MissingIndexError, WeightingCallback, reduce_loss
from lightning_reweight.rules import create_rule
from tests.helpers import make_trainer


class Stream(IterableDataset):
    """An index-free stream: (x, y, group) rows, no dataset index, no length."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.group = torch.arange(n) % 2

    def __iter__(self):
        yield from zip(self.x, self.y, self.group)


class StreamModel(pl.LightningModule):
    def __init__(self, with_group=False):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.with_group = with_group
        self.results = []  # (losses, returned loss) per step

    def training_step(self, batch, batch_idx):
        x, y, group = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        out = reduce_loss(self, losses, group=group) if self.with_group else reduce_loss(self, losses)
        self.results.append((losses.detach().clone(), out.detach().clone()))
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("rule", ["linupper", "quadratic", "extremes", "kl_dro"])
def test_batch_rules_run_without_index_and_give_the_weighted_mean(rule, tmp_path):
    cb = LossReweighting(rule, warmup_steps=0, track_samples=False, log_every_n_steps=0)
    model = StreamModel()
    make_trainer([cb], tmp_path, max_steps=3).fit(model, DataLoader(Stream(), batch_size=16))
    assert len(model.results) == 3 and cb.table is None
    reference = create_rule(rule)
    for losses, out in model.results:
        w = reference(losses)
        torch.testing.assert_close(out, (w * losses).mean())
    assert not torch.allclose(cb.last_weights, torch.ones(16))  # the rule really reweighted


def test_group_dro_runs_without_index(tmp_path):
    cb = GroupDRO(num_groups=2, step_size=0.5, log_every_n_steps=0)
    model = StreamModel(with_group=True)
    make_trainer([cb], tmp_path, max_steps=3).fit(model, DataLoader(Stream(), batch_size=16))
    assert len(model.results) == 3
    assert not torch.allclose(cb.q.float(), torch.full((2,), 0.5))  # the per-group state moved


def test_default_table_without_index_refuses_and_names_track_samples(tmp_path):
    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=0)  # track_samples=True (default)
    with pytest.raises(MissingIndexError, match="track_samples=False"):
        make_trainer([cb], tmp_path, max_steps=1).fit(StreamModel(), DataLoader(Stream(), batch_size=16))
    assert cb.table is None


class PerSampleState(WeightingCallback):
    """A callback whose weights read per-sample state: it cannot run without an index."""

    def compute_weights(self, batch, trainer, pl_module):
        return torch.ones(len(batch))


def test_stateful_callback_keeps_its_missing_index_error(tmp_path):
    stateful = PerSampleState(track_samples=False, log_every_n_steps=0)
    batch_only = LossReweighting("linupper", track_samples=False, log_every_n_steps=0)
    assert stateful.needs_index and not batch_only.needs_index
    with pytest.raises(MissingIndexError, match="PerSampleState needs the dataset index") as err:
        make_trainer([batch_only, stateful], tmp_path, max_steps=1).fit(StreamModel(),
                                                                        DataLoader(Stream(), batch_size=16))
    assert "LossReweighting" not in str(err.value).split("needs")[0]  # only the callback that needs it is named
