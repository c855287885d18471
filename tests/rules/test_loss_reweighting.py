"""LossReweighting: per-rule arguments and warm-up, KL-DRO's EMA normaliser (log space, outliers, clipping,
ESS warning), atomic steps and validated checkpoint state."""

import math

import pytest
import torch

from lightning_reweight.callbacks import LossReweighting
from lightning_reweight.callbacks.base import GlobalBatch
from lightning_reweight.rules import KLDRORule, UniformRule, create_rule, minmax_normalize
from lightning_reweight.state.validate import CheckpointStateError
from tests.callbacks.fairness_helpers import GroupedModule, RejectAt, make_grouped_loader, make_trainer


def _step(cb, losses, step=0):
    """One reduce_loss-like step by hand: propose, then commit with the callback's own weights."""
    batch = GlobalBatch(losses=torch.as_tensor(losses, dtype=torch.float32), index=torch.arange(len(losses)),
                        global_step=step)
    w = cb.compute_weights(batch, None, None)
    cb.on_weights_computed(batch, w, None, None)
    return w


# ------------------------------------------------------------------ arguments and warm-up per rule
def test_rule_specific_arguments_default_to_the_rule_and_leftovers_warn():
    with pytest.warns(UserWarning, match=r"ignores r=0.4"):
        cb = LossReweighting("uniform", r=0.4)
    assert isinstance(cb.rule, UniformRule)
    with pytest.warns(UserWarning, match=r"ignores delta=1.0"):  # a recipe's delta after switching to kl_dro
        cb = LossReweighting("kl_dro", delta=1.0, r=2.0)
    assert isinstance(cb.rule, KLDRORule) and cb.rule.r == 2.0
    assert LossReweighting("kl_dro").rule.r == 1.0 and LossReweighting("linupper").rule.r == 0.4


@pytest.mark.parametrize(("rule", "kwargs", "name"), [("kl_dro", {"delta": 2.0}, "delta"),
                                                      ("linupper", {"normalizer": "ema"}, "normalizer"),
                                                      ("uniform", {"r": 3.0}, "r")])
def test_a_non_default_argument_the_rule_cannot_take_is_an_error(rule, kwargs, name):
    with pytest.raises(ValueError, match=rf"Expected no `{name}` for rule '{rule}'.*belongs to rule"):
        LossReweighting(rule, **kwargs)
    with pytest.raises(TypeError, match=rf"takes no argument \['{name}'\]"):
        create_rule(rule, **kwargs)
    with pytest.raises(ValueError, match="on the `Rule` object"):
        LossReweighting(KLDRORule(), r=2.0)


def test_warmup_defaults_per_rule():
    assert LossReweighting("linupper").warmup_steps == 1000
    assert LossReweighting("quadratic").warmup_steps == 1000
    assert LossReweighting("kl_dro").warmup_steps == 0  # DONE has no warm-up
    assert LossReweighting("uniform").warmup_steps == 0
    assert LossReweighting("kl_dro", warmup_steps=7).warmup_steps == 7
    with pytest.raises(ValueError, match="warmup_steps"):
        LossReweighting("kl_dro", warmup_steps=-1)


# ------------------------------------------------------------------ numerics
def test_huge_finite_losses_do_not_overflow_the_min_max_normalisation():
    losses = torch.tensor([0.0, 3e38, 1.5e38, -3e38])
    x = minmax_normalize(losses)
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0, 0.5, -1.0]))
    torch.testing.assert_close(minmax_normalize(torch.full((3,), 3e38)), torch.zeros(3))  # all equal: 0, not NaN
    for name in ("linupper", "quadratic", "extremes", "kl_dro"):
        w = create_rule(name)(losses)
        assert bool(torch.isfinite(w).all()) and float(w.mean()) == pytest.approx(1.0, abs=1e-5)


