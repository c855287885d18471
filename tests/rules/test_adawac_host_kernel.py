"""AdaWAC's compiled CPU step (``rules._kernels.adawac_step``) against ``adawac_update`` (the torch float64 step).

The kernel does the same float64 step per batch position with libm's log/exp, one ``log(β_sup/β_cons)`` and one
exp for both sigmoids: equal up to float64 rounding, so the float32 β agree to one float32 rounding step and are
nearly always bit-identical. Checked with repeats (steps summed in batch order), strided indices (hash
collisions), β at 0 / 1 / below the float32 floor, and huge or equal losses.
"""

import math

import numpy as np
import pytest
import torch

from lightning_reweight.rules import instance
from lightning_reweight.rules.adawac import adawac_update


def _kernel(col_sup, col_cons, index, sup, cons, eta):
    k = instance.host_kernels()
    assert k is not None, "numba is a dependency: the kernel path must be available"
    out_sup, out_cons = torch.empty(index.numel()), torch.empty(index.numel())
    distinct = k.adawac_step(col_sup.numpy(), col_cons.numpy(), index.numpy(), sup.numpy(), cons.numpy(), eta,
                             out_sup.numpy(), out_cons.numpy())
    return int(distinct), out_sup, out_cons


def _ulps(a, b):
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def _columns(n, g, kind):
    s = torch.rand(n, generator=g)
    if kind == "edges":  # exactly 0 / 1, below the float32 floor, tiny and near 1
        s[: n // 2] = torch.tensor([0.0, 1.0, 1e-40, 1e-30, 1 - 6e-8, 0.5, 1e-45, 3e-39] * n)[: n // 2]
    return s, 1 - s


@pytest.mark.parametrize("kind", ["plain", "edges"])
@pytest.mark.parametrize("index_kind", ["unique", "repeats", "strided", "one"])
@pytest.mark.parametrize("eta", [0.0, 2.0, 8.0])
@pytest.mark.parametrize("loss_scale", [1.0, 1e3])
def test_kernel_equals_adawac_update(kind, index_kind, eta, loss_scale):
    g = torch.Generator().manual_seed(3)
    n = 4096
    col_sup, col_cons = _columns(n, g, kind)
    if index_kind == "unique":
        index = torch.randperm(n, generator=g)[:700]
    elif index_kind == "repeats":  # with-replacement draws: many samples repeat, some 3+ times
        index = torch.randint(0, 300, (700,), generator=g)
    elif index_kind == "strided":  # multiples of a power of two: the worst case of a mask-only hash
        index = torch.arange(0, n, 4)[torch.randperm(n // 4, generator=g)][:700]
    else:
        index = torch.tensor([5])
    b = index.numel()
    sup = torch.rand(b, generator=g) * loss_scale
    cons = torch.rand(b, generator=g) * loss_scale
    if b > 10:
        sup[:5] = cons[:5]  # equal losses: no move
    before = (col_sup.clone(), col_cons.clone())
    distinct, k_sup, k_cons = _kernel(col_sup, col_cons, index, sup, cons, eta)
    rows, t_sup, t_cons, inverse = adawac_update(col_sup, col_cons, index, sup, cons, eta, return_inverse=True)
    assert distinct == rows.numel()
    assert _ulps(k_sup, t_sup[inverse]) <= 1 and _ulps(k_cons, t_cons[inverse]) <= 1
    # a repeated sample carries one value at all its positions
    first = torch.zeros(rows.numel(), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(b), "amin",
                                                                         include_self=False)
    assert torch.equal(k_sup, k_sup[first[inverse]]) and torch.equal(k_cons, k_cons[first[inverse]])
    assert torch.equal(col_sup, before[0]) and torch.equal(col_cons, before[1])  # read only
    if kind == "plain" and loss_scale == 1.0:
        assert float((k_sup == t_sup[inverse]).float().mean()) > 0.99  # nearly always bit-identical


def test_kernel_handles_saturated_steps():
    """Steps so large that exp(±z) overflows: the β go to exactly 0 / 1, as the torch step's sigmoid."""
    col_sup, col_cons = torch.tensor([0.5, 0.5, 1e-45, 1.0]), torch.tensor([0.5, 0.5, 1.0, 0.0])
    index = torch.tensor([0, 1, 2, 3])
    sup = torch.tensor([3e38, 0.0, 1e4, 0.0])
    cons = torch.tensor([0.0, 3e38, 0.0, 1e4])
    _, k_sup, k_cons = _kernel(col_sup, col_cons, index, sup, cons, 8.0)
    rows, t_sup, t_cons = adawac_update(col_sup, col_cons, index, sup, cons, 8.0)
    assert torch.equal(k_sup, t_sup) and torch.equal(k_cons, t_cons)
    assert k_sup.tolist()[:2] == [1.0, 0.0] and k_cons.tolist()[:2] == [0.0, 1.0]


def test_kernel_log_floor_matches():
    from lightning_reweight.rules import _kernels
    from lightning_reweight.rules.adawac import _LOG_TINY

    assert _kernels._LOG_TINY == _LOG_TINY
    assert math.log(_kernels._TINY) == _LOG_TINY and np.float32(_kernels._TINY) == np.finfo(np.float32).tiny
