"""Finding a callback's entry in a Lightning checkpoint, and naming the entries another configuration wrote.

Lightning restores callbacks in two passes (``trainer/call.py``): ``on_load_checkpoint(trainer, module,
checkpoint)`` on *every* callback, then ``load_state_dict(entry)`` on each callback whose key
(``state_key``) has a non-empty entry. Our callbacks validate their own entry in the first pass
(``check_state_dict``, which assigns nothing), so a bad entry anywhere stops the resume before any callback
was assigned; ``load_state_dict`` validates again (Fabric's ``fabric.load`` calls only that) and assigns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["checkpoint_entry", "foreign_entries", "warn_unmatched"]


def _callback_states(checkpoint: Any) -> Mapping[Any, Any]:
    states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    return states if isinstance(states, Mapping) else {}


def checkpoint_entry(callback: Any, checkpoint: Any) -> Any:
    """The entry Lightning will hand to ``callback.load_state_dict`` (``None``: none, or an empty one)."""
    states = _callback_states(checkpoint)
    entry = states.get(callback.state_key, states.get(getattr(callback, "_legacy_state_key", None)))
    return entry if entry else None


def foreign_entries(callback: Any, checkpoint: Any) -> list[str]:
    """Keys of entries written by the same class under another ``state_key`` (another configuration)."""
    cls = type(callback).__qualname__
    return [k for k in _callback_states(checkpoint)
            if isinstance(k, str) and k != callback.state_key and (k == cls or k.startswith(cls + "{"))]


def warn_unmatched(callback: Any, checkpoint: Any, what: str) -> None:
    """Warn (rank 0) that the checkpoint has no entry for ``callback``: name the entries of the same class that
    another configuration wrote (dropped: ``state_key`` includes the constructor's main arguments), or say that
    the checkpoint holds none. ``what`` names the state that starts fresh."""
    if "callbacks" not in checkpoint:
        return
    others = foreign_entries(callback, checkpoint)
    key = callback.state_key
    if others:
        rank_zero_warn(
            f"The checkpoint holds {type(callback).__name__} state under {others}, but this callback's key is "
            f"{key!r}: it was written by another configuration. That state ({what}) is dropped and this callback "
            f"starts fresh. To keep it, resume with the configuration that wrote it; to carry it over on purpose, "
            f"move the entry to `checkpoint['callbacks'][{key!r}]`."
        )
    else:
        rank_zero_warn(
            f"The checkpoint holds no state for {type(callback).__name__} ({key!r}): it was written without this "
            f"callback, so {what} start(s) fresh. To keep state across resumes, attach the same callbacks to the run "
            "that writes the checkpoint."
        )
