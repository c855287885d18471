"""Atomic steps: propose -> validate -> commit. A step rejected by any callback changes no callback's state."""

import pytest
import torch

from lightning_reweight import WeightingCallback, reduce_loss
from lightning_reweight.engine import _host

from .conftest import TinyModule
from .test_contract import _attach


class Stateful(WeightingCallback):
    """A toy stateful callback: a step counter and an EMA, changed only at commit, plus the table."""

    def __init__(self, log, **kw):
        super().__init__(num_samples=8, **kw)
        self.log, self.steps, self.ema = log, 0, torch.zeros(())

    def compute_weights(self, batch, trainer, pl_module):
        self.log.append(f"propose {self.prefix}")
        return 1.0 + batch.losses / batch.losses.sum()

    def on_weights_computed(self, batch, weights, trainer, pl_module):
        self.log.append(f"commit {self.prefix}")
        self.steps += 1
        self.ema = 0.9 * self.ema + 0.1 * batch.losses.mean()
        super().on_weights_computed(batch, weights, trainer, pl_module)


class Proposes(WeightingCallback):
    """Returns the given weights once ``armed`` (no opinion before; table-less)."""

    def __init__(self, weights, normalized=True, armed=False, **kw):
        super().__init__(track_samples=False, **kw)
        self.weights, self.normalized, self.armed = weights, normalized, armed

    def compute_weights(self, batch, trainer, pl_module):
        return self.weights if self.armed else None


class RejectsBatch(WeightingCallback):
    def __init__(self):
        super().__init__(track_samples=False, name="picky")
        self.armed = False

    def validate_batch(self, batch, trainer):
        if self.armed:
            raise ValueError("picky refuses this batch")


def _snapshot(cb):
    return cb.steps, cb.ema.clone(), {k: v.clone() for k, v in cb.table.columns.items()}, cb.last_weights


def _assert_unchanged(cb, snap):
    steps, ema, cols, last = snap
    assert cb.steps == steps and torch.equal(cb.ema, ema) and cb.last_weights is last
    for k, v in cols.items():
        torch.testing.assert_close(cb.table[k], v, equal_nan=True, rtol=0, atol=0)


LOSSES, INDEX = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 2, 4, 6])


@pytest.mark.parametrize("late, message", [
    (lambda: Proposes(torch.tensor([1.0, float("nan"), 1.0, 1.0]), name="late"),
     r"from Proposes, but it returned negative or non-finite weights; the step was rejected and no callback state"),
    (lambda: Proposes(torch.tensor([1.0, -1.0, 1.0, 1.0]), name="late"), r"from Proposes, but it returned negative"),
    (lambda: Proposes(torch.ones(3), name="late"), r"Proposes to return one weight per sample .*\(4\), but got 3; "
                                                   r"no callback state was updated"),
    (lambda: Proposes(torch.tensor([0.0, 0.0, 0.0, 0.0]), normalized=False, name="late"),
     r"All per-sample weights of this batch are zero.*no callback state was updated"),
    (lambda: Proposes(torch.full((4,), 3e38), normalized=False, name="late"),
     r"combined weights.*overflowed.*no callback state was updated"),
    (lambda: RejectsBatch(), r"picky refuses"),
])
def test_rejection_by_a_later_callback_leaves_earlier_state_unchanged(tmp_path, late, message):
    log = []
    early = Stateful(log, name="early")
    module = TinyModule()
    late = late()
    _attach(module, [early, late], tmp_path)
    reduce_loss(module, LOSSES.clone().requires_grad_(), INDEX)  # one accepted step first
    assert early.steps == 1 and int(early.table["count"].sum()) == 4
    snap = _snapshot(early)
    late.armed = True
    with pytest.raises(ValueError, match=message):
        reduce_loss(module, torch.tensor([5.0, 1.0, 2.0, 3.0], requires_grad=True), torch.tensor([1, 3, 5, 7]))
    _assert_unchanged(early, snap)
    assert log.count("commit early") == 1  # only the accepted first step committed


