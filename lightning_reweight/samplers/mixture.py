"""A temperature mixture of K streams: each training sequence's domain drawn from ``p_k ∝ n_k^(1/τ)``.

Source: "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025), the
multilingual setting: each language (domain) is its own stream, a few hold most of the data. The math
(``temperature_distribution``, ``upweight_factors``, the Cooldown ``TemperatureSchedule``) is
``lightning_reweight.rules.balance``; this module only draws. No Lightning here: ``callbacks.StreamMixing`` sets
the schedule, counts the consumed position in the main process and checkpoints it.

**Counter-based draws.** The run is one global sequence of training sequences ``i = 0, 1, 2, ...``. The domain
of sequence ``i`` is the inverse CDF of ``p(τ_i)`` at ``u_i = splitmix64(i; seed)/2^64``, with
``τ_i = schedule(i / total_sequences)``: it depends on ``(seed, i, τ_i)`` only, not on the world size, the batch
size, the workers or what came before. Within domain ``k`` the ``j``-th draw (``j`` counts the earlier sequences
of domain ``k``) takes item ``perm_{k,c}[j mod n_k]`` of pass ``c = j // n_k``, a fresh permutation per
``(seed, k, c)`` (random-access sources), or the next item of the stream (iterable sources; pass ``c`` is
started with ``set_epoch(c)`` when the stream has it, so a shuffling stream reshuffles). A domain exhausted
before the run ends therefore cycles with a fresh shuffle; ``passes`` counts how often.

**Sharding.** Global step ``s`` (from the resume position ``P``) holds sequences ``[P + sG, P + (s+1)G)``,
``G = batch_size × world_size``; rank ``r`` trains on rows ``[rB, (r+1)B)`` of it and DataLoader worker
``s mod num_workers`` builds it, so ranks and workers hold disjoint sequences whose union is the global sequence.

**Resume.** The state is the global position ``P`` (sequences consumed by completed steps, all ranks) and the
per-domain counts at ``P``; the rest is recomputed. A run resumed at ``P`` continues with exactly sequences
``P, P+1, ...``, on any number of processes (the position is global). ``total_sequences`` (which fixes the
schedule) is kept from the checkpoint.

Sources:

* random access (``__len__`` + ``__getitem__``; e.g. ``CharWindows``, a LitData ``StreamingDataset``): O(1)
  per item, any position reached at once. A source with ``get_batch(indices) -> dict`` is read in one call
  per domain and step (vectorised).
* iterable (an ``IterableDataset`` without ``__getitem__``): read in order; ``sizes[k]`` must be the number of
  items one pass yields. Every rank and worker reads the whole stream and keeps its own items (nothing is
  trained twice, but each reads all), and a resume reads the stream forward to its position: prefer random
  access for large streams.

Items are dicts of tensors (or ``(x, y)`` pairs, turned into ``{"x", "y"}``). Every batch carries ``domain``
(``(B,)`` int64), ``key`` (``(B,)`` stable key: ``offset_k +`` the item's index, or its own ``key`` field, so
keys of different domains never collide; ``num_keys = Σ n_k``), ``end`` (the global position after this step),
``counts`` (``(K,)`` per-domain draws after this step) and ``tau`` (the draw temperature of its first row).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from lightning_reweight.rules.balance import TemperatureSchedule, check_tau
from lightning_reweight.state.keys import splitmix64
from lightning_reweight.state.validate import CheckpointStateError, as_int, as_tensor, require_keys

__all__ = ["StreamMixture", "draw_domains", "schedule_taus", "source_size", "uniform01"]

_DOMAIN_SALT = 0x5EED_0001
_PERM_SALT = 0x5EED_0002


def uniform01(positions: Tensor, seed: int) -> Tensor:
    """Counter-based uniforms in ``[0, 1)`` (float64, 53 random bits): ``u_i`` depends on ``(seed, i)`` only."""
    h = splitmix64(positions.to(torch.int64), seed=int(seed) * 4 + 1)
    return ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0 ** -53


def schedule_taus(schedule: TemperatureSchedule, progress: Tensor) -> Tensor:
    """``schedule(p)`` for a tensor of progress values (vectorised; equal to the scalar ``cooldown_tau``)."""
    if schedule.schedule == "constant":
        return torch.full(progress.shape, schedule.tau, dtype=torch.float64)
    p = progress.to(torch.float64).clamp(0.0, 1.0)
    start, end, switch = schedule.tau_start, schedule.tau_end, schedule.switch_fraction
    if schedule.shape == "step":
        return torch.where(p < switch, torch.tensor(start, dtype=torch.float64), torch.tensor(end, dtype=torch.float64))
    half = min(switch, 1.0 - switch)
    frac = ((p - (switch - half)) / (2 * half)).clamp(0.0, 1.0)
    if schedule.shape == "cosine":
        frac = 0.5 * (1.0 - torch.cos(math.pi * frac))
    return start + (end - start) * frac


def draw_domains(sizes: Tensor, taus: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF domain draws: row ``i`` picks ``k`` with probability ``p_k(τ_i) ∝ n_k^(1/τ_i)`` at ``u_i``.

    Args:
        sizes: ``(K,)`` positive domain sizes ``n_k``.
        taus: ``(B,)`` temperatures (``inf`` = uniform over domains).
        u: ``(B,)`` uniforms in ``[0, 1)``.

    Returns:
        ``(B,)`` int64 domain ids. Vectorised over rows and domains (``O(B·K)``).
    """
    logn = sizes.to(torch.float64).log()
    inv = torch.where(torch.isinf(taus), torch.zeros_like(taus), 1.0 / taus)
    cdf = torch.softmax(logn[None, :] * inv[:, None], dim=1).cumsum(1)
    return (cdf[:, :-1] <= u[:, None]).sum(1).to(torch.int64)


