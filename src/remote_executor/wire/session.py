"""Message authentication with fresh keys per connection and a sequence number per frame, sans I/O.

A connection opens with two frames signed by the long-term shared key::

    peer   -- OPEN [nonce_c] -------------------------->  server      (HMAC under the shared key)
    peer   <-- CHALLENGE [nonce_s] -------------------   server      (HMAC under the shared key, bound to nonce_c)

Both sides then derive one key per direction from the shared key and both nonces (HKDF-SHA256,
RFC 5869), and every later frame's HMAC covers an implicit sequence number: the n-th frame a side sends is
signed with ``seq = n``. So a recorded frame is worthless anywhere else: in another connection the keys
differ, and in the same connection its position does. HELLO, the first frame under the session keys, is
where a peer says who it is: nothing a peer says is parsed before it has proved it holds the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

from ..errors import AuthenticationError
from .serialization import Buffer

NONCE_SIZE = 32
MAC_SIZE = 32
_SALT_LABEL = b"remote_executor session v2"
_UP = b"peer to server"
_DOWN = b"server to peer"
# Frames whose parts total at most this many bytes are MACed over a joined copy in one call.
ONE_SHOT_MAX = 64 * 1024


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


class Mac:
    """One direction's authenticator: a key, and (for a session) the sequence number of the next frame.

    ``bind`` is mixed into every MAC, so a frame signed for one exchange (a CHALLENGE answering one OPEN)
    does not verify in another."""

    __slots__ = ("_keyed", "_seq", "sequenced")

    def __init__(self, key: bytes, *, sequenced: bool = False, bind: bytes = b"") -> None:
        # The HMAC state after the key and ``bind``, copied for each frame. Never ``hmac.digest``: its
        # one-shot C call releases the GIL even for a few bytes, and taking it back behind a busy thread
        # costs the switch interval (5 ms, measured with a spinning thread on 3.10-3.13); the copy, an
        # update and a digest keep the GIL for anything under 2 KiB, and cost less besides.
        self._keyed = hmac.new(key, bind, hashlib.sha256)
        self._seq = 0
        self.sequenced = sequenced

    def sign(self, prefix: Buffer, parts: Sequence[Buffer], nbytes: int | None = None) -> bytes:
        """The MAC of a frame (``prefix`` without the MAC, then the parts); ``nbytes``, the parts' total
        size if the caller knows it, lets a small frame be hashed in one update."""
        digest = self._digest(prefix, parts, nbytes)
        self._seq += 1
        return digest

    def verify(self, prefix: Buffer, parts: Sequence[Buffer], mac: Buffer, nbytes: int | None = None) -> None:
        if not hmac.compare_digest(self._digest(prefix, parts, nbytes), mac):
            raise AuthenticationError(
                "frame HMAC does not verify: wrong key, a tampered frame, or one replayed from elsewhere")
        self._seq += 1

    def _digest(self, prefix: Buffer, parts: Sequence[Buffer], nbytes: int | None) -> bytes:
        # The same HMAC either way, over bind | seq | prefix | parts. A small frame is joined and hashed in
        # one update, the fewest Python-level calls per frame, on every call a worker runs and on each side
        # of every socket. A large one is hashed piece by piece, uncopied.
        seq = self._seq.to_bytes(8, "big") if self.sequenced else b""
        digest = self._keyed.copy()
        if nbytes is not None and nbytes <= ONE_SHOT_MAX:
            digest.update(b"".join((seq, prefix, *parts)))
            return digest.digest()
        digest.update(seq)
        digest.update(prefix)
        for part in parts:
            digest.update(part)
        return digest.digest()


def as_mac(key: bytes | Mac | None) -> Mac | None:
    """A long-term key (frames outside a session: a Gearman job) as a :class:`Mac`."""
    return Mac(key) if isinstance(key, bytes) else key


def session_macs(key: bytes, nonce_peer: bytes, nonce_server: bytes, *, server: bool) -> tuple[Mac, Mac]:
    """``(send, receive)`` authenticators of one side of a session (HKDF-SHA256 over both nonces)."""
    prk = hmac.new(_SALT_LABEL + nonce_peer + nonce_server, key, hashlib.sha256).digest()  # HKDF-Extract
    up = hmac.new(prk, _UP + b"\x01", hashlib.sha256).digest()  # HKDF-Expand, one block per direction
    down = hmac.new(prk, _DOWN + b"\x01", hashlib.sha256).digest()
    send, receive = (down, up) if server else (up, down)
    return Mac(send, sequenced=True), Mac(receive, sequenced=True)
