"""``compile=``: the rule and the table's merge through ``torch.compile`` on the CPU (Inductor's C++ backend), against
the eager code; the fallback where compilation fails; DDP ranks that agree on the path; resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight import LossReweighting, Reweighter
from lightning_reweight._compile import MODES, CompiledFunction, CompileFallbackWarning, resolve_compile
from lightning_reweight.rules import Rule, create_rule
from lightning_reweight.state.table import PAIR_MERGE_ROWS, BatchIndex, SampleStateTable, merged_values
from tests.doors._common import N, Tiny, data, global_batches
from tests.helpers import REPO, make_trainer, run_ddp_script

torch_dynamo = pytest.importorskip("torch._dynamo")
if not torch_dynamo.is_dynamo_supported():  # pragma: no cover - e.g. a Python that torch.compile does not support
    pytest.skip("torch.compile is not supported here", allow_module_level=True)

#: float32 rounding: compiled kernels may evaluate exp / lerp / sums differently from ATen's (a few ulp)
CLOSE = dict(rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per function: a test that needs a fresh compilation resets it (and after)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batches():
    """Steps with unique indices, with repeats, and a smaller last batch (a second shape)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(6):
        size = 48 if step < 5 else 20
        out.append(torch.randperm(200, generator=g)[:size] if step % 2 == 0 else
                   torch.randint(0, 200, (size,), generator=g))
    return out


def _run(compile, rule="linupper", batches=None, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cb = LossReweighting(rule, warmup_steps=0, num_samples=200, log_every_n_steps=0, compile=compile, **kw)
    reweighter = Reweighter([cb], model=model)
    g = torch.Generator().manual_seed(1)
    weights = []
    for index in batches or _batches():
        x, y = torch.randn(len(index), 4, generator=g), torch.randint(0, 3, (len(index),), generator=g)
        reweighter.reduce(F.cross_entropy(model(x), y, reduction="none") * 3, index)
        weights.append(cb.last_weights.clone())
    return cb, weights


def _assert_same_run(a, b, **close):
    (ca, wa), (cb, wb) = a, b
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, **(close or CLOSE))
    for name, col in ca.table.columns.items():
        torch.testing.assert_close(col, cb.table.columns[name], **(close or CLOSE))


def test_resolve_compile():
    assert resolve_compile(False) is None and resolve_compile(None) is None
    assert resolve_compile(True) == "default"
    assert [resolve_compile(m) for m in MODES] == list(MODES)
    for bad in ("fast", 1, "True"):
        with pytest.raises(ValueError, match=r"`compile` to be a bool or one of the torch.compile modes"):
            resolve_compile(bad)
    with pytest.raises(ValueError, match=r"Expected a torch.compile mode"):
        CompiledFunction(lambda x: x, "fast", "x")
    with pytest.raises(ValueError, match=r"`compile` to be a bool"):
        LossReweighting(compile="fastest")


def test_a_config_file_sets_it():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LossReweighting, "callback")
    for given, mode in (("true", "default"), ("false", None), ("reduce-overhead", "reduce-overhead")):
        config = parser.parse_args([f"--callback.compile={given}"])
        assert LossReweighting(**config.callback).compile_mode == mode


@pytest.mark.parametrize("name,kw", [("linupper", {}), ("quadratic", {"direction": "down"}), ("extremes", {"delta": 2.0}),
                                     ("kl_dro", {}), ("kl_dro", {"normalizer": "ema", "direction": "down"}),
                                     ("uniform", {})])
def test_tensor_rules_equal_the_eager_rules(name, kw):
    """``propose_tensors`` (what the compiled step traces) gives the eager rule's weights and state."""
    losses = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 5
    rule, again = create_rule(name, **kw), create_rule(name, **kw)
    for step in range(3):
        w, pending = rule.propose(losses + step)
        t, state = again.propose_tensors(losses + step, again.tensor_state(losses.device))
        torch.testing.assert_close(t, w, **CLOSE)
        rule.commit(pending)
        again.commit(state)
        if kw.get("normalizer") == "ema":
            assert again.log_normalizer == pytest.approx(rule.log_normalizer, rel=1e-12, abs=1e-12)
        else:
            assert again.state_dict() == rule.state_dict()


