"""Backends, what each can run, and how a call picks one.

fastattn has four backends, tried in a per-device priority order:

============  ==========================================  ======================================
backend       what it is                                  runs on
============  ==========================================  ======================================
``cuda``      CUDA C++ kernels in ``fastattn._C``         CUDA tensors, when ``_C`` has CUDA
``triton``    Triton kernels                              CUDA tensors; CPU tensors only under
                                                          the Triton interpreter
``cpu``       C++ kernels in ``fastattn._C``              CPU tensors
``reference`` plain PyTorch (:mod:`fastattn.reference`)   anything
============  ==========================================  ======================================

Each op declares, per backend, which inputs it takes and a readable reason when it refuses one. A call
walks the priority list and takes the first backend that is available and accepts the inputs. Users can
force a backend (or their own order) with ``with fastattn.backend("triton"): ...`` or the environment
variable ``FASTATTN_BACKEND=triton`` (comma-separated for an order); a forced backend that refuses an input
raises :class:`BackendError` instead of falling back. Every choice is logged on the ``fastattn`` logger
(``DEBUG``; a fallback past an available backend at ``INFO``) and can be recorded with :func:`record`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

logger = logging.getLogger("fastattn")

BACKENDS = ("cuda", "triton", "cpu", "reference")
PRIORITY = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "triton", "reference")}


class BackendError(RuntimeError):
    """A forced backend cannot run the given inputs, or no backend can."""


# ---------------------------------------------------------------------------------------------------------
# Availability: whether a backend can run at all in this process, and why not.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def extension() -> tuple[Optional[object], Optional[str]]:
    """``(fastattn._C, None)`` when the compiled extension loads, else ``(None, reason)``."""
    try:
        from fastattn import _C  # noqa: PLC0415
    except ImportError as error:
        return None, f"fastattn._C did not load ({error}); reinstall with `pip install --no-build-isolation .`"
    return _C, None


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_not_built(module) -> Optional[str]:
    info = module.build_info()
    return None if info["cuda"] else f"fastattn._C was built without CUDA: {info['cuda_status']}"


def _gpu_missing() -> Optional[str]:
    return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` in this process, or None if it can."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        module, reason = extension()
        if module is None:
            return reason
        if name == "cpu":
            return None if device.type == "cpu" else f"the cpu backend runs CPU tensors, not {device.type}"
        reason = _cuda_not_built(module)
        if reason:
            return reason
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device.type}"
        return _gpu_missing()
    if name == "triton":
        reason = _triton_import_error()
        if reason:
            return reason
        if device.type == "cuda":
            return _gpu_missing()
        if device.type == "cpu":
            return None if triton_interpreting() else "CPU tensors run under Triton only with TRITON_INTERPRET=1"
        return f"triton does not run {device.type} tensors"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------------
# Forcing a backend.
# ---------------------------------------------------------------------------------------------------------

_forced: contextvars.ContextVar[Optional[tuple[str, ...]]] = contextvars.ContextVar("fastattn_backend", default=None)


def _parse(names: str | Sequence[str]) -> tuple[str, ...]:
    parsed = tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)
    for name in parsed:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if not parsed:
        raise ValueError("backend: name at least one backend")
    return parsed


def forced() -> Optional[tuple[str, ...]]:
    """The backends forced by :func:`backend` or ``FASTATTN_BACKEND``, in order, or None."""
    names = _forced.get()
    if names is not None:
        return names
    env = os.environ.get("FASTATTN_BACKEND", "").strip()
    return _parse(env) if env else None


@contextlib.contextmanager
def backend(*names: str) -> Iterator[None]:
    """Run the ops in this block on the named backend(s), tried in the given order, with no other fallback.

    Example::

        with fastattn.backend("triton"):
            y = fastattn.softmax(x)
    """
    token = _forced.set(_parse(names[0] if len(names) == 1 else names))
    try:
        yield
    finally:
        _forced.reset(token)


# ---------------------------------------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dispatch:
    """One call's choice: the op, the backend that ran it, and why the backends before it were passed over."""

    op: str
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)


_recorders: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("fastattn_recorders", default=())


@contextlib.contextmanager
def record() -> Iterator[list[Dispatch]]:
    """Collect a :class:`Dispatch` for every op call in this block (eager calls; not inside compiled graphs)."""
    calls: list[Dispatch] = []
    token = _recorders.set(_recorders.get() + (calls,))
    try:
        yield calls
    finally:
        _recorders.reset(token)


# A refusal check: returns None when the backend accepts the inputs, else the reason it does not.
Check = Callable[..., Optional[str]]


def select(op: str, device: torch.device, checks: dict[str, Check], *args) -> str:
    """Pick the backend for one call of ``op`` on ``device``; ``checks[name](*args)`` vets the inputs."""
    names = forced()
    is_forced = names is not None
    if names is None:
        names = PRIORITY.get(device.type, ("reference",))
    skipped: dict[str, str] = {}
    refused = False  # an available backend turned these inputs down: a fallback worth an INFO line
    for name in names:
        reason = unavailable_reason(name, device)
        if reason is None:
            reason = checks[name](*args) if name in checks else f"{op} has no {name} kernel"
            refused = refused or reason is not None
        if reason is None:
            if torch.compiler.is_compiling():  # a traced selection reports nothing: no side effects in graphs
                return name
            if _recorders.get() or logger.isEnabledFor(logging.INFO if refused else logging.DEBUG):
                _report(Dispatch(op, name, skipped), refused)
            return name
        skipped[name] = reason
    detail = "; ".join(f"{name}: {why}" for name, why in skipped.items())
    if is_forced:
        raise BackendError(f"fastattn.{op}: the forced backend(s) cannot run these inputs ({detail})")
    raise BackendError(f"fastattn.{op}: no backend can run these inputs ({detail})")


def report_run(op: str, backend: str) -> None:
    """Record (and log at DEBUG) that ``op`` ran on ``backend``, for ops that pick their kernel without
    :func:`select`."""
    if _recorders.get() or logger.isEnabledFor(logging.DEBUG):
        _report(Dispatch(op, backend), refused=False)


def report_fallback(op: str, runner: str, reason: str) -> None:
    """Record (and log at INFO) that a module ran ``op`` outside fastattn's kernels, on ``runner``, and why."""
    _report(Dispatch(op, runner, {"fastattn": reason}), refused=True)


def _report(dispatch: Dispatch, refused: bool) -> None:
    for calls in _recorders.get():
        calls.append(dispatch)
    level = logging.INFO if refused else logging.DEBUG
    logger.log(level, "%s ran on %s; passed over %s", dispatch.op, dispatch.backend, dispatch.skipped)
