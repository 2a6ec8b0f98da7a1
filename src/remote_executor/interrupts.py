"""Holding Ctrl-C off a short section of the main thread that must not be left half done.

Python runs a signal's handler on the main thread at the next function call or loop it reaches, and the
default SIGINT handler raises ``KeyboardInterrupt`` there. A caller that drives the embedded job server
(its scheduler and the writes to workers) stops at such a point with the scheduler half updated: a call
taken from a queue but never sent, which nothing would ever run or report. :func:`hold` swaps in a
handler that only notes the signal, for the section; :meth:`Held.restore` puts the user's handler back
and :meth:`Held.deliver` runs it if the signal came meanwhile, once the section is done.

Only SIGINT, only on the main thread (the only one Python runs handlers on), only while its handler is a
Python function (not ``SIG_IGN`` or ``SIG_DFL``). Other threads drive the server without this: no signal
handler ever runs on them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class Held:
    """The user's SIGINT handler, set aside by :func:`hold`, and the signal it missed, if any."""

    __slots__ = ("_frame", "_handler", "_missed")

    def __init__(self, handler: Callable[[int, FrameType | None], Any]) -> None:
        self._handler = handler
        self._missed = False
        self._frame: FrameType | None = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._missed, self._frame = True, frame

    def restore(self) -> None:
        """Put the user's handler back."""
        signal.signal(signal.SIGINT, self._handler)

    def deliver(self) -> None:
        """Run the user's handler if the signal came while it was set aside (the default one raises
        ``KeyboardInterrupt``); after :meth:`restore`."""
        if self._missed:
            self._missed = False
            self._handler(signal.SIGINT, self._frame)


def hold() -> Held | None:
    """Note SIGINT instead of handling it until :meth:`Held.restore`; None (nothing to release) off the
    main thread, or when SIGINT has no Python handler."""
    if threading.get_ident() != threading.main_thread().ident:  # (main_thread(): a fork changes it)
        return None
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        return None
    held = Held(handler)
    try:
        signal.signal(signal.SIGINT, held._note)
    except ValueError:  # not the main interpreter
        return None
    return held
