"""Backend selection: which implementation runs the array operations.

``auto`` (default): the Triton kernels for CUDA tensors when Triton imports, PyTorch otherwise.
``triton``: always the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``.
``torch``: the plain PyTorch path everywhere.

The initial value comes from the environment variable ``ROLLOUT_BUFFERS_BACKEND``; change it
from Python with :func:`set_backend` or temporarily with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .errors import BackendUnavailableError, RolloutValueError

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "triton_available"]

BACKENDS = ("auto", "triton", "torch")
_ENV = "ROLLOUT_BUFFERS_BACKEND"


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise RolloutValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name.lower()


_backend = _check(os.environ.get(_ENV, "auto") or "auto")
_triton_ok: bool | None = None


def get_backend() -> str:
    """Return the selected backend name: ``'auto'``, ``'triton'`` or ``'torch'``."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for every later operation (``'auto'``, ``'triton'`` or ``'torch'``)."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for the duration of a ``with`` block."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


def triton_available() -> bool:
    """Whether ``import triton`` succeeds (checked once)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising something else
            _triton_ok = False
    return _triton_ok


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device) -> bool:
    """Decide, for tensors on ``device``, whether the Triton kernels run.

    Raises :class:`BackendUnavailableError` when ``triton`` was requested explicitly and cannot
    run here.
    """
    if _backend == "torch":
        return False
    if _backend == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise BackendUnavailableError(
            "backend 'triton' was requested but `import triton` fails; install triton or set "
            "ROLLOUT_BUFFERS_BACKEND=torch"
        )
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return True
    raise BackendUnavailableError(
        f"backend 'triton' cannot run on {device} tensors: Triton needs CUDA tensors, or CPU "
        "tensors with TRITON_INTERPRET=1 (its interpreter); use backend 'auto' or 'torch'"
    )