def test_a_rule_without_a_tensor_step_cannot_be_compiled():
    class Mine(Rule):
        def weights(self, losses):
            return losses / losses.mean()

    with pytest.raises(NotImplementedError, match=r"Mine has no tensor-only step"):
        Mine().propose_tensors(torch.rand(3), None)
    with pytest.raises(ValueError, match=r"Mine has no `propose_tensors`.*compile=False"):
        LossReweighting(Mine(), compile=True)
    LossReweighting(Mine())  # eager: fine


@pytest.mark.parametrize("rule,kw", [("linupper", {}), ("kl_dro", {"normalizer": "ema", "max_weight": 3.0})])
def test_the_compiled_step_equals_the_eager_step(rule, kw):
    eager = _run(False, rule, **kw)
    compiled = _run(True, rule, **kw)
    cb = compiled[0]
    assert cb._rule_graph._compiled is not None and cb._rule_graph.compiled  # it really ran compiled
    assert cb.table.compiled is not None and cb.table.compiled.compiled
    _assert_same_run(compiled, eager)
    assert torch.equal(compiled[0].table["count"], eager[0].table["count"])
    if rule == "kl_dro":
        assert compiled[0].rule.log_normalizer == pytest.approx(eager[0].rule.log_normalizer, rel=1e-12)


def test_the_valid_extra_compiles_too():
    """Rows without a loss (the ``valid`` extra) take no part in the compiled rule either: their count changes
    every step, so the rule's graph takes any size after the second."""
    def run(compile):
        torch.manual_seed(0)
        cb = LossReweighting("linupper", warmup_steps=0, num_samples=200, log_every_n_steps=0, max_weight=2.0,
                             compile=compile)
        reweighter = Reweighter([cb])
        g = torch.Generator().manual_seed(2)
        out = []
        for index in _batches():
            losses = (torch.rand(len(index), generator=g) * 4).requires_grad_()
            valid = torch.rand(len(index), generator=g) > 0.3
            reweighter.reduce(losses, index, valid=valid)
            out.append(cb.last_weights.clone())
            assert (cb.last_weights[~valid] == 0).all()
        return cb, out

    eager, compiled = run(False), run(True)
    assert compiled[0]._rule_graph.compiled
    _assert_same_run(compiled, eager)


def test_a_copy_compiles_again():
    import copy

    cb = _run(True)[0]
    twin = copy.deepcopy(cb)
    assert twin._rule_graph._compiled is None and twin._rule_graph.compiled  # not run yet, not failed
    losses = torch.rand(48)
    torch.testing.assert_close(twin._propose(losses)[0], cb._propose(losses)[0], rtol=0, atol=0)
    assert twin._rule_graph._compiled is not None


def test_the_compiled_step_issues_fewer_launches():
    """``benchmarks/compile_step.py``'s count: the ops left outside the compiled functions plus the kernels
    Inductor makes of them, against the eager step's ops (as ``op_count.py`` counts them, on ``meta``)."""
    from benchmarks.compile_step import launches

    for sync in (True, False):
        eager, none = launches("linupper", sync, None, 256)
        outside, kernels = launches("linupper", sync, "default", 256)
        assert none == 0 and kernels > 0
        assert outside <= 20 and outside + kernels <= eager - 10, (eager, outside, kernels)


def test_the_compiled_merge_equals_the_eager_update_with_many_rows():
    """Batches above ``PAIR_MERGE_ROWS`` merge repeats by a sort: compiled as the eager device update."""
    g = torch.Generator().manual_seed(0)
    eager, compiled = SampleStateTable(3000, ema_decay=0.8), SampleStateTable(3000, ema_decay=0.8).compile()
    eager._fixed_shape_only = True
    for _ in range(3):
        index = torch.randint(0, 3000, (PAIR_MERGE_ROWS + 100,), generator=g)
        values = torch.rand(index.numel(), generator=g)
        eager.update(index, loss=values, ema_loss=values, weight=values * 2, count=values)
        compiled.update(index, loss=values, ema_loss=values, weight=values * 2, count=values)
    for name, col in eager.columns.items():
        torch.testing.assert_close(compiled.columns[name], col, **CLOSE)
    # and the pure function directly, unique rows: the values as they are
    index = torch.randperm(50, generator=g)
    rows, (new,) = merged_values(index, (torch.arange(50.0),), (None,), ((torch.float32, torch.float64, None),), True)
    assert rows is index and new.dtype == torch.float64 and torch.equal(new, torch.arange(50.0, dtype=torch.float64))


