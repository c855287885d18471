"""The optional ``torch.compile`` path of a weighting step (``LossReweighting(compile=True)``).

A compiled function here is always *pure*: tensors in, tensors out, no state changed inside (the caller writes
the results). So a compilation that fails, or a recompilation refused by Dynamo's recompile limit, costs nothing:
the same function runs eagerly instead, with one ``CompileFallbackWarning``, and every later call stays eager.

Under ``torch.distributed`` the ranks agree on the path: the first call of each kind of input (dtypes, devices,
the non-tensor arguments; not the sizes) exchanges whether the compilation failed on any rank (one small
all-reduce, once per kind), and if it did every rank runs eagerly, so the per-sample state stays identical on
every rank (the compiled and the eager numbers differ by float rounding).

With a CUDA-graph mode (``"reduce-overhead"``, ``"max-autotune"``) on a CUDA tensor, the outputs of each call are
copied once (the graph's own output buffers are reused by its next replay, and callers keep the weights past the
step). No CUDA-graph step is marked (``torch.compiler.cudagraph_mark_step_begin`` would switch the whole process,
the user's own compiled model included, to explicit step marks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.distributed import any_rank, is_distributed

__all__ = ["MODES", "CompileFallbackWarning", "CompiledFunction", "resolve_compile"]

#: the ``torch.compile`` modes a ``compile=`` argument may name (``True`` is ``"default"``)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the modes that capture CUDA graphs on a CUDA device
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompileFallbackWarning(UserWarning):
    """``compile=`` could not compile a step function; it runs eagerly (same results up to float rounding).
    Turn it into an error with ``warnings.simplefilter("error", CompileFallbackWarning)``."""


def resolve_compile(value: Any) -> str | None:
    """The ``torch.compile`` mode a ``compile=`` argument asks for (``None``: eager)."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(
        f"Expected argument `compile` to be a bool or one of the torch.compile modes {list(MODES)}, but got "
        f"{value!r}. Pass `compile=True` (mode 'default'), or `compile='reduce-overhead'` for CUDA graphs."
    )


def _unavailable() -> str | None:
    """Why ``torch.compile`` cannot run in this Python at all (``None`` when it can)."""
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # a broken or stripped torch build
        return f"torch._dynamo cannot be imported ({type(err).__name__}: {err})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    return None


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this could not be compiled" (a failed backend, a graph break under
    ``fullgraph=True``, the recompile limit), as opposed to an error of the computation itself."""
    from torch._dynamo import exc

    errors: list[type[BaseException]] = [exc.TorchDynamoException]
    limit = getattr(exc, "FailOnRecompileLimitHit", None)
    if limit is not None:
        errors.append(limit)
    return tuple(errors)


def _kind(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a call's inputs look like apart from their sizes: the first call of each kind is agreed across ranks."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append((a.dtype, a.device, a.dim()))
        elif isinstance(a, (tuple, list)):
            out.append(_kind(tuple(a)))
        else:
            out.append(a if a is None or isinstance(a, (bool, int, float, str)) else type(a))
    return tuple(out)


def _on_cuda(args: tuple[Any, ...]) -> bool:
    for a in args:
        if isinstance(a, Tensor) and a.is_cuda:
            return True
        if isinstance(a, (tuple, list)) and _on_cuda(tuple(a)):
            return True
    return False


def _copy_outputs(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copy_outputs(o) for o in out)
    return out


class CompiledFunction:
    """``fn`` (pure: no state changed inside) run through ``torch.compile(fn, mode=mode, fullgraph=True)``,
    eagerly when that is unavailable or fails (``CompileFallbackWarning``, once; later calls stay eager).

    Args:
        fn: the pure function; its eager form is also the fallback.
        mode: a ``torch.compile`` mode (``MODES``).
        what: what the function computes, for the warning (e.g. ``"LossReweighting's rule"``).
    """

    def __init__(self, fn: Callable[..., Any], mode: str, what: str) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected a torch.compile mode in {list(MODES)}, but got {mode!r}.")
        self.fn, self.mode, self.what = fn, mode, what
        self.failure: str | None = None  # why this runs eagerly (None: compiled)
        self._compiled: Callable[..., Any] | None = None
        self._agreed: set[tuple[Any, ...]] = set()  # kinds of input whose outcome the ranks agreed on

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) compiles again on its first call: compiled code is not copied."""
        state = dict(self.__dict__)
        state["_compiled"] = None
        state["_agreed"] = set()
        return state

    @property
    def compiled(self) -> bool:
        """Whether calls run compiled (``False`` after a fallback)."""
        return self.failure is None

    def _fall_back(self, reason: str) -> None:
        self.failure = reason
        self._compiled = None
        warnings.warn(
            f"compile={self.mode!r}: {self.what} runs eagerly from now on (the same results up to float rounding): "
            f"{reason}. Set `compile=False` to silence this, or fix the cause (a C++ compiler for the CPU, Triton "
            "for a GPU: see the torch.compile documentation).",
            CompileFallbackWarning, stacklevel=3,
        )

    def __call__(self, *args: Any) -> Any:
        if self.failure is not None:
            return self.fn(*args)
        error: str | None = None
        out: Any = None
        if self._compiled is None:
            error = _unavailable()
            if error is None:
                self._compiled = torch.compile(self.fn, mode=None if self.mode == "default" else self.mode,
                                               fullgraph=True)
        if error is None:
            graphs = self.mode in _CUDA_GRAPH_MODES and _on_cuda(args)
            try:
                out = self._compiled(*args)
            except _compile_errors() as err:
                error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            else:
                if graphs:
                    out = _copy_outputs(out)
        kind = _kind(args)
        failed = error is not None
        if kind not in self._agreed:
            if is_distributed():  # every rank makes its first call of a kind at the same step
                failed = any_rank(failed)
            self._agreed.add(kind)
        if failed:
            self._fall_back(error or "the compilation failed on another rank, so every rank runs eagerly")
            return self.fn(*args)
        return out
