"""A small decoder-only character-level language model that follows the per-sample loss contract."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reweight.contract import reduce_loss
from lightning_reweight.sequence import sequence_losses
from lightning_reweight.state.keys import StreamKeys

__all__ = ["CharTransformerLM"]


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (``F.scaled_dot_product_attention``) and an MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformerLM(pl.LightningModule):
    """Decoder-only transformer over bytes (characters of ASCII text), trained with per-sequence losses.

    ``training_step`` computes one loss per sequence (mean over its non-ignored target tokens,
    ``sequence_losses``) and hands it to ``reduce_loss``, so any attached weighting callback reweights whole
    sequences. On a stream it passes no index by default (``sample_keys="none"``: batch-only rules such as
    ``LossReweighting(track_samples=False)``); ``"exact"`` passes the batch's stable ``key`` as the index,
    ``"hashed"`` passes ``StreamKeys(slots=key_slots)(key)`` (give the callback ``num_samples=key_slots``).
    Validation logs ``val/loss`` (nats per character, averaged over all tokens) and ``val/bpc`` (bits per
    character); batches with a ``domain`` (a mixture of streams, e.g. ``MultilingualDataModule``) also give
    ``val/loss/<domain>``, ``val/bpc/<domain>`` and ``val/bpc_worst`` / ``val/bpc_mean`` over the domains, and
    training passes ``group=batch["domain"]`` to ``reduce_loss``.

    Batches are dicts with ``x`` and ``y`` (``(B, T)`` int64) and optionally ``key`` (``(B,)``).

    Args:
        vocab_size: token ids (256: bytes).
        d_model: width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        max_len: longest sequence (learned position embeddings).
        dropout: dropout in attention and MLP.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps (0: none).
        ignore_index: target id of padding tokens.
        sample_keys: ``"none"``, ``"exact"`` or ``"hashed"`` (see above).
        key_slots: hashed table size for ``sample_keys="hashed"``.
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 256, dropout: float = 0.0, lr: float = 3e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 0, ignore_index: int = -100,
                 sample_keys: Literal["none", "exact", "hashed"] = "none", key_slots: int = 2**20):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Expected d_model divisible by n_heads, but got d_model={d_model}, n_heads={n_heads}.")
        if sample_keys not in ("none", "exact", "hashed"):
            raise ValueError(f"Expected argument `sample_keys` in ('none', 'exact', 'hashed'), but got {sample_keys!r}.")
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([_Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.keys = StreamKeys(slots=key_slots) if sample_keys == "hashed" else None
        self._val_sums: Tensor | None = None  # (summed token NLL, token count) of this validation pass
        self._val_domains: Tensor | None = None  # (domains, 2): the same per domain, when batches carry one
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.hparams.max_len:
            raise ValueError(f"Expected sequences of at most max_len={self.hparams.max_len}, but got {t}. "
                             "Raise `max_len`.")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def _index(self, batch: dict[str, Any]) -> Tensor | None:
        mode = self.hparams.sample_keys
        if mode == "none":
            return None
        if "key" not in batch:
            raise KeyError(f"sample_keys={mode!r} needs a `key` per sample in the batch, but the batch has "
                           f"{sorted(batch)}. Use a stream that exposes stable keys, or sample_keys='none'.")
        return batch["key"] if self.keys is None else self.keys(batch["key"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = sequence_losses(self(batch["x"]), batch["y"], ignore_index=self.hparams.ignore_index)
        self.log("train/loss", losses.detach().mean(), prog_bar=True)
        # a mixture of streams gives each sequence its domain: group-aware callbacks (StreamMixing, GroupDRO) get it
        return reduce_loss(self, losses, self._index(batch), group=batch.get("domain"))

    def _domain_names(self) -> list[str] | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "domain_names", None)
        return list(names) if names else None

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        names = self._domain_names()
        self._val_domains = torch.zeros(len(names), 2, dtype=torch.float64, device=self.device) if names else None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        y = batch["y"]
        tok = F.cross_entropy(self(batch["x"]).flatten(0, 1).float(), y.flatten(),
                              ignore_index=self.hparams.ignore_index, reduction="none").view_as(y)
        valid = y != self.hparams.ignore_index
        nll, ntok = tok.sum(1).double(), valid.sum(1).double()  # per sequence
        assert self._val_sums is not None
        self._val_sums += torch.stack([nll.sum(), ntok.sum()])
        if self._val_domains is not None and "domain" in batch:  # per-domain sums (a mixture's held-out split)
            self._val_domains.index_add_(0, batch["domain"].long(), torch.stack([nll, ntok], 1))

    def on_validation_epoch_end(self) -> None:
        assert self._val_sums is not None
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # all ranks' tokens
        loss = (sums[0] / sums[1].clamp(min=1)).float()
        self.log("val/loss", loss)
        self.log("val/bpc", loss / math.log(2.0), prog_bar=True)
        if self._val_domains is not None:
            self._log_domains(self.trainer.strategy.reduce(self._val_domains, reduce_op="sum"))

    def _log_domains(self, sums: Tensor) -> None:
        """``val/loss/<domain>``, ``val/bpc/<domain>`` and, over the domains with tokens, ``val/bpc_worst`` /
        ``val/bpc_mean`` (also ``val/loss_worst`` / ``val/loss_mean``): monitorable by ``ModelCheckpoint``."""
        names = self._domain_names() or [f"domain_{k}" for k in range(sums.shape[0])]
        seen = sums[:, 1] > 0
        if not bool(seen.any()):
            return
        loss = (sums[:, 0] / sums[:, 1].clamp(min=1)).float()
        for k in torch.nonzero(seen).flatten().tolist():
            self.log(f"val/loss/{names[k]}", loss[k])
            self.log(f"val/bpc/{names[k]}", loss[k] / math.log(2.0))
        self.log("val/loss_worst", loss[seen].max())
        self.log("val/loss_mean", loss[seen].mean())
        self.log("val/bpc_worst", loss[seen].max() / math.log(2.0))
        self.log("val/bpc_mean", loss[seen].mean() / math.log(2.0))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        warm = self.hparams.warmup_steps
        if not warm:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
