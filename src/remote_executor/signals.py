"""SIGTERM and Ctrl-C handlers that never take a lock.

A Python signal handler runs on the main thread between two bytecodes, and that may be while the main
thread holds the lock of the very :class:`threading.Event` the handler means to set: ``Event.wait`` holds its
condition's lock on the way in and on the way out of every wait. ``Event.set`` takes that lock, so a handler
that calls it in that window waits for ever on its own thread, and the process never stops. (A worker
waiting out its reconnection backoff, or a command polling ``stop.wait(0.1)``, is in that window a few
microseconds in every wait: rare, but a fleet of workers stopped every day meets it.)

The handlers here only write a flag, which :meth:`SignalEvent.is_set` and :meth:`SignalEvent.wait` read at
once, and a byte to a pipe; a helper thread then sets the event for real, which wakes the other waiters,
and runs whatever the command does on a stop."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalEvent(threading.Event):
    """A :class:`threading.Event` that a signal handler may set, through :meth:`set_from_handler`."""

    def set_from_handler(self) -> None:
        """Seen at once by :meth:`is_set` and by every later :meth:`wait`; threads already blocked in ``wait``
        wake when the helper thread of :func:`set_on_signals` calls :meth:`set`.

        It writes the flag that ``is_set`` reads (CPython's ``Event`` keeps it in ``_flag``, read without
        the lock) rather than overriding ``is_set``: a worker asks it once per call, and an override would
        add a Python call to every one."""
        self._flag = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._flag or super().wait(timeout)  # set by a handler: no need for the lock the helper wants


def set_on_signals(event: SignalEvent, then: Callable[[], object] | None = None,
                   signums: Iterable[int] = STOP_SIGNALS, again: Callable[[], None] | None = None) -> None:
    """On any of ``signums``, set ``event`` and then call ``then`` (on a helper thread, so it may take locks).

    A signal that comes when ``event`` is already set calls ``again`` in the handler (to stop at once, say)
    or is ignored. Call from the main thread, as :func:`signal.signal` requires. A process forked from this
    one before it installs its own handlers gets the default action of the signal, not this one's stop."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_end, False)
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a child between fork and its own set-up: the pipe is its parent's
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if event.is_set():
            if again is not None:
                again()
            return
        event.set_from_handler()
        try:
            os.write(write_end, b"s")
        except OSError:  # the pipe is full: the helper thread has bytes to read already
            pass

    def helper() -> None:
        os.read(read_end, 1)
        event.set()
        if then is not None:
            then()

    threading.Thread(target=helper, name="remote-executor-signals", daemon=True).start()
    for signum in signums:
        signal.signal(signum, handler)
