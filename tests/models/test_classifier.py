"""ImageClassifier scores several test dataloaders separately."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.models import ImageClassifier


def test_each_test_dataloader_gets_its_own_metrics(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("resnet10t", num_classes=3, in_chans=1, model_kwargs={"stem_width": 8})
    x = torch.randn(12, 1, 16, 16)
    with torch.no_grad():
        model.eval()
        pred = model(x).argmax(-1)
    right = DataLoader(TensorDataset(x, pred), batch_size=6)            # labels = the model's own predictions
    wrong = DataLoader(TensorDataset(x, (pred + 1) % 3), batch_size=6)  # every label wrong
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    res = trainer.test(model, dataloaders=[right, wrong])
    assert res[0]["test/acc/dataloader_idx_0"] == 1.0
    assert res[1]["test/acc/dataloader_idx_1"] == 0.0
    # a single dataloader keeps the plain names
    res = trainer.test(model, dataloaders=right)
    assert res[0]["test/acc"] == 1.0