def test_the_table_uses_the_step_s_knowledge_of_unique_rows():
    table = SampleStateTable(10).compile()
    index = torch.tensor([3, 1, 3])
    table.update(index, check=False, index_info=BatchIndex(index), loss=torch.tensor([1.0, 2.0, 5.0]))
    assert table["loss"][3].item() == 3.0 and table["count"][3].item() == 2  # repeats merged to their mean
    unique = torch.tensor([4, 5])
    info = BatchIndex(unique)
    info.unique = True
    table.update(unique, check=False, index_info=info, loss=torch.tensor([7.0, 8.0]), weight=torch.tensor([0.5, 2.0]))
    assert table["loss"][4:6].tolist() == [7.0, 8.0] and table["weight"][4:6].tolist() == [0.5, 2.0]


def test_a_failed_compilation_falls_back_to_the_eager_code_with_a_warning(fresh_dynamo):
    import torch._inductor.config as inductor

    eager = _run(False)
    # no C++ compiler (and no cached compiled code): Inductor's CPU backend fails
    with inductor.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}), \
            pytest.warns(CompileFallbackWarning, match=r"runs eagerly from now on.*C\+\+ compiler") as caught:
        fallback = _run(True)
    assert len(caught) == 2  # one warning each for the rule and the table, not one per step
    cb = fallback[0]
    assert not cb._rule_graph.compiled and "InvalidCxxCompiler" in cb._rule_graph.failure
    assert not cb.table.compiled.compiled
    _assert_same_run(fallback, eager)


def test_no_torch_compile_here_falls_back(fresh_dynamo, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    fn = CompiledFunction(lambda x: x * 2, "default", "the test function")
    with pytest.warns(CompileFallbackWarning, match=r"the test function runs eagerly.*does not support this Python"):
        assert fn(torch.ones(2)).tolist() == [2.0, 2.0]
    assert not fn.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fn(torch.ones(3)).tolist() == [2.0] * 3  # eager from now on, no second warning


def test_the_recompile_limit_falls_back(fresh_dynamo):
    def double(x, scale: float):
        return x * scale

    fn = CompiledFunction(double, "default", "the test function")
    with torch._dynamo.config.patch(recompile_limit=1):
        assert fn(torch.ones(2), 2.0).tolist() == [2.0, 2.0] and fn.compiled
        with pytest.warns(CompileFallbackWarning, match=r"FailOnRecompileLimitHit"):
            assert fn(torch.ones(2), 3.0).tolist() == [3.0, 3.0]  # a new constant: a recompilation, refused
    assert not fn.compiled


def test_compiled_runs_in_the_trainer(tmp_path):
    from tests.core.conftest import TinyModule, make_loader

    module = TinyModule()
    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=1, compile=True)
    trainer = make_trainer([cb], tmp_path, max_steps=3)
    trainer.fit(module, make_loader())
    assert trainer.global_step == 3 and cb._rule_graph.compiled and cb.table.compiled.compiled
    assert int(cb.table["count"].sum()) == 3 * len(module.records[0][0])


class _Resumable:
    def __init__(self, compile):
        self.module = Tiny()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.5)
        self.cb = LossReweighting("kl_dro", normalizer="ema", num_samples=N, log_every_n_steps=0, compile=compile)
        self.reweighter = Reweighter([self.cb], model=self.module)

    def train(self, batches, start, stop):
        x, y = data()
        for index in batches[start:stop]:
            self.reweighter.reduce(F.cross_entropy(self.module(x[index]), y[index], reduction="none"), index).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        return self

    def state(self):
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "reweight": self.reweighter.state_dict()}

    def load(self, state):
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.reweighter.load_state_dict(state["reweight"])
        return self


