"""Log lines that peers cannot forge or flood.

A worker's name, a client's name, a peer's reason for refusing us, a gearman job handle: text that crosses
the wire is the peer's to choose. Written into a log line as it is, a newline in it forges a second line
(``worker x attached\\n... ERROR something else``), and a peer that sends garbage in a loop fills the disk.
Every log line that repeats peer-supplied text passes it through :func:`printable`; every warning a peer
can trigger at will goes through a :class:`LogLimiter`.

Standard library only: every layer may import this module, the scheduler included (it passes its own
``now``, so it still never reads a clock).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["LogLimiter", "limited", "owner", "printable"]

MAX_TEXT = 200  # characters of peer text kept in one log line

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object, limit: int = MAX_TEXT) -> str:
    """``value`` as one line of at most about ``limit`` characters, safe to put in a log line.

    Bytes are decoded as UTF-8 (undecodable bytes as ``\\xNN``); every character that is not printable
    (newlines, other control characters, Unicode line separators, bidirectional overrides) is written as
    an escape, so the result never contains a line break and reads the same in any viewer; text beyond
    ``limit`` is cut, saying how much was left out."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", errors="backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    escaped = "".join(c if c.isprintable() else _escape(c) for c in text) if not text.isprintable() else text
    return f"{escaped}... ({cut} more characters)" if cut > 0 else escaped


def _escape(char: str) -> str:
    code = ord(char)
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@dataclass
class _Window:
    start: float
    count: int = 0
    suppressed: int = 0
    template: str = ""


class LogLimiter:
    """At most ``burst`` lines per key in each ``period`` seconds; the rest are counted, not logged.

    The last line allowed in a period says that more like it will be suppressed; the first line of a
    later period is preceded by one line saying how many were (``suppressed 4210 more like: ...``). Keys
    say what is "the same": a peer, a kind of bad input, or both. Only the ``max_keys`` most recently used
    keys are remembered, so a peer that invents keys cannot make the limiter grow. Thread-safe.
    """

    def __init__(self, burst: int = 5, period: float = 60.0, max_keys: int = 1024) -> None:
        if burst < 1 or period <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, period positive")
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object,
            now: float | None = None, stacklevel: int = 1) -> bool:
        """Log ``msg % args`` unless ``key`` used up its lines for this period; True if it was logged.

        ``now`` (seconds, any monotonic clock; ``time.monotonic()`` by default) lets a caller that keeps
        its own time (the scheduler) stay clock-free; ``stacklevel`` as for :meth:`logging.Logger.log`."""
        if not logger.isEnabledFor(level):
            return False
        at = time.monotonic() if now is None else now
        with self._lock:
            window, summary = self._window(key, at)
            window.count += 1
            if window.count > self.burst:
                window.suppressed += 1
                return False
            last = window.count == self.burst
            window.template = msg
        if summary is not None:
            logger.log(level, "suppressed %d more like: %s", summary[0], summary[1], stacklevel=stacklevel + 1)
        if last:
            msg += " (more like this suppressed for %gs)"
            args = (*args, self.period)
        logger.log(level, msg, *args, stacklevel=stacklevel + 1)  # the caller's file and line, not ours
        return True

    def _window(self, key: Hashable, at: float) -> tuple[_Window, tuple[int, str] | None]:
        """The current window of ``key`` (lock held), and what the one it replaces suppressed."""
        window = self._windows.get(key)
        summary = None
        if window is not None and at - window.start < self.period:
            self._windows.move_to_end(key)
            return window, None
        if window is not None and window.suppressed:
            summary = (window.suppressed, window.template)
        window = self._windows[key] = _Window(at)
        self._windows.move_to_end(key)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        return window, summary


_shared = LogLimiter()
_owners: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
_serials = itertools.count(1)
_owners_lock = threading.Lock()


def owner(obj: object) -> int:
    """A number for ``obj`` that no other object ever gets (unlike ``id()``, which a new object reuses once
    the old one is gone): put it in a limiter key, so a new server never inherits an old one's silence."""
    with _owners_lock:
        serial = _owners.get(obj)
        if serial is None:
            serial = _owners[obj] = next(_serials)
        return serial


def limited(logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object,
            now: float | None = None) -> bool:
    """:meth:`LogLimiter.log` on the process-wide limiter (5 lines per key per minute). Put the emitting
    object in the key (``(owner(self), "bad frame")``) so that one server's flood does not silence another."""
    return _shared.log(logger, level, key, msg, *args, now=now, stacklevel=2)
