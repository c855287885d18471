"""The weighted draw core: every refusal (type and a message naming the fix), the three alias-table builds bit
for bit (compiled, numpy fallback, and the device construction run on CPU tensors), and the sampler's controls.

Written against survivors of ``scripts/mutate.py samplers/core.py``.
"""

import numpy as np
import pytest
import torch

from lightning_reweight.samplers import core
from lightning_reweight.samplers.core import (
    WeightedSampler,
    build_alias_table,
    draw_alias,
    draw_weighted,
    epoch_generator,
    uniform_indices,
    validate_weights,
)


# ------------------------------------------------------------------------------------------------ weights
def test_validate_weights_messages_name_the_fix():
    with pytest.raises(TypeError, match=r"`w` to be a 1-D tensor, numpy array or sequence .*but got int"):
        validate_weights(3, "w")
    with pytest.raises(TypeError, match=r"real-valued, but got dtype torch.complex64"):
        validate_weights(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"shape \(2, 2\); flatten it"):
        validate_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"non-empty, but got 0 weights"):
        validate_weights([])
    with pytest.raises(ValueError, match=r"2 NaN/inf entries \(first at index 1, value nan\); clean or clamp"):
        validate_weights(torch.tensor([1.0, float("nan"), float("-inf")]))
    with pytest.raises(ValueError, match=r"1 negative entries \(first at index 2, value -0.5\); .*clamp_min\(0\)"):
        validate_weights(torch.tensor([1.0, 0.0, -0.5]))
    with pytest.raises(ValueError, match=r"all 2 are zero; at least one sample must be drawable"):
        validate_weights(torch.zeros(2))
    ints = validate_weights(torch.tensor([0, 2]))
    assert ints.dtype == torch.float64 and ints.tolist() == [0.0, 2.0]
    assert validate_weights(np.array([0.5], dtype=np.float32)).dtype == torch.float32
    assert validate_weights((1, 2)).dtype == torch.float64


def test_overflowing_total_names_the_fix():
    with pytest.raises(ValueError, match=r"finite sum, but got inf .*weights / weights.max\(\)"):
        core._checked_total(torch.tensor([1e308, 1e308], dtype=torch.float64))
    assert core._checked_total(torch.tensor([1.0, 2.0])) == 3.0


