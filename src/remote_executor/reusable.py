"""``get_reusable_executor()``: one warm executor shared by every caller of a program, as loky has.

Starting worker processes takes a moment; a program (or a library inside it) that needs an executor now and
then should not pay it every time. The executor returned here stays up between calls while the arguments
asked for stay the same, is replaced when they change (another ``max_workers``: a resize), and shuts itself
down once it has had nothing to do for ``timeout`` seconds, releasing its workers; at interpreter exit it
finishes its calls and closes like every executor.

    caller threads                    the watcher (one daemon thread per executor)
    get_reusable_executor() --+       waits until `timeout` after the last call was submitted or settled;
      same arguments: touch   |       then, if nothing is outstanding, forgets the executor and shuts it
      other arguments: replace|       down (under the module lock, so a caller never gets one that is
                              v       about to close)
                      _ReusableExecutor (a RemoteExecutor that notes when it was last used)
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from .executor import RemoteExecutor

__all__ = ["get_reusable_executor"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0  # seconds without calls before the workers are released

_lock = threading.Lock()  # guards _current; taken before any executor's own lock, never after
_current: _ReusableExecutor | None = None


def _forget_after_fork() -> None:
    """In a process forked from this one (a worker forked while this lock was held to start the executor,
    or a plain ``os.fork()``): a lock of its own, and no executor, whose threads stayed with the parent."""
    global _lock, _current
    _lock = threading.Lock()
    _current = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def get_reusable_executor(max_workers: int | None = None, transport: str | None = None, *,
                          timeout: float = DEFAULT_TIMEOUT, **options: Any) -> RemoteExecutor:
    """The shared executor for these arguments: the running one if they match, else a new one.

    ``max_workers``, ``transport`` and ``options`` are those of :class:`RemoteExecutor`. While they are the
    same as last time, the same executor (the same warm worker processes) is returned; if they differ (for
    example another ``max_workers``), the previous executor is shut down (its outstanding calls still
    finish) and a new one started. One that was shut down or broken is replaced too.

    ``timeout``: seconds without a call after which the executor shuts itself down and its workers exit
    (the next call of this function starts new ones); it counts from the last call submitted or finished,
    never while one is running. Call this function whenever you need the executor, rather than keeping it:
    one kept past its idle timeout refuses new calls, as any executor after ``shutdown()`` does.
    """
    global _current
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    arguments = (max_workers, transport, options)
    with _lock:
        current = _current
        if current is not None and current.usable() and current.arguments == arguments:
            current.touch(timeout)
            return current
        _current = None
        if current is not None:
            current.retire()
        _current = _ReusableExecutor(max_workers, transport, timeout=timeout, **options)
        return _current


class _Idle:
    """When an executor was last used, shared by it and its views (``with_options``)."""

    def __init__(self, timeout: float) -> None:
        self.changed = threading.Condition()
        self.timeout = timeout
        self.last_used = time.monotonic()
        self.retired = False

    def remaining(self) -> float:
        return self.last_used + self.timeout - time.monotonic()


class _ReusableExecutor(RemoteExecutor):
    """A :class:`RemoteExecutor` that shuts itself down after ``timeout`` idle seconds."""

    def __init__(self, max_workers: int | None, transport: str | None, *, timeout: float, **options: Any) -> None:
        super().__init__(max_workers, transport, **options)
        self.arguments = (max_workers, transport, options)
        self._idle = _Idle(timeout)
        threading.Thread(target=self._watch, name="remote_executor-reusable-idle", daemon=True).start()

    def usable(self) -> bool:
        core = self._core
        return not self._idle.retired and core.broken is None and not core.shutdown_requested

    def touch(self, timeout: float | None = None) -> None:
        idle = self._idle
        with idle.changed:
            idle.last_used = time.monotonic()
            if timeout is not None:
                idle.timeout = timeout
            idle.changed.notify()

    def retire(self) -> None:
        """Stop the watcher and shut down without waiting: calls already submitted still finish."""
        with self._idle.changed:
            self._idle.retired = True
            self._idle.changed.notify()
        self.shutdown(wait=False)

    # Every call goes through one of these two (submit, map, views).
    def _submit_limited(self, fn: Any, args: tuple[Any, ...], limit: float | None,
                        kwargs: dict[str, Any] | None = None) -> Future[Any]:
        self.touch()
        future = super()._submit_limited(fn, args, limit, kwargs)
        future.add_done_callback(self._on_done)  # idle time counts from the end of the last call
        return future

    def _submit_chunk(self, fn: Any, items: list[tuple[Any, ...]], limit: float | None) -> Future[Any]:
        self.touch()
        future = super()._submit_chunk(fn, items, limit)
        future.add_done_callback(self._on_done)
        return future

    def _on_done(self, future: Future[Any]) -> None:
        self.touch()

    def _watch(self) -> None:
        idle = self._idle
        while True:
            with idle.changed:
                while not idle.retired and (left := idle.remaining()) > 0:
                    idle.changed.wait(left)
                if idle.retired:
                    return
            if self._expire():
                return

    def _expire(self) -> bool:
        """The idle timeout passed: shut down unless a call is outstanding (or it was used meanwhile)."""
        global _current
        idle = self._idle
        with _lock, idle.changed:
            if idle.retired:
                return True
            if idle.remaining() > 0:
                return False  # used meanwhile
            if self._core.outstanding:
                idle.last_used = time.monotonic()  # a call runs longer than the timeout: look again later
                return False
            idle.retired = True
            if _current is self:
                _current = None
        self.shutdown(wait=False)
        return True
