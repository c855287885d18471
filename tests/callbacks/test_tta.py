"""Tent / EATA callbacks: agreement with a loop-style reference, parameter scope, errors, reset policies, state
round trip, batch-size-1 behaviour and logging. Tiny synthetic model and data."""

from __future__ import annotations

import copy
import io
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.callbacks.tta import EATA, Tent
from lightning_reweight.rules.tta import softmax_entropy

from .tta_reference import TinyNet, make_data, make_model, reference_adapt, tta_mode

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BATCH = 8


def trainer(callbacks, **kw) -> pl.Trainer:
    kw.setdefault("inference_mode", False)
    kw.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


def loader(x, y, batch_size=BATCH):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def predict(model, cb, x, y, batch_size=BATCH):
    return trainer([cb]).predict(model, loader(x, y, batch_size))


def source_tta_logits(model, x):
    """Predictions of the unadapted model with batch statistics."""
    ref = copy.deepcopy(model)
    tta_mode(ref)
    with torch.no_grad():
        return ref(x)


def fisher_batches(n=16, seed=5):
    x, y = make_data(n, seed=seed)
    return x, y, [x[i:i + BATCH] for i in range(0, n, BATCH)]


def threshold(model, x):
    """An entropy threshold that keeps about half of the samples (so the filter is exercised)."""
    return float(softmax_entropy(source_tta_logits(model, x)).median())


