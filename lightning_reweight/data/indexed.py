"""Index-yielding dataset wrapper and the matching collate.

``IndexedDataset(ds)[i]`` returns the wrapped sample with its dataset index (and, when given, group id and
target) attached, keeping the sample's own structure so existing unpacking still reads naturally:

=================  ====================================================
wrapped sample     what ``IndexedDataset`` returns
=================  ====================================================
``dict``           the same dict plus ``"index"`` (``"group"``, ``"target"``)
``tuple``/``list`` ``(*sample, index)`` or ``(*sample, index, group)``
tensor / other     ``(sample, index)`` or ``(sample, index, group)``
=================  ====================================================

Targets given to the wrapper are *not* added to tuple samples (they usually hold the label already); they
are exposed as ``.targets`` for samplers. ``default_collate`` batches all of these; use
``indexed_collate(your_collate)`` when the loader has a custom ``collate_fn`` that expects the original
samples: it strips the index (and group), collates the rest with your function, and re-attaches them as
int64 tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

INDEX_KEY, GROUP_KEY, TARGET_KEY = "index", "group", "target"


def _as_long(values: Any, name: str, n: int) -> Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(values)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"Expected argument `{name}` to hold integer ids, but got dtype {t.dtype}.")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() != n:
        raise ValueError(f"Expected argument `{name}` to have one entry per sample ({n}), but got {t.numel()}.")
    return t


def infer_targets(dataset: Any) -> Tensor | None:
    """Class labels from common dataset attributes (``targets``, ``labels``, ``y``) when present."""
    for attr in ("targets", "labels", "y"):
        values = getattr(dataset, attr, None)
        if values is not None:
            try:
                t = torch.as_tensor(values)
            except (TypeError, ValueError):
                continue
            if t.ndim == 1 and not t.is_floating_point():
                return t.to(torch.int64)
    return None


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each sample also carries its index (and optionally group id / target).

    Args:
        dataset: any map-style dataset (``__getitem__`` + ``__len__``).
        groups: optional per-sample group ids (ints ≥ 0, or −1 for "unknown"), length ``len(dataset)``.
        targets: optional per-sample class labels; inferred from ``dataset.targets``/``labels``/``y`` if omitted.
        add_target: also attach the target to dict samples as ``"target"`` (default: only if not present).

    Example::

        train = IndexedDataset(MNIST(...), groups=my_group_ids)
        x, y, index, group = next(iter(DataLoader(train, batch_size=32)))
    """

    def __init__(self, dataset: Dataset, groups: Sequence[int] | Tensor | None = None,
                 targets: Sequence[int] | Tensor | None = None, add_target: bool = True):
        if isinstance(dataset, IndexedDataset):
            raise ValueError("The dataset is already an IndexedDataset; wrap the underlying dataset once.")
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("Expected a map-style dataset with `__len__`; iterable datasets have no stable index.") from err
        self.dataset = dataset
        self.groups = _as_long(groups, "groups", n)
        if self.groups is not None and self.groups.numel() and int(self.groups.min()) < -1:
            raise ValueError("Expected group ids ≥ 0 (or −1 for 'unknown'), but got smaller values.")
        self.targets = _as_long(targets, "targets", n) if targets is not None else infer_targets(dataset)
        self.add_target = add_target

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_groups(self) -> int:
        return 0 if self.groups is None else int(self.groups.max()) + 1

    def __getitem__(self, i: int) -> Any:
        sample = self.dataset[i]
        if isinstance(sample, dict):
            out = dict(sample)
            if INDEX_KEY in out:
                raise KeyError(f"The wrapped sample already has a {INDEX_KEY!r} key; rename it to keep both.")
            out[INDEX_KEY] = i
            if self.groups is not None:
                out[GROUP_KEY] = int(self.groups[i])
            if self.add_target and self.targets is not None and TARGET_KEY not in out:
                out[TARGET_KEY] = int(self.targets[i])
            return out
        head = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
        tail = (i,) if self.groups is None else (i, int(self.groups[i]))
        return head + tail


def indexed_collate(collate_fn: Callable[[list[Any]], Any] | None = None, with_group: bool = False):
    """Collate that lets a user's ``collate_fn`` see the original samples.

    ``with_group`` must match whether the ``IndexedDataset`` has groups. Dict samples: the user's collate
    receives the dicts without ``index``/``group``, and the batch dict gets them back. Tuple samples: the
    result is ``(user_batch, index)`` or ``(user_batch, index, group)``.
    """
    inner = collate_fn or default_collate
    n_tail = 2 if with_group else 1

    def collate(samples: list[Any]) -> Any:
        if samples and isinstance(samples[0], dict):
            keys = [INDEX_KEY] + ([GROUP_KEY] if with_group else [])
            extra = {k: torch.tensor([s[k] for s in samples], dtype=torch.int64) for k in keys}
            batch = inner([{k: v for k, v in s.items() if k not in keys} for s in samples])
            if isinstance(batch, dict):
                batch.update(extra)
                return batch
            return (batch, *extra.values())
        originals = [s[:-n_tail] for s in samples]
        originals = [o[0] if len(o) == 1 else o for o in originals]
        tails = [torch.tensor([s[-n_tail + j] for s in samples], dtype=torch.int64) for j in range(n_tail)]
        return (inner(originals), *tails)

    return collate
