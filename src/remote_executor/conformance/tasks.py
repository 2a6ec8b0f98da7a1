"""The functions the conformance scenarios submit.

They live in an importable module of the package because remote workers unpickle module-level functions
by reference (``remote_executor.conformance.tasks.square``); a function defined in a test module could not
be imported there. Lambdas and closures, shipped by value, are exercised by the scenarios themselves.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from .gate import GateError, wait_at_gate

__all__ = [
    "CustomError",
    "GateError",
    "UnpicklableError",
    "add",
    "append_and_return",
    "digest_and_blob",
    "echo",
    "failing_initializer",
    "gated_get_state",
    "gated_write_file",
    "get_state",
    "hold_reporting_sigterm",
    "identity",
    "kill_own_process",
    "make_blob",
    "make_lock",
    "raise_custom",
    "raise_if_negative",
    "raise_unpicklable",
    "raise_value_error",
    "report_pid_at_gate",
    "set_state",
    "square",
    "takes_fn_and_self",
    "wait_at_gate",
]


def identity(value: Any) -> Any:
    return value


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def takes_fn_and_self(fn: Any, self: Any) -> tuple[Any, Any]:
    """Parameters named like ``Executor.submit``'s own: they must pass through as keywords."""
    return fn, self


def append_and_return(items: list[Any], item: Any) -> list[Any]:
    items.append(item)
    return items


# --- exceptions ------------------------------------------------------------------------------------


class CustomError(Exception):
    """An exception with a constructor of its own; still picklable through ``args``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class UnpicklableError(Exception):
    """An exception that refuses to be pickled, so it cannot cross the wire."""

    def __reduce__(self) -> Any:
        raise TypeError("UnpicklableError refuses to be pickled")


def raise_value_error(*args: Any) -> None:
    raise ValueError(*args)


def raise_custom(code: int, message: str) -> None:
    raise CustomError(code, message)


def raise_unpicklable(message: str) -> None:
    raise UnpicklableError(message)


def raise_if_negative(x: int) -> int:
    if x < 0:
        raise ValueError(x)
    return x


def make_lock() -> Any:
    """A result that cannot be pickled."""
    return threading.Lock()


# --- initializer state -----------------------------------------------------------------------------

_state: Any = None


def set_state(value: Any) -> None:
    """An initializer: remember ``value`` in this worker."""
    global _state
    _state = value


def get_state() -> Any:
    return _state


def failing_initializer(message: str) -> None:
    raise RuntimeError(message)


def gated_get_state(address: tuple[str, int], token: str) -> Any:
    """Hold a worker at the gate (so concurrent calls land on different workers), then report its state."""
    wait_at_gate(address, token)
    return _state


# --- files and payloads ----------------------------------------------------------------------------


def gated_write_file(address: tuple[str, int], token: str, path: str, text: str) -> str:
    wait_at_gate(address, token)
    Path(path).write_text(text)
    return path


def make_blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_and_blob(data: bytes, size: int, seed: int) -> tuple[str, bytes]:
    """The SHA-256 of a large argument, and a large result that the caller can rebuild from ``seed``."""
    return hashlib.sha256(data).hexdigest(), make_blob(size, seed)


# --- faults (used by the fault scenarios; they run in the worker processes) -----------------------------


def report_pid_at_gate(address: tuple[str, int], token: str) -> int:
    """Report ``"<token> <pid>"`` to the gate, wait to be released, return this process's pid."""
    wait_at_gate(address, f"{token} {os.getpid()}")
    return os.getpid()


def kill_own_process() -> None:
    """A poison call: SIGKILL the process running it, as a call that crashes its worker does."""
    os.kill(os.getpid(), signal.SIGKILL)


def hold_reporting_sigterm(address: tuple[str, int], token: str, result: Any = None) -> Any:
    """Wait at the gate like :func:`wait_at_gate`; if this process gets SIGTERM meanwhile, run its own
    SIGTERM handler first, then report ``"<token>:sigterm"`` to the gate.

    The test thereby knows, without sleeping, that the worker's drain began while this call was running.
    Calls must run on the worker's main thread (where Python runs signal handlers).
    """
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(f"{token}:sigterm\n".encode())
        if previous == signal.SIG_DFL:  # nobody handles SIGTERM here: let it end the process as it would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return wait_at_gate(address, token, result)
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