def test_every_callback_proposes_before_any_commits(tmp_path):
    log = []
    a, b = Stateful(log, name="a"), Stateful(log, name="b")
    module = TinyModule()
    _attach(module, [a, b], tmp_path)
    reduce_loss(module, LOSSES.clone().requires_grad_(), INDEX)
    assert log == ["propose a", "propose b", "commit a", "commit b"]
    # each callback's own proposal is logged; the table records the combined weights training used
    own = 1.0 + LOSSES / LOSSES.sum()
    torch.testing.assert_close(a.last_weights, own)
    combined = own * own
    torch.testing.assert_close(a.table["weight"][INDEX], combined * 4 / combined.sum())


def test_checked_step_reads_the_host_twice_and_deferred_checks_not_at_all(tmp_path, monkeypatch):
    """sync_checks=True on a device: one host read before the proposals, one before the commit (on the CPU
    each check is read directly); False: none per step."""
    import lightning_reweight.engine as contract
    from lightning_reweight import LossReweighting

    calls = []

    def fake_host(values):  # a meta tensor cannot be read: answer "valid" to every check
        calls.append(len(values))
        return [True] * len(values)

    monkeypatch.setattr(contract, "_host", fake_host)
    module = TinyModule()
    _attach(module, [LossReweighting(warmup_steps=0, num_samples=8)], tmp_path)
    module.to("meta")
    reduce_loss(module, LOSSES.to("meta").requires_grad_(), INDEX.to("meta"))
    assert len(calls) == 2
    monkeypatch.setattr(contract, "_host", lambda v: calls.append(len(v)) or _host(v))

    calls.clear()
    lazy = Proposes(torch.tensor([1.0, float("nan"), 1.0, 1.0]), armed=True, sync_checks=False)
    module = TinyModule()
    _attach(module, [lazy], tmp_path)
    reduce_loss(module, LOSSES.clone().requires_grad_(), INDEX)  # the bad step is not stopped ...
    assert calls == []
    with pytest.raises(ValueError, match=r"1 training step\(s\).*sync_checks=False"):
        lazy.check_deferred()  # ... but reported at the next check (epoch end, checkpoint, validation)
    lazy.check_deferred()  # reported once


def test_a_failing_commit_says_which_callbacks_already_committed(tmp_path):
    class BrokenCommit(WeightingCallback):
        def __init__(self):
            super().__init__(track_samples=False, name="broken")

        def on_weights_computed(self, batch, weights, trainer, pl_module):
            raise KeyError("bug")

    log = []
    module = TinyModule()
    _attach(module, [Stateful(log, name="first"), BrokenCommit()], tmp_path)
    with pytest.raises(RuntimeError, match=r"BrokenCommit.on_weights_computed failed.*already committed this step: "
                                           r"Stateful\. Their state includes this step"):
        reduce_loss(module, LOSSES.clone().requires_grad_(), INDEX)


def test_deferred_checks_fold_on_the_device_and_read_back_once(monkeypatch):
    """sync_checks=False keeps each step's 0-d check; every DEFERRED_FOLD of them fold into one count on their
    device (a long epoch keeps O(1) tensors, none read), and ``check_deferred`` reads that count once."""
    import lightning_reweight.callbacks.base as base

    cb = Proposes(None, sync_checks=False)
    bad_steps = {5, 300, 301, 999}
    for step in range(1000):
        cb.defer_check(torch.tensor(step not in bad_steps))
        assert len(cb._deferred) < base.DEFERRED_FOLD
    with pytest.raises(ValueError, match=r"^4 training step\(s\)"):
        cb.check_deferred()
    cb.check_deferred()  # reported once, then clean
    assert cb._deferred == [] and cb._deferred_bad is None

    # on a device (meta: any read raises) folding reads nothing; check_deferred reads one value
    reads = []
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t.device.type) or 0)
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (_ for _ in ()).throw(AssertionError("a host read")))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: (_ for _ in ()).throw(AssertionError("a copy")))
    for _ in range(2 * base.DEFERRED_FOLD + 3):
        cb.defer_check(torch.ones((), dtype=torch.bool, device="meta"))
    assert reads == [] and len(cb._deferred) == 3 and cb._deferred_bad.device.type == "meta"
    cb.check_deferred()
    assert reads == ["meta"]
