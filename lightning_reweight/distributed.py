"""O(batch) cross-rank gathers for per-sample values.

Only the batch's values travel (never an O(N) table). Per-rank batch sizes may differ (e.g. the last batch
of an uneven shard): sizes are gathered first, values are padded to the largest and trimmed after.
Rows are ordered by global rank, so rank r's rows are ``slice(offsets[r], offsets[r + 1])``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _device_for_backend(t: Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo works with CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """Every rank's row count, ordered by global rank."""
    if not is_distributed():
        return [n]
    device = device or (_device_for_backend(torch.empty(0)))
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one small all-reduce under ``torch.distributed``)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_device_for_backend(torch.empty(0)))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_sizes_and_codes(n: int, code: int, device: torch.device | None = None) -> tuple[list[int], list[int]]:
    """Every rank's row count and a small status code (e.g. "this rank refused its inputs"), in the one
    collective that exchanges the sizes."""
    if not is_distributed():
        return [n], [code]
    device = device or (_device_for_backend(torch.empty(0)))
    mine = torch.tensor([n, code], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    pairs = torch.stack(parts).tolist()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def gather_rows(tensors: list[Tensor], sizes: list[int] | None = None) -> tuple[list[Tensor], list[int]]:
    """All-gather detached per-sample tensors (first dim = batch) from every rank, concatenated by rank.

    All tensors are packed into one float64 ``(B, d)`` buffer, so a call costs two collectives (sizes, data)
    whatever the number of tensors; integers up to 2^53 (dataset indices) survive exactly. Pass ``sizes``
    back in to skip the size exchange on a second gather of the same batch. A single process returns
    detached copies of the inputs.
    """
    tensors = [t.detach() for t in tensors]
    if not is_distributed() or not tensors:
        return tensors, [tensors[0].shape[0] if tensors else 0]
    device = _device_for_backend(tensors[0])
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"Expected every per-sample tensor to have {n} rows, got {[t.shape[0] for t in tensors]}.")
    if sizes is None:
        sizes = gather_sizes(n, device)
    max_n = max(sizes)
    flat = [t.reshape(n, -1).to(device, torch.float64) for t in tensors]
    widths = [f.shape[1] for f in flat]
    buf = torch.zeros((max_n, sum(widths)), dtype=torch.float64, device=device)
    buf[:n] = torch.cat(flat, dim=1)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    joined = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    out, col = [], 0
    for t, w in zip(tensors, widths):
        out.append(joined[:, col:col + w].reshape(-1, *t.shape[1:]).to(t.device, t.dtype))
        col += w
    return out, sizes


def local_slice(sizes: list[int], rank: int | None = None) -> slice:
    """This rank's rows in a gather ordered by global rank."""
    rank = global_rank() if rank is None else rank
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
