"""Child processes that die with their parent even while stuck in C code: ``PR_SET_PDEATHSIG`` (Linux).

A worker notices that its supervisor is gone through its lifeline pipe, read by a Python thread; a call
stuck in C code that holds the GIL starves that thread, and the orphan would run on at full speed. The
kernel's parent-death signal needs nothing of the child. Its caveat: it fires when the *thread* that forked
the child exits, not the process. So it is only set where that thread lives as long as the children should:
the fork server's only thread, the caller's only thread when the first workers are forked from the
executor's own process, the thread that owns an embedded gearmand.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def prepare() -> Callable[[], None] | None:
    """The function a child calls first thing after the fork: the kernel SIGKILLs it when the forking thread
    exits, and it exits at once if its parent is already gone. None where this cannot be had (not Linux, no
    ``prctl``). Resolved here, in the parent: loading a library between fork and exec can deadlock in a
    process that runs threads, while calling an already-resolved C function cannot."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the C library the interpreter itself runs on
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return die_with_parent
