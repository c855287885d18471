"""Validation of state read back from a checkpoint, before any of it is used.

Every stateful piece (tables, GroupDRO's ``q``, EMA normalisers, sampler cursors, AdaWAC weights, EATA's
Fisher, ...) reads its checkpoint entry through these helpers, *all of it first*, and only then assigns it:
a bad entry raises ``CheckpointStateError`` naming the checkpoint key, and nothing is half restored.

Example::

    def load_extra_state(self, state):
        q = as_distribution(state, "q", where=self.checkpoint_where, length=self.num_groups)
        steps = as_int(state, "steps", where=self.checkpoint_where, minimum=0)
        self.q, self.steps = q, steps          # assign only after every read passed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CheckpointStateError",
    "TrainingSetChangedError",
    "as_distribution",
    "as_float",
    "as_int",
    "as_tensor",
    "require_keys",
]

_FIX = (
    "The checkpoint is corrupted, was written by another version or configuration, or belongs to another run. "
    "Resume from another checkpoint, or start this component fresh by deleting its entry from "
    "`checkpoint['callbacks']` (or by not passing `ckpt_path`)."
)


class CheckpointStateError(ValueError):
    """A checkpoint entry is missing, malformed or out of range; raised before any state is assigned."""

    def __init__(self, where: str, key: str | None, problem: str, fix: str = _FIX):
        self.where, self.key = where, key
        name = f"{where}[{key!r}]" if key is not None else where
        super().__init__(f"Checkpoint state {name}: {problem} {fix}")


class TrainingSetChangedError(ValueError):
    """Checkpointed per-sample state does not fit the training set it is restored onto (N rows vs M samples)."""


def require_keys(state: Any, keys: list[str] | tuple[str, ...], where: str) -> Mapping[str, Any]:
    """``state`` must be a mapping holding every key in ``keys``."""
    if not isinstance(state, Mapping):
        raise CheckpointStateError(where, None, f"expected a dict, but got {type(state).__name__}.")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointStateError(where, missing[0], f"missing key(s) {missing}; present: {sorted(state)}.")
    return state


def as_tensor(
    state: Mapping[str, Any],
    key: str,
    where: str,
    *,
    kind: str = "float",
    ndim: int | None = 1,
    length: int | None = None,
    finite: bool = True,
    allow_nan: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Tensor:
    """Read ``state[key]`` as a tensor and check it.

    Args:
        kind: ``"float"`` (floating dtype), ``"int"`` (integer dtype) or ``"any"``.
        ndim: required number of dimensions (``None``: any).
        length: required first-dimension size (``None``: any).
        finite: no inf (and no NaN unless ``allow_nan``).
        allow_nan: NaN entries allowed (e.g. "never seen" table entries); inf still refused when ``finite``.
        minimum / maximum: inclusive bounds on the non-NaN entries.
    """
    require_keys(state, [key], where)
    value = state[key]
    if not isinstance(value, Tensor):
        raise CheckpointStateError(where, key, f"expected a tensor, but got {type(value).__name__}.")
    if kind == "float" and not value.is_floating_point():
        raise CheckpointStateError(where, key, f"expected a floating-point tensor, but got dtype {value.dtype}.")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise CheckpointStateError(where, key, f"expected an integer tensor, but got dtype {value.dtype}.")
    if ndim is not None and value.ndim != ndim:
        raise CheckpointStateError(where, key, f"expected {ndim} dimension(s), but got shape {tuple(value.shape)}.")
    if length is not None and (value.ndim == 0 or value.shape[0] != length):
        raise CheckpointStateError(where, key, f"expected length {length}, but got shape {tuple(value.shape)}.")
    if value.numel() and value.is_floating_point() and (finite or minimum is not None or maximum is not None):
        nan = torch.isnan(value)
        if finite and not allow_nan and bool(nan.any()):
            raise CheckpointStateError(where, key, f"expected finite values, but got {int(nan.sum())} NaN entries.")
        if finite and bool(torch.isinf(value).any()):
            raise CheckpointStateError(where, key, f"expected finite values, but got {int(torch.isinf(value).sum())} inf entries.")
        checked = value[~nan] if allow_nan else value
    else:
        checked = value
    if checked.numel():
        if minimum is not None and bool((checked < minimum).any()):
            raise CheckpointStateError(where, key, f"expected values >= {minimum}, but the minimum is {checked.min().item()}.")
        if maximum is not None and bool((checked > maximum).any()):
            raise CheckpointStateError(where, key, f"expected values <= {maximum}, but the maximum is {checked.max().item()}.")
    return value


def as_distribution(state: Mapping[str, Any], key: str, where: str, *, length: int | None = None,
                    atol: float = 1e-4) -> Tensor:
    """``state[key]``: a 1-D, finite, non-negative tensor summing to 1 (within ``atol``)."""
    q = as_tensor(state, key, where, length=length, minimum=0.0)
    total = float(q.double().sum())
    if abs(total - 1.0) > atol:
        raise CheckpointStateError(where, key, f"expected a probability distribution summing to 1, but the sum is {total}.")
    return q


def _scalar(state: Mapping[str, Any], key: str, where: str) -> Any:
    require_keys(state, [key], where)
    value = state[key]
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise CheckpointStateError(where, key, f"expected a scalar, but got shape {tuple(value.shape)}.")
        value = value.item()
    return value


def _within(value: Any, key: str, where: str, minimum: Any, maximum: Any, what: str) -> Any:
    """``value`` if it lies within the inclusive bounds (``None``: unbounded), else ``CheckpointStateError``."""
    if minimum is not None and value < minimum:
        raise CheckpointStateError(where, key, f"expected {what} >= {minimum}, but got {value}.")
    if maximum is not None and value > maximum:
        raise CheckpointStateError(where, key, f"expected {what} <= {maximum}, but got {value}.")
    return value


def as_int(state: Mapping[str, Any], key: str, where: str, *, minimum: int | None = None,
           maximum: int | None = None, optional: bool = False) -> int | None:
    """``state[key]`` as an int within ``[minimum, maximum]`` (``None`` allowed when ``optional``)."""
    value = _scalar(state, key, where)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointStateError(where, key, f"expected an int, but got {value!r}.")
    return _within(value, key, where, minimum, maximum, "an int")


def as_float(state: Mapping[str, Any], key: str, where: str, *, minimum: float | None = None,
             maximum: float | None = None, finite: bool = True, optional: bool = False) -> float | None:
    """``state[key]`` as a finite float within ``[minimum, maximum]`` (``None`` allowed when ``optional``)."""
    value = _scalar(state, key, where)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointStateError(where, key, f"expected a number, but got {value!r}.")
    value = float(value)
    if finite and (value != value or abs(value) == float("inf")):
        raise CheckpointStateError(where, key, f"expected a finite number, but got {value}.")
    return _within(value, key, where, minimum, maximum, "a number")
