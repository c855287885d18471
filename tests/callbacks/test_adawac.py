"""AdaWAC callback: loss and gradients vs a hand computation, table replay, checkpoint round trip,
logging, bad input, and 2-process DDP (identical tables equal to a replay of the global batches)."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.adawac import AdaWAC
from lightning_reweight.rules.adawac import adawac_update
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "adawac_ddp.py"
N = 12


class TinyPair(pl.LightningModule):
    """Linear regressor on two 'views': ℓ_sup = (f(x¹) − y)², ℓ_cons = (f(x¹) − f(x²))²."""

    def __init__(self, mode: str = "ok"):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.mode = mode
        self.records, self.grads = [], []

    def training_step(self, batch, batch_idx):
        x, x2, y, index = batch
        p1, p2 = self.net(x).squeeze(1), self.net(x2).squeeze(1)
        sup, cons = (p1 - y) ** 2, (p1 - p2) ** 2
        extras = {"consistency": cons}
        if self.mode == "missing":
            extras = {}
        elif self.mode == "2d":
            extras = {"consistency": torch.stack([cons, cons], 1)}
        elif self.mode == "nan":
            extras = {"consistency": cons * float("nan")}
        params = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        loss = reduce_loss(self, sup, index, **extras)
        self.records.append(dict(index=index.clone(), sup=sup.detach().clone(), cons=cons.detach().clone(),
                                 loss=loss.detach().clone(), params=params, batch=(x, x2, y)))
        return loss

    def on_after_backward(self):
        self.grads.append(self.net.weight.grad.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return IndexedDataset(TensorDataset(x, x + 0.3 * torch.randn(n, 4, generator=g), torch.randn(n, generator=g)))


def trainer(cb, tmp_path, **kw):
    kw = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path) | kw
    return pl.Trainer(callbacks=[cb], **kw)


def replay(records, eta, n=N):
    s, c = torch.full((n,), 0.5), torch.full((n,), 0.5)
    for r in records:
        rows, ns, nc = adawac_update(s, c, r["index"], r["sup"], r["cons"], eta)
        s[rows], c[rows] = ns, nc
    return s, c


def test_loss_and_gradient_equal_hand_computation(tmp_path):
    eta = 3.0
    cb = AdaWAC(eta=eta, log_every_n_steps=0)
    model = TinyPair()
    trainer(cb, tmp_path).fit(model, DataLoader(data(), batch_size=5, shuffle=False))
    assert len(model.records) == 6  # 3 steps x 2 epochs
    s, c = torch.full((N,), 0.5), torch.full((N,), 0.5)
    for rec, grad in zip(model.records, model.grads):
        # mirror step before the loss of the same step, from the detached losses
        rows, ns, nc = adawac_update(s, c, rec["index"], rec["sup"], rec["cons"], eta)
        s[rows], c[rows] = ns, nc
        b_sup, b_cons = s[rec["index"]], c[rec["index"]]
        torch.testing.assert_close(b_sup + b_cons, torch.ones_like(b_sup))
        # forward again with the parameters of that step; the betas are constants
        net = torch.nn.Linear(4, 1)
        net.load_state_dict(rec["params"])
        x, x2, y = rec["batch"]
        p1, p2 = net(x).squeeze(1), net(x2).squeeze(1)
        hand = (b_sup * (p1 - y) ** 2 + b_cons * (p1 - p2) ** 2).mean()
        hand.backward()
        torch.testing.assert_close(rec["loss"], hand.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, net.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.table["beta_sup"], s)
    torch.testing.assert_close(cb.table["beta_cons"], c)
    assert cb.table["count"].tolist() == [2] * N
    # the first step by hand: from (½, ½), β_sup = e^{ηℓs} / (e^{ηℓs} + e^{ηℓc}); replay of step 0 only
    r0 = model.records[0]
    expected = torch.exp(eta * r0["sup"]) / (torch.exp(eta * r0["sup"]) + torch.exp(eta * r0["cons"]))
    torch.testing.assert_close(replay(model.records[:1], eta)[0][r0["index"]], expected, rtol=1e-5, atol=1e-7)


def test_eta_zero_is_fixed_half_weights(tmp_path):
    cb = AdaWAC(eta=0.0, log_every_n_steps=0)
    model = TinyPair()
    trainer(cb, tmp_path, max_epochs=1).fit(model, DataLoader(data(), batch_size=4))
    assert torch.equal(cb.table["beta_sup"], torch.full((N,), 0.5))
    r = model.records[0]
    torch.testing.assert_close(r["loss"], (0.5 * r["sup"] + 0.5 * r["cons"]).mean())


def test_checkpoint_round_trip_equals_uninterrupted(tmp_path):
    loader = DataLoader(data(), batch_size=5, shuffle=False)
    full_cb = AdaWAC(eta=2.0, log_every_n_steps=0)
    full = TinyPair()
    trainer(full_cb, tmp_path / "a", max_epochs=2).fit(full, loader)

    cb1 = AdaWAC(eta=2.0, log_every_n_steps=0)
    t1 = trainer(cb1, tmp_path / "b", max_epochs=1)
    t1.fit(TinyPair(), loader)
    ckpt = tmp_path / "b.ckpt"
    t1.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][cb1.state_key]
    assert {"beta_sup", "beta_cons", "sparse"} <= set(state["table"]["columns"])

    cb2 = AdaWAC(eta=2.0, log_every_n_steps=0)
    trainer(cb2, tmp_path / "c", max_epochs=2).fit(TinyPair(), loader, ckpt_path=ckpt)
    for name in ("beta_sup", "beta_cons", "loss_sup", "loss_cons", "count"):
        torch.testing.assert_close(cb2.table[name], full_cb.table[name], rtol=0, atol=0)
    assert not torch.equal(cb2.table["beta_sup"], torch.full((N,), 0.5))
    # loading into a fresh callback before training restores the betas too
    fresh = AdaWAC(eta=2.0)
    fresh.load_state_dict(copy.deepcopy(full_cb.state_dict()))
    fresh.ensure_table(None)
    torch.testing.assert_close(fresh.betas()[0], full_cb.table["beta_sup"])


def test_missing_consistency_raises_with_fix(tmp_path):
    with pytest.raises(ValueError, match="consistency=.*paired"):
        trainer(AdaWAC(), tmp_path).fit(TinyPair("missing"), DataLoader(data(), batch_size=4))


@pytest.mark.parametrize("mode, match", [("2d", "one value per sample"), ("nan", "finite")])
def test_bad_consistency_raises(tmp_path, mode, match):
    cb = AdaWAC()
    with pytest.raises(ValueError, match=match):
        trainer(cb, tmp_path).fit(TinyPair(mode), DataLoader(data(), batch_size=4))
    assert cb.table is None or torch.equal(cb.table["beta_sup"], torch.full((N,), 0.5))  # nothing updated


def test_bad_arguments():
    with pytest.raises(ValueError, match="Expected argument `eta`"):
        AdaWAC(eta=-1.0)
    with pytest.raises(ValueError, match="consistency_key"):
        AdaWAC(consistency_key="")
    with pytest.raises(RuntimeError, match="no table yet"):
        AdaWAC().betas()


class SparseTiny(TinyPair):
    def training_step(self, batch, batch_idx):
        x, x2, y, index = batch
        p1, p2 = self.net(x).squeeze(1), self.net(x2).squeeze(1)
        return reduce_loss(self, (p1 - y) ** 2, index, consistency=(p1 - p2) ** 2, sparse=index % 3 == 0)


def test_logging_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = AdaWAC(eta=2.0, log_every_n_steps=1)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer(cb, tmp_path, logger=logger, max_epochs=1, log_every_n_steps=1).fit(
        SparseTiny(), DataLoader(data(), batch_size=6))
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    assert {"adawac/beta_sup/mean", "adawac/beta_sup/ess", "adawac/table/beta_sup_dense_mean",
            "adawac/table/beta_sup_sparse_mean", "adawac/loss_sup", "adawac/loss_cons"} <= scalars
    assert {"adawac/beta_sup/weights", "adawac/table/beta_sup", "adawac/table/beta_sup_dense",
            "adawac/table/beta_sup_sparse"} <= hists
    flags = cb.table["sparse"]
    assert flags.tolist() == [float(i % 3 == 0) for i in range(N)]


def test_ddp_tables_identical_and_equal_global_replay(tmp_path):
    run_ddp_script(SCRIPT, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for name in ("beta_sup", "beta_cons", "sparse", "count"):
        torch.testing.assert_close(r0["table"][name], r1["table"][name], rtol=0, atol=0)
    assert len(r0["records"]) == len(r1["records"]) == 6
    # the global batch of each step = rank 0's rows, then rank 1's
    merged = [dict(index=torch.cat([a["index"], b["index"]]), sup=torch.cat([a["sup"], b["sup"]]),
                   cons=torch.cat([a["cons"], b["cons"]])) for a, b in zip(r0["records"], r1["records"])]
    s, c = replay(merged, 2.0, n=r0["n"])
    torch.testing.assert_close(r0["table"]["beta_sup"], s, rtol=1e-6, atol=1e-7)
    local_only, _ = replay(r0["records"], 2.0, n=r0["n"])
    assert not torch.allclose(local_only, s)  # rank 1's rows changed rank 0's table
    torch.testing.assert_close(r0["weight"], r1["weight"])


# ------------------------------------------------------------------ lifecycle: atomic steps, validated state
def test_rejected_step_leaves_the_betas_unchanged(tmp_path):
    from .fairness_helpers import RejectAt

    cb = AdaWAC(eta=3.0, log_every_n_steps=0)
    model = TinyPair()
    t = pl.Trainer(callbacks=[cb, RejectAt(step=1)], max_epochs=1, accelerator="cpu", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="negative or non-finite weights"):
        t.fit(model, DataLoader(data(), batch_size=5, shuffle=False))
    assert len(model.records) == 1  # step 0 went through, step 1 was rejected
    s, c = replay(model.records, 3.0)
    torch.testing.assert_close(cb.table["beta_sup"], s)
    torch.testing.assert_close(cb.table["beta_cons"], c)
    assert cb.table["count"].sum() == 5


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [("beta_sup", float("nan"), "NaN"), ("beta_sup", 1.5, "<= 1"), ("beta_cons", -0.2, ">= 0"),
     ("beta_cons", 0.9, "beta_sup \\+ beta_cons = 1")],
)
def test_bad_checkpointed_betas_are_refused(tmp_path, column, value, match):
    from lightning_reweight.state.validate import CheckpointStateError

    cb = AdaWAC(eta=2.0, log_every_n_steps=0)
    trainer(cb, tmp_path, max_epochs=1).fit(TinyPair(), DataLoader(data(), batch_size=6))
    state = copy.deepcopy(cb.state_dict())
    state["table"]["columns"][column][3] = value
    fresh = AdaWAC(eta=2.0)
    with pytest.raises(CheckpointStateError, match=match):
        fresh.load_state_dict(state)
    assert fresh.table is None and fresh._pending_table_state is None
    del state["table"]["columns"]["beta_cons"]
    with pytest.raises(CheckpointStateError, match="missing key"):
        AdaWAC().load_state_dict(state)


@pytest.mark.parametrize("replacement", [False, True])
def test_compiled_step_equals_the_torch_step_in_training(tmp_path, monkeypatch, replacement):
    """The compiled CPU step (numba) and the torch step (``USE_NUMBA = False``) train to the same tables (to a
    float32 rounding step), repeated samples in a batch included; every β row equals the replayed update."""
    from torch.utils.data import RandomSampler

    from lightning_reweight.rules import instance

    tables = {}
    for use in (True, False):
        monkeypatch.setattr(instance, "USE_NUMBA", use)
        cb = AdaWAC(eta=3.0, log_every_n_steps=0)
        model = TinyPair()
        sampler = RandomSampler(data(), replacement=replacement, num_samples=30,
                                generator=torch.Generator().manual_seed(0))
        trainer(cb, tmp_path / str(use), max_epochs=2).fit(model, DataLoader(data(), batch_size=10, sampler=sampler))
        if replacement:
            assert any(r["index"].unique().numel() < r["index"].numel() for r in model.records)
        s, c = replay(model.records, 3.0)
        torch.testing.assert_close(cb.table["beta_sup"], s, rtol=2.5e-7, atol=1e-30)
        torch.testing.assert_close(cb.table["beta_cons"], c, rtol=2.5e-7, atol=1e-30)
        tables[use] = {k: v.clone() for k, v in cb.table.columns.items()}
    for name in ("beta_sup", "beta_cons", "loss", "loss_sup", "loss_cons", "ema_loss", "weight", "count"):
        torch.testing.assert_close(tables[True][name], tables[False][name], rtol=2.5e-7, atol=1e-30, equal_nan=True)