def _index_json_size(source: Any) -> int | None:
    """The global number of samples of a LitData ``StreamingDataset`` (its ``index.json``), whatever rank reads it."""
    input_dir = getattr(source, "input_dir", None)
    path = getattr(input_dir, "path", None)
    if not path:
        return None
    index = Path(path) / "index.json"
    if not index.is_file():
        return None
    return int(sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"]))


def source_size(source: Any) -> int | None:
    """Items in one pass of ``source``: LitData's global ``index.json`` count, else ``len(source)``, else ``None``."""
    size = _index_json_size(source)
    if size is not None:
        return size
    try:
        return int(len(source))
    except TypeError:
        return None


def _random_access(source: Any) -> bool:
    return hasattr(source, "__getitem__") and (not isinstance(source, IterableDataset)
                                               or _index_json_size(source) is not None)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"x": item[0], "y": item[1]}
    raise TypeError(f"Expected stream items to be dicts of tensors or (x, y) pairs, but got {type(item).__name__}. "
                    "Map the stream's items to a dict first.")


class _Cursor:
    """Reads an iterable source in order, pass after pass (``set_epoch(pass)`` before each when available)."""

    def __init__(self, source: Any, size: int, name: str):
        self.source, self.size, self.name = source, size, name
        self.next_j = 0  # draw number of the item the iterator yields next
        self._pass = -1
        self._it: Iterator[Any] | None = None

    def get(self, j: int) -> Any:
        while True:  # draws of a domain are asked for in increasing order
            cycle = self.next_j // self.size
            if cycle != self._pass:  # a new pass: reshuffle (set_epoch) and start over
                if hasattr(self.source, "set_epoch"):
                    self.source.set_epoch(cycle)
                self._it, self._pass = iter(self.source), cycle
            try:
                item = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                raise ValueError(
                    f"Expected stream {self.name!r} to yield sizes[k]={self.size} items per pass, but pass "
                    f"{cycle} ended after {self.next_j % self.size}. Pass its true length in `sizes=`.") from None
            self.next_j += 1
            if self.next_j - 1 == j:
                return item