def test_max_weight_clips_without_cancelling_the_ema_normaliser():
    cb = LossReweighting("kl_dro", normalizer="ema", max_weight=1.5, track_samples=False)
    w1 = _step(cb, [0.0, 1.0, 2.0])
    z1 = (1 + math.e + math.e**2) / 3
    torch.testing.assert_close(w1, torch.tensor([1 / z1, math.e / z1, 1.5]))  # e²/Z = 2.0 clipped, not renormalised
    w2 = _step(cb, [1.0, 1.0, 1.0], step=1)
    expected = math.e / (0.9 * z1 + 0.1 * math.e)  # 0.754: the EMA normaliser, not mean 1
    assert expected == pytest.approx(0.754, abs=1e-3)
    torch.testing.assert_close(w2, torch.full((3,), expected))


@pytest.mark.parametrize("outlier", [80.0, 200.0])
def test_one_outlier_does_not_silence_later_steps(outlier):
    g = torch.Generator().manual_seed(0)
    rule = KLDRORule(normalizer="ema")
    for _ in range(10):
        rule(torch.rand(64, generator=g))
    spike = torch.rand(64, generator=g)
    spike[0] += outlier
    w = rule(spike)
    # the outlier's tilt is capped at 1000 × the previous normaliser (its weight is relative to the new one)
    assert bool(torch.isfinite(w).all()) and 100 < float(w[0]) <= 1e3
    after = [float(rule(torch.rand(64, generator=g)).mean()) for _ in range(30)]
    assert min(after) > 0.05 and after[-1] > 0.9
    # DONE's uncapped normaliser (outlier_cap=None): every later weight ~e^-70 (or exactly 0) for ~750 steps
    raw = KLDRORule(normalizer="ema", outlier_cap=None)
    raw(torch.rand(64, generator=g))
    raw(spike)
    assert float(raw(torch.rand(64, generator=g)).mean()) < 1e-20


def test_ess_collapse_warns_once_and_is_counted():
    cb = LossReweighting("kl_dro", normalizer="ema", track_samples=False)
    _step(cb, torch.rand(32))
    spike = torch.rand(32)
    spike[0] = 60.0
    with pytest.warns(UserWarning, match="effective sample size fell"):
        _step(cb, spike, step=1)
    assert cb.ess_collapsed_steps == 1 and cb.log_extras()["ess_collapsed_steps"] == 1.0
    assert "log_normalizer" in cb.log_extras()
    _step(cb, torch.rand(32), step=2)
    assert cb.ess_collapsed_steps == 1


# ------------------------------------------------------------------ lifecycle
def test_rejected_step_leaves_the_normaliser_unchanged(tmp_path):
    cb = LossReweighting("kl_dro", normalizer="ema", track_samples=False)
    module = GroupedModule(lr=0.0)
    with pytest.raises(ValueError, match="negative or non-finite weights"):
        make_trainer([cb, RejectAt(step=2)], tmp_path).fit(module, make_grouped_loader(n=32, batch_size=8))
    replay = KLDRORule(normalizer="ema")
    for _, _, losses, _ in module.records:
        replay(losses)
    assert len(module.records) == 2
    assert cb.rule.log_normalizer == pytest.approx(replay.log_normalizer, rel=1e-12)


def test_propose_is_pure_and_commit_applies():
    rule = KLDRORule(normalizer="ema")
    rule(torch.tensor([0.0, 1.0]))
    before = rule.log_normalizer
    w, pending = rule.propose(torch.tensor([5.0, 6.0]))
    assert rule.log_normalizer == before
    rule.commit(pending)
    assert rule.log_normalizer == pending != before


@pytest.mark.parametrize(("extra", "key"), [({"rule": {"log_z": float("nan")}}, "log_z"),
                                             ({"rule": {"log_z": "big"}}, "log_z"),
                                             ({"rule": {"log_z": 0.1}, "ess_collapsed_steps": -1},
                                              "ess_collapsed_steps"),
                                             ({"rule": [1.0]}, None)])
def test_bad_checkpoint_state_is_refused_before_anything_is_assigned(extra, key):
    cb = LossReweighting("kl_dro", normalizer="ema", num_samples=4)
    _step(cb, [0.0, 1.0, 2.0])
    table = {"num_samples": 4, "columns": {}, "specs": {}}
    before = cb.rule.log_normalizer
    with pytest.raises(CheckpointStateError) as err:
        cb.load_state_dict({"table": table, "extra": extra})
    assert err.value.key == key
    assert cb.rule.log_normalizer == before and cb._pending_table_state is None
    ok = LossReweighting("kl_dro", normalizer="ema")
    ok.load_state_dict({"table": None, "extra": {"rule": {"log_z": 0.5}, "ess_collapsed_steps": 2}})
    assert ok.rule.log_normalizer == 0.5 and ok.ess_collapsed_steps == 2


