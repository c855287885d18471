"""Shared plumbing of the compiled (numba) CPU kernels of ``samplers``, ``rules`` and ``state``.

``LazyKernels`` imports a kernel module on first use, so ``import lightning_reweight`` never pays numba's import
(about 0.3 s) and a missing or broken numba leaves the caller on its vectorised path. ``jit`` is the one
decorator every kernel module uses. This module itself never imports numba at import time.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


class LazyKernels:
    """A kernel module imported on first ``get()``; ``get()`` returns None when the import (or ``on_import``,
    run once with the module) fails: numba missing, or built for another numpy."""

    def __init__(self, name: str, on_import: Callable[[Any], None] | None = None) -> None:
        self.name, self.on_import = name, on_import
        self._module: Any = None  # the module, False after a failed import, None before the first try

    def get(self) -> Any:
        if self._module is None:
            try:
                module = importlib.import_module(self.name)
                if self.on_import is not None:
                    self.on_import(module)
            except Exception:  # the caller's vectorised numpy/torch path
                module = False
            self._module = module
        return self._module or None


def jit(fn: Callable[..., Any]) -> Any:
    """``numba.njit(cache=True, nogil=True)``: compiled code is cached on disk next to the kernel module, or in
    numba's user-wide cache directory; where no cache location works (a read-only install without a writable
    user cache) the kernel compiles in memory once per process. Numba's warnings about the cache are silenced."""
    import numba

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", numba.NumbaWarning)
        try:
            return numba.njit(cache=True, nogil=True)(fn)
        except (RuntimeError, OSError):
            return numba.njit(cache=False, nogil=True)(fn)