# --------------------------------------------------------------------------- agreement with the reference
def test_tent_matches_reference_predictions_and_params():
    model = make_model()
    x, y = make_data(32)
    ref = reference_adapt(model, [[x[i:i + BATCH]] for i in range(0, 32, BATCH)], method="tent", lr=1e-2)
    cb = Tent(lr=1e-2)
    src0 = source_tta_logits(model, x[:BATCH])
    preds = predict(model, cb, x, y)
    for got, want in zip(preds, ref["preds"]):
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    for name, p in cb.adapted_state.items():
        torch.testing.assert_close(p, ref["params"][name])
    assert cb.counters["backward_passes"] == 4 and cb.counters["backward_samples"] == 32
    # the first prediction is the unadapted TTA-mode output: predictions are pre-update
    torch.testing.assert_close(preds[0], src0)


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_eata_matches_reference_filters_weights_fisher_and_m(alpha):
    model = make_model()
    x, y = make_data(48)
    fx, fy, fb = fisher_batches()
    e0 = threshold(model, x)
    steps = [[x[i:i + BATCH]] for i in range(0, 48, BATCH)]
    ref = reference_adapt(model, steps, method="eata", e0=e0, d_margin=0.4, alpha=alpha, fisher_batches=fb, lr=1e-2)
    cb = EATA(e_margin=e0, d_margin=0.4, fisher_alpha=alpha, fisher_dataloader=loader(fx, fy), lr=1e-2)
    preds = predict(model, cb, x, y)
    for got, want in zip(preds, ref["preds"]):
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    for name, p in cb.adapted_state.items():
        torch.testing.assert_close(p, ref["params"][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.moving_average, ref["m"])
    assert cb.counters["backward_passes"] == ref["backward_passes"]
    assert cb.counters["backward_samples"] == ref["selected"]
    # both filters actually did something
    assert 0 < cb.counters["reliable"] < 48
    assert 0 < cb.counters["selected"] < cb.counters["reliable"]
    if alpha:
        assert cb.fisher_num_samples == 16
        for k, v in cb.fisher.items():
            torch.testing.assert_close(v, ref["fisher"][k])


def test_eata_without_selected_samples_does_not_step():
    model = make_model()
    x, y = make_data(16)
    cb = EATA(e_margin=1e-6, fisher_alpha=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(model, cb, x, y)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert cb.counters["backward_passes"] == 0 and cb.counters["forwards"] == 2 and cb.counters["samples"] == 16


# --------------------------------------------------------------------------- scope: what changes, what is restored
@pytest.mark.parametrize("make_cb", [lambda: Tent(lr=0.05, keep_adapted=True),
                                     lambda: EATA(e_margin=10.0, fisher_alpha=0.0, lr=0.05, keep_adapted=True)])
def test_only_batchnorm_affine_parameters_change_and_modes_are_restored(make_cb):
    model = make_model()
    model.train()
    x, y = make_data(24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {k: p.requires_grad for k, p in model.named_parameters()}
    result = trainer([make_cb()]).test(model, loader(x, y), verbose=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"net.1.weight", "net.1.bias", "net.6.weight", "net.6.bias"}  # γ, β of both BN layers
    # running statistics untouched (neither used nor updated), everything restored
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.track_running_stats and m.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads_before
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert "acc" in result[0]


def test_steps_zero_is_batch_norm_adaptation_without_updates():
    model = make_model()
    x, y = make_data(16)
    cb = Tent(steps=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    preds = predict(model, cb, x, y)
    torch.testing.assert_close(torch.cat(preds), torch.cat([source_tta_logits(model, x[:8]), source_tta_logits(model, x[8:])]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cb.counters["backward_passes"] == 0 and cb.counters["samples"] == 16


# --------------------------------------------------------------------------- errors
def test_inference_mode_true_raises_with_the_fix():
    model = make_model()
    x, y = make_data(16)
    for stage in ("test", "predict"):
        tr = trainer([Tent()], inference_mode=True)
        with pytest.raises(RuntimeError, match=r"Trainer\(inference_mode=False"):
            getattr(tr, stage)(model, loader(x, y))


def test_batch_size_one_errors_or_skips_with_source_statistics():
    model = make_model()
    x, y = make_data(9)  # batches of 8 and 1
    with pytest.raises(ValueError, match="min_batch_size=2.*small_batch='skip'"):
        predict(model, Tent(), x, y)
    model = make_model()
    cb = Tent(small_batch="skip", reset="continual", keep_adapted=True)
    preds = predict(model, cb, x, y)
    assert cb.counters["skipped_batches"] == 1 and cb.counters["backward_passes"] == 1
    # the single sample is predicted with the running statistics and the current (adapted) γ/β
    with torch.no_grad():
        was = model.training
        model.eval()
        expected = model(x[8:])
        model.train(was)
    torch.testing.assert_close(preds[1], expected)


def test_module_name_and_missing_forward():
    x, y = make_data(16)
    model = make_model(call_net_directly=True)  # test_step bypasses self(x)
    with pytest.raises(RuntimeError, match="saw no forward call"):
        trainer([Tent()]).test(model, loader(x, y), verbose=False)
    cb = Tent(module_name="net")
    trainer([cb]).test(model, loader(x, y), verbose=False)
    assert cb.counters["backward_passes"] == 2 and set(cb.adapted_parameters) == {"1.weight", "1.bias", "6.weight", "6.bias"}
    with pytest.raises(ValueError, match="top-level children: \\['net'\\]"):
        trainer([Tent(module_name="backbone")]).test(model, loader(x, y), verbose=False)


def test_model_without_batchnorm_raises():
    class NoBN(TinyNet):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(108, 4))

    x, y = make_data(16)
    with pytest.raises(ValueError, match="has none"):
        trainer([Tent()]).test(NoBN(), loader(x, y), verbose=False)


def test_eata_needs_clean_data_for_the_fisher():
    x, y = make_data(16)
    with pytest.raises(RuntimeError, match="fisher_dataloader=.*fisher_alpha=0"):
        trainer([EATA(fisher_alpha=1.0)]).test(make_model(), loader(x, y), verbose=False)
    trainer([EATA(fisher_alpha=0.0)]).test(make_model(), loader(x, y), verbose=False)

    class DM(pl.LightningDataModule):
        def val_dataloader(self):
            return loader(*make_data(16, seed=9))

        def test_dataloader(self):
            return loader(x, y)

    cb = EATA(fisher_alpha=1.0, fisher_samples=10)
    trainer([cb]).test(make_model(), datamodule=DM(), verbose=False)
    assert cb.fisher_num_samples == 16 and set(cb.fisher) == set(cb.adapted_parameters)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"reset": "sometimes"}, "reset"), ({"optimizer": "lbfgs"}, "optimizer"), ({"lr": -1.0}, "lr"),
    ({"steps": -1}, "steps"), ({"small_batch": "drop"}, "small_batch"), ({"min_batch_size": 0}, "min_batch_size"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        Tent(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"d_margin": 0.0}, "d_margin"), ({"fisher_alpha": -1.0}, "fisher_alpha"), ({"e_margin": -0.1}, "e_margin"),
    ({"fisher_source": "test"}, "fisher_source"), ({"momentum_m": 0.0}, "momentum_m"),
])
def test_invalid_eata_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        EATA(**kwargs)


# --------------------------------------------------------------------------- reset policies
def test_reset_policies():
    model = make_model()
    x, y = make_data(24)
    source = [source_tta_logits(model, x[i:i + BATCH]) for i in range(0, 24, BATCH)]
    # episodic: every batch is predicted by the source parameters
    m1 = copy.deepcopy(model)
    preds = predict(m1, Tent(lr=0.05, reset="episodic"), x, y)
    for got, want in zip(preds, source):
        torch.testing.assert_close(got, want)
    # continual vs per_shift over two dataloaders (two shifts)
    loaders = [loader(x[:16], y[:16]), loader(x[16:], y[16:])]
    m2, m3 = copy.deepcopy(model), copy.deepcopy(model)
    per_shift = trainer([Tent(lr=0.05, reset="per_shift")]).predict(m2, loaders)
    continual = trainer([Tent(lr=0.05, reset="continual")]).predict(m3, loaders)
    torch.testing.assert_close(per_shift[1][0], source[2])  # the second shift starts from the source model
    assert not torch.allclose(continual[1][0], source[2])
    torch.testing.assert_close(per_shift[0][1], continual[0][1])  # same within the first shift
    # per_shift also resets between runs; continual carries over
    cb, m4 = Tent(lr=0.05, reset="per_shift"), copy.deepcopy(model)
    trainer([cb]).predict(m4, loader(x[:16], y[:16]))
    again = trainer([cb]).predict(m4, loader(x[16:], y[16:]))
    torch.testing.assert_close(again[0], source[2])
    assert cb.counters["resets"] >= 1


# --------------------------------------------------------------------------- state round trip
@pytest.mark.parametrize("method", ["eata", "tent"])
def test_state_dict_resume_equals_uninterrupted(method):
    model = make_model()
    x, y = make_data(48)
    fx, fy, _ = fisher_batches()
    e0 = threshold(model, x)

    def make(**kw):
        if method == "tent":
            return Tent(lr=1e-2, reset="continual")
        return EATA(e_margin=e0, fisher_alpha=2.0, lr=1e-2, reset="continual", **kw)

    full_model, full_cb = copy.deepcopy(model), make(fisher_dataloader=loader(fx, fy))
    full = predict(full_model, full_cb, x, y)

    first_model, first_cb = copy.deepcopy(model), make(fisher_dataloader=loader(fx, fy))
    predict(first_model, first_cb, x[:24], y[:24])
    buf = io.BytesIO()
    torch.save(first_cb.state_dict(), buf)
    buf.seek(0)
    # a fresh process: source weights, a new callback without clean data (the Fisher must come from the state)
    resumed_model, resumed_cb = copy.deepcopy(model), make()
    resumed_cb.load_state_dict(torch.load(buf, weights_only=False))
    resumed = predict(resumed_model, resumed_cb, x[24:], y[24:])

    for got, want in zip(resumed, full[3:]):
        torch.testing.assert_close(got, want)
    for k, v in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v)
    full_state, resumed_state = full_cb.state_dict(), resumed_cb.state_dict()
    for k in ("backward_passes", "backward_samples", "samples", "selected"):
        assert resumed_state["counters"][k] == full_state["counters"][k]
    torch.testing.assert_close(resumed_state["optimizer"]["state"], full_state["optimizer"]["state"])
    for key in ("source", "adapted"):
        torch.testing.assert_close(resumed_state[key], full_state[key])
    if method == "eata":
        torch.testing.assert_close(resumed_cb.moving_average, full_cb.moving_average)
        torch.testing.assert_close(resumed_state["extra"]["fisher"], full_state["extra"]["fisher"])
    # the state also survives a second save/load before any run (pending state is returned as-is)
    again = make()
    again.load_state_dict(resumed_state)
    assert again.state_dict()["counters"] == resumed_state["counters"]