def test_a_compiled_run_resumes_exactly_twice():
    """The compiled path keeps no state of its own: a checkpoint (written compiled or eager) resumes it, also
    from a checkpoint written after a resume."""
    batches = global_batches(2)
    full = _Resumable(True).train(batches, 0, len(batches))
    first = _Resumable(True).train(batches, 0, 2).state()
    second = _Resumable(True).load(first).train(batches, 2, 4).state()
    resumed = _Resumable(True).load(second).train(batches, 4, len(batches))
    assert resumed.cb.rule.log_normalizer == full.cb.rule.log_normalizer
    for name, col in full.cb.table.columns.items():
        torch.testing.assert_close(resumed.cb.table.columns[name], col, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(resumed.module.net.weight, full.module.net.weight, rtol=0, atol=0)
    # an eager checkpoint resumes compiled (and the numbers stay within rounding of the eager run)
    eager_full = _Resumable(False).train(batches, 0, len(batches))
    mixed = _Resumable(True).load(_Resumable(False).train(batches, 0, 3).state()).train(batches, 3, len(batches))
    for name, col in eager_full.cb.table.columns.items():
        torch.testing.assert_close(mixed.cb.table.columns[name], col, **CLOSE)


def test_two_processes_compile_together_and_fall_back_together(tmp_path):
    run_ddp_script(REPO / "tests" / "ddp_scripts" / "compile_ddp.py", tmp_path, timeout=400)
    r0, r1 = (json.loads((tmp_path / f"results_{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["compiled"]["rule_compiled"] and r["compiled"]["table_compiled"] and not r["compiled"]["warnings"]
        failed = r["rank1_fails"]
        assert not failed["rule_compiled"] and not failed["table_compiled"] and len(failed["warnings"]) == 2
    assert any("InvalidCxxCompiler" in w for w in r1["rank1_fails"]["warnings"])
    assert all("another rank" in w for w in r0["rank1_fails"]["warnings"])
    for phase in ("compiled", "rank1_fails"):
        t0, t1 = (torch.load(tmp_path / f"{phase}_{r}.pt") for r in range(2))
        for name in t0:  # identical on every rank
            torch.testing.assert_close(t0[name], t1[name], rtol=0, atol=0, equal_nan=True)
        assert r0[phase]["log_z"] == r1[phase]["log_z"]
    # the 2-process compiled run equals the 1-process one (the same global batches)
    one = _one_process_ddp_reference()
    compiled = torch.load(tmp_path / "compiled_0.pt")
    for name, col in one.items():  # (DDP's gradient mean rounds differently from one process's)
        torch.testing.assert_close(compiled[name], col, rtol=1e-5, atol=1e-6, equal_nan=True)


def _one_process_ddp_reference():
    cb = LossReweighting("kl_dro", normalizer="ema", max_weight=3.0, num_samples=N, log_every_n_steps=0,
                         compile=True)
    module = Tiny()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    reweighter = Reweighter([cb], model=module)
    x, y = data()
    for index in global_batches(2):
        # the 2-process run's rows, in rank order: rank 0's index[0::2], then rank 1's index[1::2]
        order = torch.cat([index[0::2], index[1::2]])
        loss = reweighter.reduce(F.cross_entropy(module(x[order]), y[order], reduction="none"), order)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in cb.table.state_dict()["columns"].items()}


def test_cuda_graph_outputs_are_copied():
    """With a CUDA-graph mode the outputs are copied (a graph's next replay reuses its buffers)."""
    from lightning_reweight._compile import _copy_outputs, _on_cuda

    a, b = torch.ones(3), torch.zeros(2)
    out = _copy_outputs((a, (b, None), 2))
    assert out[0] is not a and torch.equal(out[0], a) and out[1][0] is not b and out[1][1] is None and out[2] == 2
    assert not _on_cuda((a, (b,), None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_compiled_step_on_a_gpu_equals_the_eager_one(mode):  # pragma: no cover - runs on a GPU machine
    def run(compile):
        torch.manual_seed(0)
        cb = LossReweighting("kl_dro", normalizer="ema", max_weight=3.0, num_samples=200, log_every_n_steps=0,
                             sync_checks=False, compile=compile)
        reweighter = Reweighter([cb], model=torch.nn.Linear(1, 1).cuda())
        g = torch.Generator().manual_seed(1)
        kept = []
        for index in _batches():
            losses = (torch.rand(len(index), generator=g) * 4).cuda().requires_grad_()
            reweighter.reduce(losses, index.cuda())
            kept.append(cb.last_weights)  # kept past the step: must not be overwritten by the next replay
        cb.check_deferred()
        return cb, [w.cpu() for w in kept]

    eager, compiled = run(False), run(mode)
    assert compiled[0]._rule_graph.compiled and compiled[0].table.compiled.compiled
    for x, y in zip(eager[1], compiled[1]):
        torch.testing.assert_close(y, x, **CLOSE)
    for name, col in eager[0].table.columns.items():
        torch.testing.assert_close(compiled[0].table.columns[name].cpu(), col.cpu(), **CLOSE)
