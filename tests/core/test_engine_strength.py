"""The step engine, function by function: every refusal (type and a message naming the fix), the three check
modes (host, one read per phase on a device, deferred) on CPU tensors, the combine and the local loss.

Written against survivors of ``scripts/mutate.py engine.py``. Fake callbacks are plain namespaces with the
attributes the engine reads.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_reweight import LossReweighting, Reweighter
from lightning_reweight import engine as E

DEVICE = torch.device("cuda")  # a descriptor only: selects the device check modes, the tensors stay on the CPU


def _cb(name="Fake", normalized=True, **kw):
    cls = type(name, (), {})
    cb = cls()
    defaults = dict(normalized=normalized, needs_index=True, needs_sample_state=True, device_ready=True, device="auto",
                    last_weights=None, committed=[], table=None)
    for k, v in {**defaults, **kw}.items():
        setattr(cb, k, v)
    return cb


def _batch(losses, index=None, sizes=None, **kw):
    losses = torch.as_tensor(losses, dtype=torch.float32)
    index = torch.arange(losses.numel()) if index is None else torch.as_tensor(index)
    return E.GlobalBatch(losses, index, sizes=sizes or [losses.numel()], **kw)


# ------------------------------------------------------------------------------------------------ 1. inputs
def test_check_per_sample_refusals():
    with pytest.raises(TypeError, match=r"`losses` to be a torch.Tensor, but got list"):
        E.check_per_sample([1.0, 2.0])
    with pytest.raises(ValueError, match=r"(?s)got a scalar: .*reduction='none'.*reduce_loss\(self, losses, batch_index\)"):
        E.check_per_sample(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)\. .*losses.flatten\(1\).mean\(1\)"):
        E.check_per_sample(torch.ones(2, 3))
    t = torch.ones(2)
    assert E.check_per_sample(t) is t


def test_check_inputs_refusals():
    cbs = [_cb()]
    good = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"`losses` to be a torch.Tensor, but got str"):
        E.check_inputs(cbs, "loss", None, None, None, {})
    with pytest.raises(TypeError, match=r"floating tensor, but got dtype torch.int64"):
        E.check_inputs(cbs, torch.ones(3, dtype=torch.int64), torch.arange(3), None, None, {})
    with pytest.raises(ValueError, match=r"carry gradient .*torch.no_grad\(\)"):
        E.check_inputs(cbs, torch.ones(3), torch.arange(3), None, None, {})
    with pytest.raises(ValueError, match=r"`index` to be 1-D with one dataset index per sample, shape \(3,\), but got "
                                         r"shape \(3, 1\)\. .*IndexedDataset"):
        E.check_inputs(cbs, good, torch.zeros(3, 1, dtype=torch.long), None, None, {})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        E.check_inputs(cbs, good, [0, 1], None, None, {})
    with pytest.raises(TypeError, match=r"`index` to hold an integer dataset index.*, but got dtype torch.float32.*\.long\(\)"):
        E.check_inputs(cbs, good, torch.zeros(3), None, None, {})
    for bad in (torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"`group` to hold an integer group id per sample"):
            E.check_inputs(cbs, good, torch.arange(3), bad, None, {})
    with pytest.raises(ValueError, match=r"`target` to have one row per sample \(3\), but got shape \(2,\)"):
        E.check_inputs(cbs, good, torch.arange(3), None, torch.zeros(2), {})
    with pytest.raises(ValueError, match=r"`target` to have one row per sample \(3\), but got shape \(\)"):
        E.check_inputs(cbs, good, torch.arange(3), None, 5, {})
    with pytest.raises(ValueError, match=r"`mask` to have one row per sample"):
        E.check_inputs(cbs, good, torch.arange(3), None, None, {"mask": torch.ones(4)})


def test_check_inputs_returns_the_named_rows():
    losses = torch.ones(3, requires_grad=True)
    named, keyed = E.check_inputs([_cb()], losses, [2, 0, 1], [0, 1, 1], torch.zeros(3, 2), {"m": [1, 2, 3]})
    assert keyed and list(named) == ["losses", "index", "group", "target", "extra:m"]
    assert not named["losses"].requires_grad
    assert named["index"].dtype == torch.int64 and named["index"].tolist() == [2, 0, 1]
    assert named["group"].dtype == torch.int64 and named["extra:m"].tolist() == [1, 2, 3]


def test_index_free_path_names_the_callbacks_and_the_fix():
    losses = torch.ones(2, requires_grad=True)
    stateless = _cb("Tracker", needs_sample_state=False)
    with pytest.raises(E.MissingIndexError, match=r"(?s)^Fake, Tracker needs the dataset index.*IndexedDataset.*StreamKeys"
                                                  r".* Tracker only keeps .*track_samples=False") as err:
        E.check_inputs([_cb(), stateless], losses, None, None, None, {})
    assert isinstance(err.value, ValueError)
    with pytest.raises(E.MissingIndexError) as err:
        E.check_inputs([_cb()], losses, None, None, None, {})
    assert "track_samples" not in str(err.value)
    named, keyed = E.check_inputs([_cb(needs_index=False)], losses, None, None, None, {})
    assert not keyed and named["index"].tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------ 2. the batch
def test_batch_device():
    cpu = torch.ones(2)
    assert E._batch_device(cpu, [_cb(device_ready=False)]).type == "cpu"
    meta = torch.empty(2, device="meta")
    assert E._batch_device(meta, [_cb()]).type == "meta"
    assert E._batch_device(meta, [_cb(device=torch.device("meta"))]).type == "meta"
    assert E._batch_device(meta, [_cb(), _cb(device_ready=False)]).type == "cpu"
    assert E._batch_device(meta, [_cb(device=torch.device("cpu"))]).type == "cpu"


def test_exchange_refusal_and_gather_in_one_process():
    assert E.exchange_refusal(3, None, 0) == [3]
    err = ValueError("mine")
    with pytest.raises(ValueError, match="mine"):
        E.exchange_refusal(0, err, 0)
    named = {"losses": torch.tensor([1.0, 2.0], dtype=torch.float64), "index": torch.tensor([4, 5]),
             "group": torch.tensor([0, 1]), "extra:m": torch.tensor([7, 8])}
    b = E.gather_batch(named, [2], torch.device("cpu"), 0, 9)
    assert b.losses.dtype == torch.float32 and b.index.tolist() == [4, 5] and b.group.tolist() == [0, 1]
    assert b.target is None and b.extras == {"m": b.extras["m"]} and b.extras["m"].tolist() == [7, 8]
    assert b.global_step == 9 and b.world_size == 1 and len(b) == 2 and b.local == slice(0, 2)


def test_global_batch_world_size_defaults_to_one():
    assert E.GlobalBatch(torch.ones(2), torch.arange(2)).world_size == 1
    assert _batch([1.0] * 4, sizes=[1, 3]).world_size == 2


# ------------------------------------------------------------------------------------------------ checks
def _raiser(msg="bad"):
    def fail():
        raise ValueError(msg)
    return fail


def test_checks_host_mode_raises_at_once():
    c = E.Checks(torch.device("cpu"), sync=True)
    assert c.host and c.sync
    c.require(True, _raiser())
    with pytest.raises(ValueError, match="bad"):
        c.require(False, _raiser())


def test_checks_device_sync_mode_reads_once_per_phase():
    c = E.Checks(DEVICE, sync=True)
    assert not c.host
    c.require(torch.tensor(True), _raiser("first"))
    c.require(torch.tensor(False), _raiser("second"))
    c.require(torch.tensor(False), _raiser("third"))
    assert len(c._pending) == 3
    with pytest.raises(ValueError, match="second"):
        c.flush()
    assert c._pending == []
    c.flush()  # nothing pending
    c.require(torch.tensor(True), _raiser())
    c.flush()


def test_checks_deferred_mode_keeps_them():
    for device in (torch.device("cpu"), DEVICE):
        c = E.Checks(device, sync=False)
        assert not c.host
        c.require(torch.tensor(False), _raiser())
        c.require(torch.tensor([True]), _raiser())
        c.flush()  # deferred checks are never raised here
        assert [(v.shape, low, high) for v, low, high in c.deferred] == [((), 1, 1), ((), 1, 1)]
        assert int(E.DeferredChecks.count_bad([c.deferred_values()])) == 1  # one step, it failed


def test_host_reads_device_mode_stack():
    assert E._host([torch.tensor(1.5), torch.tensor(2)]) == [1.5, 2]


def test_fail_messages():
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        E._fail_losses(torch.tensor([0.0, float("nan")]), "")()
    with pytest.raises(ValueError, match=r"finite transformed per-sample losses on every rank, but another rank"):
        E._fail_losses(torch.tensor([0.0]), "transformed ")()
    with pytest.raises(IndexError, match=r"\[0, 5\) .*got range \[-1, 7\]; nothing was updated.*num_samples=keys"):
        E._fail_range(5, torch.tensor(-1), torch.tensor(7))()
    with pytest.raises(ValueError, match=r"3 key\(s\) .*world size 2.*allow_repeated_keys=True"):
        E._fail_repeats(_batch([1.0] * 4, sizes=[2, 2]), torch.tensor(3))()


def test_cross_rank_repeats():
    index = torch.tensor([3, 1, 3, 2, 1, 1])
    assert E.cross_rank_repeats(index, torch.tensor([0, 0, 1, 1, 1, 1])).item() == 2  # 3 and 1 span ranks
    assert E.cross_rank_repeats(index, torch.zeros(6, dtype=torch.long)).item() == 0  # one rank
    assert E.cross_rank_repeats(torch.tensor([1, 2]), torch.tensor([0, 1])).item() == 0


@pytest.mark.parametrize("device", [torch.device("cpu"), DEVICE])
def test_check_batch(device):
    ctx = SimpleNamespace()
    seen = []
    cb = _cb(validate_batch=lambda b, c: seen.append(len(b)))
    batch = _batch([1.0, 2.0], index=[0, 4])
    E.check_batch([cb], batch, batch.losses, E.Checks(device, True), 5, ctx)  # N - 1 is in range
    assert seen == [2]
    with pytest.raises(IndexError, match=r"\[0, 4\) .*range \[0, 4\]"):
        E.check_batch([cb], batch, batch.losses, E.Checks(device, True), 4, ctx)
    with pytest.raises(IndexError, match=r"range \[-1, 0\]"):
        E.check_batch([cb], _batch([1.0, 1.0], index=[-1, 0]), batch.losses, E.Checks(device, True), 4, ctx)
    bad = _batch([1.0, float("inf")])
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        E.check_batch([cb], bad, bad.losses, E.Checks(device, True), None, ctx)
    assert seen == [2]  # no callback saw a refused batch
    # keys on two ranks: up to world size - 1 repeats pass (DistributedSampler padding), more are refused
    padded = _batch([1.0] * 4, index=[0, 1, 0, 2], sizes=[2, 2], extras={E._RANK: torch.tensor([0, 0, 1, 1])})
    E.check_batch([cb], padded, padded.losses, E.Checks(device, True), None, ctx)
    assert E._RANK not in padded.extras
    twice = _batch([1.0] * 4, index=[0, 1, 0, 1], sizes=[2, 2], extras={E._RANK: torch.tensor([0, 0, 1, 1])})
    with pytest.raises(ValueError, match=r"2 key\(s\) of this step appear on two ranks"):
        E.check_batch([cb], twice, twice.losses, E.Checks(device, True), None, ctx)


def test_check_batch_host_mode_overflowing_sum_is_finite():
    batch = _batch([3e38, 3e38])
    E.check_batch([_cb(validate_batch=lambda b, c: None)], batch, batch.losses,
                  E.Checks(torch.device("cpu"), True), None, None)


# ------------------------------------------------------------------------------------------------ 4-5. propose, combine
def test_propose_weights_converts_and_checks_the_length():
    w64 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    cbs = [_cb(compute_weights=lambda b, c, m: w64), _cb(compute_weights=lambda b, c, m: None)]
    (first, w), (_, none) = E.propose_weights(cbs, _batch([1.0, 1.0]), None, None)
    assert w.dtype == torch.float32 and not w.requires_grad and w.tolist() == [1.0, 2.0] and none is None
    as_column = torch.tensor([[1.0], [2.0]])
    assert E.propose_weights([_cb(compute_weights=lambda b, c, m: as_column)], _batch([1.0, 1.0]), None, None)[0][1].shape == (2,)
    short = _cb("Short", compute_weights=lambda b, c, m: torch.ones(3))
    with pytest.raises(ValueError, match=r"Short to return one weight per sample of the global batch \(2\), but got 3"):
        E.propose_weights([short], _batch([1.0, 1.0]), None, None)


def test_propose_losses_regathers_transformed_losses():
    batch = _batch([1.0, 2.0])
    local = torch.tensor([1.0, 2.0])
    cb = _cb(transform_losses=lambda loss, x, b, c, m: loss * 2)
    out = E.propose_losses([cb], local, {}, batch, E.Checks(torch.device("cpu"), True), None, None)
    assert out.tolist() == [2.0, 4.0] and batch.losses.tolist() == [2.0, 4.0]
    same = _cb(transform_losses=lambda loss, x, b, c, m: None)
    assert E.propose_losses([same], local, {}, batch, E.Checks(torch.device("cpu"), True), None, None) is local
    nan = _cb(transform_losses=lambda loss, x, b, c, m: loss * float("nan"))
    for device in (torch.device("cpu"), DEVICE):
        with pytest.raises(ValueError, match=r"positions \[0, 1\]"):
            E.propose_losses([nan], local, {}, _batch([1.0, 2.0]), E.Checks(device, True), None, None)
    with pytest.raises(ValueError, match=r"got a scalar"):
        E.propose_losses([_cb(transform_losses=lambda loss, x, b, c, m: loss.sum())], local, {}, batch,
                         E.Checks(torch.device("cpu"), True), None, None)


@pytest.mark.parametrize("device", [torch.device("cpu"), DEVICE])
def test_combine_normalised_and_raw_factors(device):
    batch = _batch([1.0] * 4)
    a, b = _cb(), _cb()
    raw = _cb(normalized=False)
    w = E.combine([(a, torch.tensor([1.0, 1.0, 2.0, 4.0])), (b, torch.tensor([2.0, 2.0, 2.0, 2.0]))], batch,
                  E.Checks(device, True))
    assert w.tolist() == pytest.approx([0.5, 0.5, 1.0, 2.0])  # product renormalised to mean 1
    w = E.combine([(a, torch.tensor([1.0, 1.0, 2.0, 4.0])), (raw, torch.full((4,), 0.5)), (b, None)], batch,
                  E.Checks(device, True))
    assert w.tolist() == pytest.approx([0.25, 0.25, 0.5, 1.0])  # the raw factor keeps its scale
    w = E.combine([(raw, torch.full((4,), 0.5))], batch, E.Checks(device, True))
    assert w.tolist() == [0.5] * 4
    ones = E.combine([(a, None)], batch, E.Checks(device, True))
    assert ones.tolist() == [1.0] * 4 and ones.dtype == torch.float32


@pytest.mark.parametrize("device", [torch.device("cpu"), DEVICE])
def test_combine_refusals(device):
    batch = _batch([1.0] * 2)
    bad = _cb("Negative")
    for w in (torch.tensor([1.0, -0.5]), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0])):
        with pytest.raises(ValueError, match=r"non-negative, finite weights from Negative, .*no callback state"):
            E.combine([(bad, w)], batch, E.Checks(device, True))
    with pytest.raises(ValueError, match=r"All per-sample weights of this batch are zero.*filter"):
        E.combine([(_cb(), torch.zeros(2))], batch, E.Checks(device, True))
    with pytest.raises(ValueError, match=r"All per-sample weights"):
        E.combine([(_cb(normalized=False), torch.zeros(2))], batch, E.Checks(device, True))
    big = torch.tensor([3e38, 3e38])
    with pytest.raises(ValueError, match=r"product of the callbacks' weights overflowed.*max_weight="):
        E.combine([(_cb(normalized=False), big), (_cb(normalized=False), big)], batch, E.Checks(device, True))
    # zero weights are fine as long as one is positive
    assert E.combine([(_cb(), torch.tensor([0.0, 3.0]))], batch, E.Checks(device, True)).tolist() == [0.0, 2.0]


def test_combine_deferred_mode_keeps_every_check():
    checks = E.Checks(torch.device("cpu"), sync=False)
    E.combine([(_cb(), torch.tensor([1.0, -1.0]))], _batch([1.0, 1.0]), checks)
    assert int(E.DeferredChecks.count_bad([checks.deferred_values()])) == 1


# ------------------------------------------------------------------------------------------------ 6-7. commit, loss
def test_commit_names_what_had_committed():
    order = []
    ok = _cb("First", on_weights_computed=lambda b, w, c, m: order.append("First"))
    broken = _cb("Broken", on_weights_computed=lambda b, w, c, m: 1 / 0)
    w = torch.ones(2)
    E.commit([ok], [(ok, w)], _batch([1.0, 1.0]), w, None, None)
    assert order == ["First"] and ok.last_weights is w
    with pytest.raises(RuntimeError, match=r"Broken.on_weights_computed failed .*committed this step: First\. "
                                           r".*resume from the last checkpoint") as err:
        E.commit([ok, broken], [(ok, w), (broken, None)], _batch([1.0, 1.0]), w, None, None)
    assert isinstance(err.value.__cause__, ZeroDivisionError) and broken.last_weights is None
    with pytest.raises(RuntimeError, match=r"committed this step: none\."):
        E.commit([broken], [], _batch([1.0, 1.0]), w, None, None)


def test_local_loss_one_process_and_ranks():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([0.5, 1.0, 1.5, 1.0])
    one = E.local_loss(w, _batch(losses.tolist()), losses)
    assert one.item() == pytest.approx((w * losses).mean().item())
    # rank 1 of two with sizes [1, 3]: W / B · Σ_local w·ℓ = 2 / 4 · (1·2 + 1.5·3 + 1·4)
    two = E.local_loss(w, _batch([0.0] * 4, sizes=[1, 3], local=slice(1, 4)), losses[1:])
    assert two.item() == pytest.approx(0.5 * (2 + 4.5 + 4))
    half = E.local_loss(w, _batch(losses.tolist()), losses.half())
    assert half.dtype == torch.float16 and half.item() == pytest.approx(one.item(), rel=1e-3)
    f64 = E.local_loss(w, _batch(losses.tolist()), losses.double())
    assert f64.dtype == torch.float64 and f64.item() == pytest.approx(one.item())


# ------------------------------------------------------------------------------------------------ run_step
def _reweighter(**kw):
    cb = LossReweighting("linupper", warmup_steps=0, num_samples=8, **kw)
    return Reweighter([cb], model=torch.nn.Linear(1, 1)), cb


def test_run_step_empty_batch_and_range():
    rw, _ = _reweighter()
    with pytest.raises(ValueError, match=r"at least one sample .*got 0 .*LossReweighting.*return None"):
        rw.reduce(torch.ones(0, requires_grad=True), torch.zeros(0, dtype=torch.long))
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        rw.reduce(torch.ones(2, requires_grad=True), torch.tensor([1, 8]))


def test_sync_checks_false_on_the_cpu_defers_and_reads_later():
    """A valid step with ``sync_checks=False`` defers its checks; reading them passes. A bad step is kept (its
    state changes too) and reported by ``check_deferred``."""
    rw, cb = _reweighter(sync_checks=False)
    losses = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    loss = rw.reduce(losses, torch.tensor([0, 1, 2]))
    assert loss.requires_grad and math.isfinite(loss.item())
    assert cb._deferred or cb._deferred_bad is not None
    rw.check_deferred()
    assert cb.table["count"][:3].tolist() == [1, 1, 1]
    sync_rw, sync_cb = _reweighter()
    sync_loss = sync_rw.reduce(losses, torch.tensor([0, 1, 2]))
    assert sync_loss.item() == pytest.approx(loss.item())


def test_global_batch_defaults():
    b = E.GlobalBatch(torch.ones(2), torch.arange(2))
    assert b.global_step == 0 and b.group is None and b.target is None and b.extras == {}
    assert b.local == slice(None) and b.sizes == []


@pytest.mark.parametrize("device", [torch.device("cpu"), DEVICE])
def test_combine_accepts_a_small_positive_total(device):
    w = E.combine([(_cb(normalized=False), torch.tensor([0.25, 0.25]))], _batch([1.0, 1.0]), E.Checks(device, True))
    assert w.tolist() == [0.25, 0.25]
    w = E.combine([(_cb(), torch.tensor([0.0, 1e-30]))], _batch([1.0, 1.0]), E.Checks(device, True))
    assert w.tolist() == pytest.approx([0.0, 2.0])