class StreamMixture(IterableDataset):
    """Mix K streams by temperature, in whole batches, counter-based, sharded and resumable.

    Use with ``DataLoader(mixture, batch_size=None)`` (the mixture yields whole batches). Under the Trainer,
    attach ``lightning_reweight.callbacks.StreamMixing``: it sets the schedule and the world, counts the consumed
    position and checkpoints it.

    Args:
        streams: K sources (random access or iterable, see the module docstring).
        sizes: items per pass of each source (default: ``source_size``; needed for plain iterables).
        names: domain names (default ``domain_0``, ...).
        batch_size: sequences per rank per step ``B``.
        schedule: the draw temperature (default constant τ = 1: the natural mixture).
        total_sequences: sequences of the whole run (the schedule's 100 %); needed by a non-constant schedule.
        seed: the draw seed (domains and per-pass permutations).

    Example::

        >>> mix = StreamMixture([list_a, list_b], batch_size=4, schedule=TemperatureSchedule("constant", tau=5.0))
    """

    def __init__(self, streams: Sequence[Any], sizes: Sequence[int] | None = None, names: Sequence[str] | None = None,
                 batch_size: int = 32, schedule: TemperatureSchedule | None = None,
                 total_sequences: int | None = None, seed: int = 0):
        streams = list(streams)
        if not streams:
            raise ValueError("Expected argument `streams` to hold at least one stream, but got none.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected argument `batch_size` to be a positive int, but got {batch_size!r}.")
        if sizes is None:
            found = [source_size(s) for s in streams]
            missing = [k for k, n in enumerate(found) if n is None]
            if missing:
                raise ValueError(f"Expected every stream to have a length, but stream(s) {missing} have none. Pass "
                                 "`sizes=[items per pass of each stream]`.")
            sizes = found  # type: ignore[assignment]
        sizes = [int(n) for n in sizes]  # type: ignore[union-attr]
        if len(sizes) != len(streams) or min(sizes) < 1:
            raise ValueError(f"Expected one positive size per stream ({len(streams)}), but got sizes={sizes}. "
                             "Drop empty streams from the mixture.")
        names = [f"domain_{k}" for k in range(len(streams))] if names is None else [str(n) for n in names]
        if len(names) != len(streams) or len(set(names)) != len(names):
            raise ValueError(f"Expected {len(streams)} distinct names, one per stream, but got {names}.")
        if total_sequences is not None and (isinstance(total_sequences, bool) or not isinstance(total_sequences, int)
                                            or total_sequences < 1):
            raise ValueError(f"Expected argument `total_sequences` to be a positive int or None, but got "
                             f"{total_sequences!r}.")
        self.streams, self.names = streams, names
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.sizes.cumsum(0)[:-1]])
        self.batch_size, self.seed = batch_size, int(seed)
        self.schedule = schedule if schedule is not None else TemperatureSchedule("constant", tau=1.0)
        self.total_sequences = total_sequences
        self.random_access = [_random_access(s) for s in streams]
        self.rank, self.world_size = 0, 1
        #: global position: sequences consumed by completed steps (all ranks together)
        self.position = 0
        #: per-domain draws among sequences ``[0, position)``
        self.counts = torch.zeros(len(streams), dtype=torch.int64)
        self._perms: dict[tuple[int, int], Tensor] = {}

    # ------------------------------------------------------------------ the draw
    @property
    def num_domains(self) -> int:
        return len(self.streams)

    @property
    def num_keys(self) -> int:
        """Keys are ``[0, Σ n_k)``: domain ``k`` holds ``[offset_k, offset_k + n_k)``."""
        return int(self.sizes.sum())

    def set_temperature(self, tau: float) -> None:
        """A constant draw temperature (1 = the natural mixture, ``inf`` = uniform over domains)."""
        self.schedule = TemperatureSchedule("constant", tau=check_tau(tau))

    def taus(self, positions: Tensor) -> Tensor:
        """The draw temperature of each global position (``schedule(position / total_sequences)``)."""
        if self.schedule.schedule == "constant":
            return torch.full(positions.shape, self.schedule.tau, dtype=torch.float64)
        if self.total_sequences is None:
            raise ValueError(f"Expected `total_sequences` for the schedule {self.schedule!r}, but got None. Pass "
                             "`StreamMixture(total_sequences=...)`, or attach `StreamMixing` (it sets it from "
                             "`Trainer(max_steps)`).")
        return schedule_taus(self.schedule, positions.to(torch.float64) / self.total_sequences)

    def probabilities(self, tau: float) -> Tensor:
        """``p_k(τ) ∝ n_k^(1/τ)`` (float64)."""
        from lightning_reweight.rules.balance import temperature_distribution

        return temperature_distribution(self.sizes.to(torch.float64), tau)

    def domains(self, start: int, count: int) -> Tensor:
        """Domains of global positions ``[start, start + count)`` (a pure function of seed, position, schedule)."""
        positions = torch.arange(start, start + count, dtype=torch.int64)
        return draw_domains(self.sizes, self.taus(positions), uniform01(positions, self.seed))

    def _perm(self, k: int, cycle: int) -> Tensor:
        key = (k, cycle)
        perm = self._perms.get(key)
        if perm is None:
            mixed = splitmix64(torch.tensor([self.seed * 1_000_003 + k * 65_537 + cycle]), seed=_PERM_SALT)
            g = torch.Generator().manual_seed(int(mixed.item()) & ((1 << 62) - 1))
            perm = torch.randperm(int(self.sizes[k]), generator=g)
            if len(self._perms) > 4 * self.num_domains:
                self._perms.clear()
            self._perms[key] = perm
        return perm

    def items(self, k: int, j: Tensor) -> Tensor:
        """Item indices of draws ``j`` of random-access domain ``k`` (a fresh permutation per pass)."""
        n = int(self.sizes[k])
        cycles = j // n
        out = torch.empty_like(j)
        for c in torch.unique(cycles).tolist():  # one or two passes per step
            sel = cycles == c
            out[sel] = self._perm(k, c)[j[sel] % n]
        return out

    # ------------------------------------------------------------------ iteration
    def _fetch(self, k: int, j: Tensor, cursors: dict[int, _Cursor]) -> dict[str, Any]:
        if self.random_access[k]:
            idx = self.items(k, j)
            source = self.streams[k]
            if hasattr(source, "get_batch"):
                batch = dict(source.get_batch(idx))
            else:
                batch = default_collate([_as_dict(source[int(i)]) for i in idx.tolist()])
            batch["key"] = self.offsets[k] + idx
            return batch
        cursor = cursors.setdefault(k, _Cursor(self.streams[k], int(self.sizes[k]), self.names[k]))
        items = [_as_dict(cursor.get(int(jj))) for jj in j.tolist()]
        own = [it.pop("key", None) for it in items]
        batch = default_collate(items)
        local = (torch.as_tensor(own, dtype=torch.int64) if all(o is not None for o in own)
                 else j % int(self.sizes[k]))
        batch["key"] = self.offsets[k] + local
        return batch

    def iter_batches(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> Iterator[dict]:
        """The batches of ``rank`` built by ``worker`` (of ``num_workers``), from ``self.position`` on (endless)."""
        B, K = self.batch_size, self.num_domains
        G = B * world_size
        pos, counts = int(self.position), self.counts.clone()
        cursors: dict[int, _Cursor] = {}
        step = 0
        while True:
            dom = self.domains(pos, G)
            onehot = torch.nn.functional.one_hot(dom, K)
            before = counts[None, :] + onehot.cumsum(0) - onehot
            j = before.gather(1, dom[:, None]).squeeze(1)
            counts = counts + onehot.sum(0)
            first_tau = float(self.taus(torch.tensor([pos]))[0])
            pos += G
            if step % num_workers == worker:
                mine = slice(rank * B, (rank + 1) * B)
                yield self._assemble(dom[mine], j[mine], cursors, pos, counts.clone(), first_tau)
            step += 1

    def _assemble(self, dom: Tensor, j: Tensor, cursors: dict[int, _Cursor], end: int, counts: Tensor,
                  tau: float) -> dict[str, Any]:
        parts, rows = [], []
        for k in torch.unique(dom).tolist():
            sel = torch.nonzero(dom == k).flatten()
            parts.append(self._fetch(k, j[sel], cursors))
            rows.append(sel)
        order = torch.argsort(torch.cat(rows))  # back to row order
        batch: dict[str, Any] = {}
        for name in parts[0]:
            values = [p[name] for p in parts]
            if isinstance(values[0], Tensor):
                batch[name] = torch.cat(values)[order]
            else:  # non-tensor fields (strings, ...): a list in row order
                flat = [v for vs in values for v in vs]
                batch[name] = [flat[i] for i in order.tolist()]
        batch["domain"] = dom.clone()
        batch["end"] = torch.tensor(end)
        batch["counts"] = counts
        batch["tau"] = torch.tensor(tau, dtype=torch.float32)  # float32: every accelerator takes it
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.iter_batches(self.rank, self.world_size, worker, num_workers)

    # ------------------------------------------------------------------ progress and checkpoint
    def advance(self, end: int, counts: Tensor) -> None:
        """Record a consumed step (main process): the batch's ``end`` position and ``counts``."""
        self.position, self.counts = int(end), counts.detach().to("cpu", torch.int64).clone()

    @property
    def passes(self) -> Tensor:
        """Passes through each domain so far (float64: draws / n_k; the whole part is the completed cycles)."""
        return self.counts.to(torch.float64) / self.sizes.to(torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "counts": self.counts.clone(), "sizes": self.sizes.clone(),
                "seed": self.seed, "total_sequences": self.total_sequences, "names": list(self.names)}

    def check_state_dict(self, state: Any, where: str = "StreamMixture") -> dict[str, Any]:
        """Validate a ``state_dict`` against this mixture; returns the values to assign, assigns nothing."""
        state = require_keys(state, ["position", "counts", "sizes", "seed"], where)
        sizes = as_tensor(state, "sizes", where, kind="int", minimum=1)
        if sizes.shape != self.sizes.shape or not torch.equal(sizes.to(torch.int64), self.sizes):
            raise CheckpointStateError(
                where, "sizes", f"the checkpoint mixes streams of sizes {sizes.tolist()}, but this mixture has "
                f"{self.sizes.tolist()}: resuming would draw other sequences.",
                "Resume with the same streams (languages, seq_len, split), or start the mixture fresh.")
        seed = as_int(state, "seed", where)
        if seed != self.seed:
            raise CheckpointStateError(where, "seed", f"the checkpoint drew with seed={seed}, but this mixture has "
                                       f"seed={self.seed}.", "Resume with the same seed, or start the mixture fresh.")
        position = as_int(state, "position", where, minimum=0)
        counts = as_tensor(state, "counts", where, kind="int", length=self.num_domains, minimum=0)
        if int(counts.sum()) != position:
            raise CheckpointStateError(where, "counts", f"expected per-domain counts summing to position={position}, "
                                       f"but they sum to {int(counts.sum())}.")
        total = as_int(state, "total_sequences", where, minimum=1, optional=True) if "total_sequences" in state else None
        return {"position": position, "counts": counts.to(torch.int64).clone(), "total_sequences": total}

    def load_state_dict(self, state: Any) -> None:
        values = self.check_state_dict(state)
        self.position, self.counts = values["position"], values["counts"]
        if values["total_sequences"] is not None:
            self.total_sequences = values["total_sequences"]