# ------------------------------------------------------------------------------------------------ alias tables
def _weights(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) ** 6
    w[torch.randperm(n, generator=g)[: n // 4]] = 0.0
    return w


@pytest.mark.parametrize("n", [1, 2, 5, 1500, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_numpy_and_device_builds_are_bit_identical(monkeypatch, n, dtype):
    """The public build with numba, with ``USE_NUMBA = False`` (numpy fallback), and the torch construction every
    non-CPU device takes, run here on CPU tensors: the same table, bit for bit."""
    w = _weights(n, n).to(dtype)
    if not bool((w > 0).any()):
        w[0] = 1.0
    compiled = build_alias_table(w)
    monkeypatch.setattr(core, "USE_NUMBA", False)
    assert core._numba_kernels() is None
    fallback = build_alias_table(w)
    device = core._build_alias_table_torch(w)
    for table in (fallback, device):
        assert torch.equal(table.prob, compiled.prob) and torch.equal(table.alias, compiled.alias)
    assert bool((compiled.prob[w == 0] == 0).all())


@pytest.mark.parametrize("w", [[1.0, 1.0, 1.0], [1.0], [0.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
def test_small_tables_by_hand_on_every_build(monkeypatch, w):
    """Exact tables: every bucket's mass ``prob[j] + Σ_{alias[k]=j} (1 − prob[k])`` equals ``N w_j / Σw``."""
    w = torch.tensor(w, dtype=torch.float64)
    n = w.numel()
    target = (w * n / w.sum()).tolist()
    for build in (core._build_alias_table_torch, core._build_alias_table_numpy, build_alias_table):
        t = build(w)
        mass = t.prob.clone()
        mass.index_add_(0, t.alias, 1 - t.prob)
        assert mass.tolist() == pytest.approx(target)
        assert bool(((t.prob >= 0) & (t.prob <= 1)).all())
    uniform = core._build_alias_table_torch(torch.full((3,), 1.0))
    assert uniform.prob.tolist() == [1.0] * 3


def test_draw_alias_and_draw_weighted_argument_errors():
    table = build_alias_table(torch.ones(3))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"`num_draws` to be a non-negative int, but got"):
            draw_alias(table, bad, torch.Generator())
    assert draw_alias(table, 0, torch.Generator()).shape == (0,)
    assert draw_alias(table, np.int64(2), torch.Generator()).shape == (2,)
    with pytest.raises(TypeError, match=r"torch.Generator, but got int; create one with"):
        draw_weighted(torch.ones(3), 2, 0)

    class CudaGenerator(torch.Generator):  # a CPU generator that reports another device
        device = torch.device("cuda")

    with pytest.raises(ValueError, match=r"live on the weights' device \(cpu\), but got cuda; move the weights"):
        draw_weighted(torch.ones(3), 2, CudaGenerator())


def test_without_replacement_bounds():
    w = torch.tensor([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"at most the number of positive weights \(2\) .*but got 3; draw with"):
        draw_weighted(w, 3, torch.Generator(), replacement=False)
    both = draw_weighted(w, 2, torch.Generator().manual_seed(0), replacement=False)
    assert sorted(both.tolist()) == [0, 2]  # exactly the positive ones: the bound is inclusive
    many = draw_weighted(torch.ones(100), 5, torch.Generator().manual_seed(0), replacement=False)  # the top-k path
    assert len(set(many.tolist())) == 5


def test_uniform_indices_and_epoch_generator():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert uniform_indices(7, 5, g).tolist() == (u * 7).floor().long().tolist()
    a = torch.rand(3, generator=epoch_generator(1, 2))
    assert torch.equal(a, torch.rand(3, generator=epoch_generator(1, 2)))
    assert not torch.equal(a, torch.rand(3, generator=epoch_generator(2, 1)))
    assert not torch.equal(a, torch.rand(3, generator=epoch_generator(1, 3)))
    assert epoch_generator(0, 0).initial_seed() == epoch_generator(0, 0).initial_seed() < 2**63


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("kw, match", [
    (dict(num_replicas=2.0), r"`num_replicas` to be a positive int, but got 2.0"),
    (dict(num_replicas=0), r"`num_replicas` to be a positive int, but got 0"),
    (dict(num_replicas=True), r"`num_replicas` to be a positive int, but got True"),
    (dict(num_replicas=2, rank=-1), r"`rank` to be an int in \[0, num_replicas=2\), but got -1"),
    (dict(num_replicas=2, rank=1.0), r"but got 1.0"),
    (dict(num_replicas=2, rank=False), r"but got False"),
    (dict(seed=1.5), r"`seed` to be an int, but got 1.5"),
    (dict(seed=True), r"`seed` to be an int, but got True"),
    (dict(num_samples=2.0), r"`num_samples` to be a positive int, but got 2.0"),
    (dict(num_samples=True), r"positive int, but got True"),
    (dict(replacement=1), r"`replacement` to be a bool, but got 1"),
    (dict(num_samples=1, num_replicas=2, rank=0, drop_last=True), r"at least `num_replicas` \(2\) with `drop_last"),
])
def test_sampler_arguments_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        WeightedSampler(torch.ones(4), **kw)


def test_sampler_accepts_numpy_ints_and_boundaries():
    s = WeightedSampler(torch.ones(4), num_samples=np.int64(2), seed=np.int64(3), num_replicas=2, rank=1,
                        drop_last=True)
    assert (s.num_samples, s.seed, len(s), s.total_size) == (2, 3, 1, 2)
    assert isinstance(s.seed, int) and len(list(s)) == 1
    s = WeightedSampler(torch.ones(4), num_samples=3, num_replicas=2, rank=0)
    assert len(s) == 2 and s.total_size == 4 and s.global_indices().numel() == 4
    assert s.num_weights == 4 and torch.equal(s.weights, torch.ones(4))
    assert WeightedSampler(torch.ones(2), replacement=False, num_samples=2).num_samples == 2


def test_pad_repeats_the_head_and_drop_truncates():
    seq = torch.tensor([5, 6, 7])
    assert WeightedSampler._pad(seq, 8).tolist() == [5, 6, 7, 5, 6, 7, 5, 6]
    assert WeightedSampler._pad(seq, 3).tolist() == [5, 6, 7]
    assert WeightedSampler._pad(seq, 2).tolist() == [5, 6]


def test_set_weights_and_without_replacement_check():
    s = WeightedSampler(torch.ones(3), num_samples=2, replacement=False)
    with pytest.raises(ValueError, match=r"one entry per item \(3\), but got 2; the dataset length cannot change"):
        s.set_weights(torch.ones(2))
    with pytest.raises(ValueError, match=r"`num_samples` \(2\) to be at most the number of positive weights \(1\) "
                                         r"with `replacement=False`; use `replacement=True`"):
        s.set_weights(torch.tensor([0.0, 1.0, 0.0]))
    s.set_weights(torch.tensor([0.0, 1.0, 1.0]))  # exactly enough positive weights
    assert sorted(s) == [1, 2]


def test_set_epoch_cursor_and_resume_controls():
    s = WeightedSampler(torch.ones(8), seed=1)
    with pytest.raises(RuntimeError, match=r"rebase_cursor\(\) needs a restored epoch \(call load_state_dict first\)"):
        s.rebase_cursor(3)
    s.set_epoch(2)
    it = iter(s)
    [next(it) for _ in range(3)]
    s.set_cursor(3)
    assert s.position == 3
    s.set_cursor(100)
    assert s.cursor == 8  # capped at this rank's share
    s.set_cursor(-5)
    assert s.cursor == 0
    s.set_cursor(3)
    state = s.state_dict()
    r = WeightedSampler(torch.ones(8), seed=1)
    r.load_state_dict(state)
    assert r.resumed_world_size == 1 and r.remaining_per_rank() == [5]
    with pytest.raises(RuntimeError, match=r"set_epoch\(1\) would discard the restored position in epoch 2 "
                                           r"\(sample 3 of 8\).*`sampler.set_epoch\(2\)`"):
        r.set_epoch(1)
    r.set_epoch(2)  # the restored epoch itself is fine
    assert r.cursor == 3
    r.rebase_cursor(1)
    assert r.cursor == 1
    assert list(r) == s.global_indices(2)[3:].tolist()
    r.set_epoch(3)
    assert r.cursor == 0 and r.resumed_world_size is None


def test_sequence_fingerprint_changes_with_the_sequence():
    a = core.sequence_fingerprint(torch.tensor([1, 2, 3]), 4)
    assert a == (3, 6, 1 + 4 + 9, 14, 4)
    assert core.sequence_fingerprint(torch.tensor([2, 1, 3]), 4) != a


def test_legacy_checkpoint_cursor_is_scaled_to_a_global_position():
    s = WeightedSampler(torch.ones(8), num_replicas=2, rank=0)
    s.set_cursor(2)
    state = s.state_dict()
    assert state["position"] == 4
    del state["position"]  # written before positions were global
    assert s.check_state_dict(state)["position"] == 4
    state["global_cursor"] = 3
    assert s.check_state_dict(state)["position"] == 3


@pytest.mark.parametrize("key", ["weights", "epoch_weights"])
def test_checkpointed_all_zero_weights_are_refused(key):
    from lightning_reweight.state.validate import CheckpointStateError

    s = WeightedSampler(torch.ones(3))
    state = s.state_dict()
    state[key] = torch.zeros(3)
    with pytest.raises(CheckpointStateError, match=rf"\['{key}'\]: expected at least one positive weight, but all "
                                                   r"are zero\. .*Resume from another checkpoint"):
        s.load_state_dict(state)
    assert torch.equal(s.weights, torch.ones(3))