def test_a_rejected_proposal_is_never_committed_later():
    cb = LossReweighting("kl_dro", normalizer="ema", track_samples=False)
    rejected = GlobalBatch(losses=torch.tensor([50.0, 0.0]), index=torch.arange(2))
    cb.validate_batch(rejected, None)
    cb.compute_weights(rejected, None, None)  # ... and then a later callback's weights are rejected
    batch = GlobalBatch(losses=torch.tensor([0.0, 1.0]), index=torch.arange(2), global_step=1)
    cb.validate_batch(batch, None)
    w = cb.compute_weights(batch, None, None)
    cb.on_weights_computed(batch, w, None, None)
    replay = KLDRORule(normalizer="ema")
    replay(batch.losses)
    assert cb.rule.log_normalizer == pytest.approx(replay.log_normalizer)


def test_kl_dro_state_with_a_missing_key_is_named():
    rule = KLDRORule(normalizer="ema")
    with pytest.raises(CheckpointStateError, match="missing key") as err:
        rule.load_state_dict({"logz": 0.3})
    assert err.value.key == "log_z" and rule.log_normalizer is None
    rule.load_state_dict({"log_z": None})  # saved before the first step: starts fresh
    assert rule.log_normalizer is None


def test_kl_dro_state_without_log_z_is_refused_not_restarted():
    """A state without ``log_z`` (``{}``: written by another rule, or the ``rule`` entry missing) would restart
    the normaliser: refused, naming the key and the fix; nothing assigned."""
    rule = KLDRORule(normalizer="ema")
    rule(torch.tensor([0.0, 1.0]))
    before = rule.log_normalizer
    with pytest.raises(CheckpointStateError, match=r"KLDRORule\['log_z'\]: missing key.*setting the entry's "
                                                   r"'log_z' to None") as err:
        rule.load_state_dict({})
    assert err.value.key == "log_z" and rule.log_normalizer == before
    cb = LossReweighting("kl_dro", normalizer="ema", track_samples=False)
    _step(cb, [0.0, 1.0, 2.0])
    before = cb.rule.log_normalizer
    for extra in ({"ess_collapsed_steps": 0}, {"rule": {}, "ess_collapsed_steps": 0}):
        with pytest.raises(CheckpointStateError, match=r"\['extra'\]\['rule'\]\['log_z'\]: missing key.*'log_z' to "
                                                       "None") as err:
            cb.load_state_dict({"table": None, "extra": extra})
        assert err.value.key == "log_z" and cb.rule.log_normalizer == before


@pytest.mark.parametrize("use_numba", [True, False])
def test_cpu_ess_is_the_float64_kish_ess(monkeypatch, use_numba):
    """The CPU ESS (Σw, Σw² as host floats: one compiled call, or float64 torch) equals
    ``effective_sample_size`` (float64) and drives the collapse warning on either path."""
    from lightning_reweight.callbacks.loss_reweighting import _weight_mass
    from lightning_reweight.rules import effective_sample_size, instance

    monkeypatch.setattr(instance, "USE_NUMBA", use_numba)
    w = torch.rand(1000) * 10 ** torch.randint(-3, 3, (1000,)).float()
    total, square = _weight_mass(w)
    assert total == pytest.approx(float(w.double().sum()), rel=1e-12)
    assert square == pytest.approx(float(w.double().square().sum()), rel=1e-12)
    assert total * total / square == pytest.approx(float(effective_sample_size(w)), rel=1e-6)
    cb = LossReweighting("kl_dro", normalizer="ema", track_samples=False)
    _step(cb, torch.rand(32))
    spike = torch.rand(32)
    spike[0] = 60.0
    with pytest.warns(UserWarning, match="effective sample size fell"):
        _step(cb, spike, step=1)
    assert cb.ess_collapsed_steps == 1 and cb.last_ess < 0.1 * 32
