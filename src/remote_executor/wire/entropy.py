"""Random bytes for the per-message hot path (AEAD nonces, job ids), drawn from the OS in blocks.

``os.urandom`` releases the GIL for its system call, even for 12 bytes; taking the GIL back behind a busy
Python thread (a caller submitting while the I/O thread seals a job) costs up to the switch interval, 5 ms.
Drawing a block and handing out slices costs one system call per ``BLOCK_SIZE`` bytes and keeps the GIL
otherwise. The bytes are the kernel's CSPRNG output either way, each handed out once.

A forked child starts with an empty block, never the parent's rest: two processes sealing under one
inherited key must not share a nonce.
"""

from __future__ import annotations

import os
import threading

__all__ = ["BLOCK_SIZE", "random_bytes"]

BLOCK_SIZE = 4096


class _Pool:
    __slots__ = ("_block", "_lock", "_pos")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n > BLOCK_SIZE // 4:
            return os.urandom(n)  # large requests are rare: not worth a block
        with self._lock:
            pos = self._pos
            if pos + n > len(self._block):
                self._block, pos = os.urandom(BLOCK_SIZE), 0
            self._pos = pos + n
            return self._block[pos:pos + n]

    def forget(self) -> None:
        # After fork, in the only thread of the child: the lock may have been held by a parent thread.
        self._lock = threading.Lock()
        self._block, self._pos = b"", 0


_pool = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.forget)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS's CSPRNG, never handed out twice (also not to a forked child). Thread-safe."""
    return _pool.take(n)