# --------------------------------------------------------------------------- logging
def test_logs_filter_shares_backwards_weights_and_entropy_histograms(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model()
    x, y = make_data(32)
    cb = EATA(e_margin=threshold(model, x), fisher_alpha=0.0, log_every_n_batches=1)
    logger = TensorBoardLogger(tmp_path, name="tta")
    result = trainer([cb], logger=logger).test(model, loader(x, y), verbose=False)
    assert result[0]["eata/kept_frac"] == pytest.approx(cb.counters["selected"] / 32)
    assert result[0]["eata/backward_samples_run"] == cb.counters["backward_samples"]
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("kept", "kept_reliable", "kept_non_redundant", "weight_mean", "entropy_mean", "backward_passes",
                "backward_samples"):
        assert f"eata/{tag}" in scalars, scalars
    assert len(acc.Scalars("eata/kept")) == 4
    assert {"eata/entropy", "eata/weights"} <= set(acc.Tags()["histograms"])
    assert acc.Scalars("eata/backward_samples")[-1].value == cb.counters["backward_samples"]
    assert math.isclose(acc.Scalars("eata/kept_reliable")[0].value,
                        float((softmax_entropy(source_tta_logits(model, x[:8])) < cb._e0).float().mean()), rel_tol=1e-6)


# --------------------------------------------------------------------------- the model is left as found
@pytest.mark.parametrize("method", ["tent", "eata"])
def test_run_restores_the_source_parameters_and_keeps_the_adapted_ones(method):
    model = make_model()
    x, y = make_data(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = Tent(lr=0.05) if method == "tent" else EATA(e_margin=10.0, d_margin=None, fisher_alpha=0.0, lr=0.05)
    trainer([cb]).test(model, loader(x, y), verbose=False)
    # the module is exactly the source model again (γ/β, running statistics, modes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in model.modules())  # as found (LightningModule in train mode)
    # ... while the adaptation did happen and is kept in the callback
    assert cb.backward_passes == 4 and cb.backward_samples == 32
    adapted = cb.adapted_state
    assert any(not torch.equal(adapted[k], cb.source_state[k]) for k in adapted)
    assert set(adapted) == set(cb.source_state) == set(cb.adapted_parameters)
    # a source-model evaluation after the run equals one of an untouched copy
    model.eval()
    fresh = make_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)


def test_continual_adaptation_carries_over_runs_although_the_module_is_restored():
    model = make_model()
    x, y = make_data(32)
    one = predict(copy.deepcopy(model), Tent(lr=0.05, reset="continual"), x, y)
    cb, m = Tent(lr=0.05, reset="continual"), copy.deepcopy(model)
    first = predict(m, cb, x[:16], y[:16])
    assert all(torch.equal(p, model.state_dict()[k]) for k, p in m.state_dict().items())  # restored in between
    second = predict(m, cb, x[16:], y[16:])
    for got, want in zip(first + second, one):
        torch.testing.assert_close(got, want)


def test_keep_adapted_leaves_them_in_the_module_with_a_warning():
    model = make_model()
    x, y = make_data(16)
    cb = Tent(lr=0.05, keep_adapted=True)
    with pytest.warns(UserWarning, match="source running statistics"):
        trainer([cb]).test(model, loader(x, y), verbose=False)
    for k, v in cb.adapted_state.items():
        torch.testing.assert_close(model.get_parameter(k), v, rtol=0, atol=0)
        assert not torch.equal(v, cb.source_state[k]) or k.endswith("bias")


def test_inference_mode_error_names_the_stage_not_the_enum():
    model = make_model()
    x, y = make_data(16)
    with pytest.raises(RuntimeError) as err:
        trainer([Tent()], inference_mode=True).test(model, loader(x, y))
    assert "trainer.test()" in str(err.value) and "TrainerFn" not in str(err.value)


def test_entropy_margin_accessor_resolves_from_the_number_of_classes():
    model = make_model()
    x, y = make_data(16)
    cb = EATA(fisher_alpha=0.0)
    assert cb.entropy_margin is None
    predict(model, cb, x, y)
    assert cb.entropy_margin == pytest.approx(0.4 * math.log(4))
    assert EATA(e_margin=0.7, fisher_alpha=0.0).entropy_margin == 0.7


# --------------------------------------------------------------------------- EATA: passes vs samples, Fisher scale
def test_eata_counts_backward_passes_and_samples_separately_and_skips_empty_steps():
    model = make_model()
    x, y = make_data(48)
    e0 = threshold(model, x)
    cb = EATA(e_margin=e0, d_margin=None, fisher_alpha=0.0, lr=1e-2)
    result = trainer([cb]).test(model, loader(x, y), verbose=False)
    c = cb.counters
    assert c["backward_passes"] + c["steps_without_backward"] == c["batches"] == 6
    assert 0 < c["backward_samples"] == c["selected"] < c["samples"] == 48
    assert c["backward_passes"] < c["backward_samples"]
    assert result[0]["eata/backward_passes_run"] == c["backward_passes"]
    # a threshold nothing passes: every step is counted as one without a backward pass
    cb = EATA(e_margin=1e-9, fisher_alpha=0.0)
    trainer([cb]).test(make_model(), loader(x, y), verbose=False)
    assert cb.backward_passes == 0 and cb.counters["steps_without_backward"] == 6 and cb.backward_samples == 0


def test_normalised_fisher_has_mean_one_and_a_stronger_pull_to_the_source():
    model = make_model()
    x, y = make_data(48)
    fx, fy, _ = fisher_batches()
    drift = {}
    for normalize in (False, True):
        cb = EATA(e_margin=10.0, d_margin=None, fisher_alpha=5.0, fisher_normalize=normalize,
                  fisher_dataloader=loader(fx, fy), lr=0.05)
        predict(copy.deepcopy(model), cb, x, y)
        omega = cb.fisher_weights
        if normalize:
            flat = torch.cat([v.reshape(-1) for v in omega.values()])
            assert float(flat.mean()) == pytest.approx(1.0, rel=1e-5)
            for k in omega:  # a rescaling of the raw estimate, nothing else
                torch.testing.assert_close(omega[k] / omega[next(iter(omega))].mean(),
                                           cb.fisher[k] / cb.fisher[next(iter(omega))].mean())
        else:
            assert omega is cb.fisher
        drift[normalize] = sum(float(((cb.adapted_state[k] - cb.source_state[k]) ** 2).sum()) for k in omega)
    assert drift[True] < drift[False]


# --------------------------------------------------------------------------- checkpoint state validated at load
def _eata_state():
    model = make_model()
    x, y = make_data(32)
    fx, fy, _ = fisher_batches()
    cb = EATA(e_margin=threshold(model, x), fisher_alpha=1.0, fisher_dataloader=loader(fx, fy), lr=1e-2,
              reset="continual")
    predict(model, cb, x, y)
    assert cb.moving_average is not None and cb.fisher
    return model, cb.state_dict()


def _corrupt(state, path, value):
    state = copy.deepcopy(state)
    *parents, last = path
    target = state
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value(target[last]) if callable(value) else value
    return state


_DELETE = object()
_FIRST = "net.1.weight"


@pytest.mark.parametrize("path, value, key", [
    (("extra", "fisher", _FIRST), lambda v: -v - 1, _FIRST),                            # negative Fisher
    (("extra", "fisher", _FIRST), lambda v: v * float("nan"), _FIRST),                  # NaN Fisher
    (("extra", "fisher", "other.weight"), torch.ones(3), "other.weight"),               # Fisher of no parameter
    (("extra", "moving_average"), lambda m: m * 2, "moving_average"),                   # m not a distribution
    (("extra", "moving_average"), lambda m: m * float("nan"), "moving_average"),
    (("extra", "fisher"), _DELETE, "fisher"),                                           # missing key
    (("source", _FIRST), lambda v: v * float("inf"), f"source.{_FIRST}"),               # non-finite source
    (("adapted", _FIRST), lambda v: torch.ones(v.numel() + 1), f"adapted.{_FIRST}"),    # shape differs from source
    (("adapted",), lambda a: {k: v for k, v in a.items() if k != _FIRST}, "adapted"),   # keys differ from source
    (("counters", "backward_passes"), -3, "backward_passes"),                           # negative counter
    (("counters", "samples"), _DELETE, "samples"),                                      # missing counter
    (("counters", "selected"), 1.5, "selected"),                                        # not an int
    (("last_shift",), (1, "x"), "last_shift"),
    (("source",), _DELETE, "source"),                                                   # missing top-level key
])
def test_eata_state_is_validated_before_anything_is_assigned(path, value, key):
    from lightning_reweight.state.validate import CheckpointStateError

    _, state = _eata_state()
    bad = _corrupt(state, path, value)
    cb = EATA(fisher_alpha=1.0, reset="continual")
    before = (dict(cb.counters), cb.moving_average, cb.fisher, cb.state_dict())
    with pytest.raises(CheckpointStateError) as err:
        cb.load_state_dict(bad)
    assert err.value.key == key and repr(key) in str(err.value) and "callbacks[" in str(err.value)
    assert (dict(cb.counters), cb.moving_average, cb.fisher) == before[:3]  # nothing half restored
    assert cb.state_dict() == before[3]
    cb.load_state_dict(state)  # the intact state still loads
    assert cb.counters == state["counters"]


def test_a_bad_tta_entry_is_refused_in_the_dry_run_before_any_callback_is_assigned():
    """``on_load_checkpoint`` (which Lightning calls on every callback before any ``load_state_dict``) checks the
    entry without assigning it, so another callback's good entry is not assigned either."""
    from lightning_reweight.state.validate import CheckpointStateError

    _, state = _eata_state()
    cb = EATA(fisher_alpha=1.0, reset="continual")
    before = cb.state_dict()
    bad = _corrupt(state, ("counters", "backward_passes"), -3)
    with pytest.raises(CheckpointStateError, match="backward_passes.*expected an int >= 0"):
        cb.on_load_checkpoint(None, None, {"callbacks": {cb.state_key: bad}})
    assert cb.state_dict() == before
    cb.on_load_checkpoint(None, None, {"callbacks": {cb.state_key: state}})  # a good entry: checked, not assigned
    assert cb.state_dict() == before


def test_tta_source_parameters_must_match_the_module():
    from lightning_reweight.state.validate import CheckpointStateError

    _, state = _eata_state()
    x, y = make_data(16)
    # a module with different BatchNorm names: refused when the run starts, naming the key; the module is untouched
    other = TinyNet()
    other.net = nn.Sequential(nn.Identity(), *list(other.net))  # every index shifts by one
    before = {k: v.clone() for k, v in other.state_dict().items()}
    cb = EATA(fisher_alpha=1.0, reset="continual")
    cb.load_state_dict(state)
    with pytest.raises(CheckpointStateError, match="Load it into the same architecture") as err:
        predict(other, cb, x, y)
    assert err.value.key in ("source", "adapted")
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    # same names, other widths: the shape is named
    wide = _corrupt(state, ("source", _FIRST), lambda v: torch.ones(v.numel() * 2))
    wide = _corrupt(wide, ("adapted", _FIRST), lambda v: torch.ones(v.numel() * 2))
    cb = EATA(fisher_alpha=1.0, reset="continual")
    cb.load_state_dict(wide)
    with pytest.raises(CheckpointStateError, match="expected shape") as err:
        predict(make_model(), cb, x, y)
    assert err.value.key == f"source.{_FIRST}"
    # a callback already attached to the module checks at once
    model = make_model()
    attached = EATA(fisher_alpha=0.0, reset="continual")
    predict(model, attached, x, y)
    with pytest.raises(CheckpointStateError):
        attached.load_state_dict(wide)
