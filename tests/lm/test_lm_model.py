"""Item 4: the decoder-only character LM follows the contract, learns, and logs val loss and bits per char."""

import math

import pytest
import torch

from lightning_reweight import LossReweighting
from lightning_reweight.data.text import CharStreamDataModule
from lightning_reweight.models.lm import CharTransformerLM
from tests.helpers import make_trainer


def test_char_lm_learns_on_a_stream_with_index_free_reweighting(text_file, tmp_path):
    torch.manual_seed(0)
    dm = CharStreamDataModule(path=str(text_file), seq_len=16, batch_size=8, seed=0, max_val_windows=8)
    model = CharTransformerLM(d_model=32, n_layers=1, n_heads=2, max_len=16, lr=1e-2)
    cb = LossReweighting("linupper", warmup_steps=5, track_samples=False, log_every_n_steps=0)
    trainer = make_trainer([cb], tmp_path, max_steps=60, max_epochs=-1, val_check_interval=30,
                           check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.validate(model, datamodule=dm, verbose=False)
    before = float(trainer.callback_metrics["val/loss"])
    trainer.fit(model, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m["val/loss"]) < before - 1.0  # from ~ln(256) towards the text's statistics
    assert math.isclose(float(m["val/bpc"]), float(m["val/loss"]) / math.log(2), rel_tol=1e-6)
    assert cb.last_weights is not None and not torch.allclose(cb.last_weights, torch.ones(8))


def test_causal_model_does_not_see_the_future():
    model = CharTransformerLM(d_model=16, n_layers=2, n_heads=2, max_len=8).eval()
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0, :5], model(y)[0, :5])
        assert not torch.allclose(model(x)[0, 5:], model(y)[0, 5:])


def test_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        CharTransformerLM(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="sample_keys"):
        CharTransformerLM(sample_keys="bogus")
    with pytest.raises(ValueError, match="max_len"):
        CharTransformerLM(d_model=16, n_heads=2, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
