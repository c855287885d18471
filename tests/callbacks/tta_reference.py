"""A tiny BatchNorm classifier and an independent, loop-style EATA/Tent reference (shared by the TTA tests and
the 2-process DDP script). The reference follows the structure of the official code (``torch.where`` filters,
``1/exp(E − E0)`` coefficients, mean over the kept samples), not our implementation."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(pl.LightningModule):
    """conv → BN2d → ReLU → pool → linear → BN1d → linear; ``test_step`` logs accuracy, ``predict_step`` returns
    logits."""

    def __init__(self, classes: int = 4, scale: float = 3.0, call_net_directly: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes))
        with torch.no_grad():  # sharper predictions so that entropies spread around the threshold
            self.net[-1].weight.mul_(scale)
        self.call_net_directly = call_net_directly

    def forward(self, x):
        return self.net(x)

    def _logits(self, x):
        return self.net(x) if self.call_net_directly else self(x)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("acc", (self._logits(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self._logits(batch[0])


def make_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(**kw)
    with torch.no_grad():  # non-trivial running statistics, so batch vs running statistics differ
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def make_data(n: int = 48, seed: int = 1, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g) * 1.5 + 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def tta_mode(model: nn.Module) -> dict[str, nn.Parameter]:
    """Batch statistics in every BN, only BN affine parameters trainable; returns them by name."""
    model.eval()
    model.requires_grad_(False)
    params = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params[f"{name}.weight"] = m.weight
            params[f"{name}.bias"] = m.bias
    return params


def reference_fisher(model, params, batches):
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for x in batches:
        out = model(x)
        loss = F.cross_entropy(out, out.argmax(1))
        model.zero_grad()
        loss.backward()
        for k, p in params.items():
            fisher[k] += p.grad.detach() ** 2
        model.zero_grad()
    return {k: v / len(batches) for k, v in fisher.items()}


def reference_adapt(model, steps, *, method="eata", e0=None, d_margin=0.4, alpha=0.0, fisher_batches=(),
                    lr=1e-2):
    """Run EATA/Tent. ``steps`` is a list of steps, each a list of per-rank input batches (one entry: 1 process).

    Returns predictions (per step, per rank), the adapted model, ``m``, and counts.
    """
    model = copy.deepcopy(model)
    params = tta_mode(model)
    anchor = {k: p.detach().clone() for k, p in params.items()}
    fisher = reference_fisher(model, params, list(fisher_batches)) if alpha > 0 else None
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    m, preds, backward_passes, selected_total = None, [], 0, 0
    for rank_batches in steps:
        outs = [model(x) for x in rank_batches]
        preds.append([o.detach().clone() for o in outs])
        loss_terms, kept_probs = [], []
        for out in outs:
            ent = -(out.softmax(1) * out.log_softmax(1)).sum(1)
            if method == "tent":
                loss_terms.append(ent)
                kept_probs.append(out.softmax(1).detach())
                continue
            ids1 = torch.where(ent < e0)[0]
            ent1, p1 = ent[ids1], out[ids1].softmax(1).detach()
            if m is not None:
                cos = F.cosine_similarity(m.unsqueeze(0), p1, dim=1)
                ids2 = torch.where(cos.abs() < d_margin)[0]
                ent1, p1 = ent1[ids2], p1[ids2]
            coeff = 1 / torch.exp(ent1.detach() - e0)
            loss_terms.append(ent1 * coeff)
            kept_probs.append(p1)
        kept = torch.cat(kept_probs)
        n_sel = kept.shape[0]
        if method == "eata" and n_sel > 0:
            m = kept.mean(0) if m is None else 0.9 * m + 0.1 * kept.mean(0)
        if n_sel > 0:
            loss = torch.cat(loss_terms).sum() / n_sel
            if fisher is not None:
                loss = loss + alpha * sum((fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in params.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            backward_passes += 1
            selected_total += n_sel
        opt.zero_grad()
    return {"preds": preds, "model": model, "m": m, "backward_passes": backward_passes, "selected": selected_total,
            "params": {k: p.detach().clone() for k, p in params.items()}, "fisher": fisher}
