"""Authenticated encryption of whole messages under the shared key, sans I/O (AES-256-GCM from ``cryptography``).

A sealed message::

    magic "RS" | version u8 | session salt (16 bytes) | nonce (12 random bytes) | segment 0 | ... | segment n-1

Keys. ``HKDF-SHA256(shared key, info=purpose)`` gives a root key per purpose: the shared key also signs our
frames with HMAC, and a key must never serve two algorithms, so every use of it derives its own. A sender
then works in *sessions*: a random 16-byte salt and the session key ``HKDF-Expand(root, "session key" |
salt)``, renewed every ``SESSION_MESSAGES`` messages; a receiver keeps the keys of the last few sessions it
verified. Each message has a fresh random 96-bit nonce. Why sessions: making an AES-GCM key costs more than
sealing a small message, so a key per message would double the per-call cost; one key for the cluster's
life would meet GCM's limit for random nonces (about 2**32 messages per key, past which a repeated nonce
becomes likely and gives away the authentication key). A session seals at most 2**24 messages (a nonce
collision chance below 2**-48), and 128-bit salts make two sessions sharing a key negligible.

Segments. The plaintext is cut into ``SEGMENT_SIZE`` pieces (the last shorter, possibly empty), each sealed
as ``ciphertext | 16-byte tag`` under the message nonce XOR (last-segment flag, segment number): segments
cannot be reordered, dropped or cut off at the end without a tag failing. Segments keep each AES-GCM call
under ``cryptography``'s 2 GiB limit, and let :meth:`Sealer.open` authenticate the first segment before it
allocates room for the whole plaintext. Every segment's associated data is the header (magic, version,
salt, nonce) plus the caller's associated data (what the message is and whom it is for).

Nothing here does I/O; ``cryptography`` is imported when the first :class:`Sealer` is made, and its absence
is a clear :class:`CryptographyMissingError` naming ``pip install 'remote-executor[crypto]'``.
"""

from __future__ import annotations

import collections
import hmac
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final

from ..errors import AuthenticationError, TransportError
from .entropy import random_bytes
from .serialization import Buffer

__all__ = ["CryptographyMissingError", "Sealer", "is_sealed", "require_cryptography", "sealed_size"]

MAGIC: Final = b"RS"
VERSION: Final = 1
SALT_SIZE: Final = 16
NONCE_SIZE: Final = 12
HEADER_SIZE: Final = len(MAGIC) + 1 + SALT_SIZE + NONCE_SIZE
TAG_SIZE: Final = 16
SEGMENT_SIZE: Final = 1 << 20  # part of the format (version 1): both sides must agree
SESSION_MESSAGES: Final = 1 << 24  # a sender's messages per session key
OPEN_SESSIONS: Final = 256  # session keys a receiver keeps (one per peer process, typically)
_SESSION_INFO: Final = b"remote_executor session key "
_LAST: Final = 1 << 64  # the last-segment flag, XORed into the nonce above the 64-bit segment number
INSTALL_HINT: Final = "pip install 'remote-executor[crypto]'"


class CryptographyMissingError(TransportError, ImportError):
    """Encryption was asked for (a key with the gearman transport) but ``cryptography`` is not installed."""


def require_cryptography(what: str) -> None:
    """Raise :class:`CryptographyMissingError` unless ``cryptography`` can be imported; ``what`` needs it."""
    _load(what)


def _load(what: str) -> Any:
    """The ``cryptography`` names this module uses, imported on first use."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as exc:
        raise CryptographyMissingError(
            f"{what} needs the 'cryptography' package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return InvalidTag, hashes, AESGCM, HKDF


def is_sealed(message: Buffer) -> bool:
    """True if ``message`` starts like a sealed message (it may still fail to open)."""
    return bytes(memoryview(message)[: len(MAGIC)]) == MAGIC


def sealed_size(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The size of the sealed form of ``plaintext_size`` bytes."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * _segment_count(plaintext_size, segment_size)


def _segment_count(plaintext_size: int, segment_size: int) -> int:
    return max(1, -(-plaintext_size // segment_size))


class Sealer:
    """Seals and opens messages under one shared key, for one purpose (domain separation). Thread-safe."""

    def __init__(self, shared_key: bytes, purpose: bytes, *, segment_size: int = SEGMENT_SIZE,
                 what: str = "encryption") -> None:
        if not shared_key:
            raise ValueError("an empty key is no key")
        if segment_size < 1:
            raise ValueError(f"segment_size must be positive, not {segment_size}")
        self._invalid_tag, hashes, self._aead_class, hkdf = _load(what)
        self._root = hkdf(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(shared_key)
        self._segment = segment_size
        # encrypt_into/decrypt_into (recent cryptography releases; not 42) write in place; older ones return bytes.
        self._in_place = hasattr(self._aead_class, "encrypt_into")
        self._lock = threading.Lock()
        self._session: tuple[bytes, Any] = (b"", None)
        self._sealed_in_session = SESSION_MESSAGES  # so the first seal starts a session
        self._opened: collections.OrderedDict[bytes, Any] = collections.OrderedDict()  # salt -> AESGCM

    def seal(self, plaintext: Sequence[Buffer], associated: bytes) -> bytearray:
        """The sealed form of the concatenation of ``plaintext`` (not copied as a whole), bound to
        ``associated``: opening it needs the same key, purpose and associated data."""
        total = sum(memoryview(b).nbytes for b in plaintext)
        count = _segment_count(total, self._segment)
        salt, aead = self._sending_session()
        nonce = random_bytes(NONCE_SIZE)
        header = MAGIC + bytes([VERSION]) + salt + nonce
        out = bytearray(HEADER_SIZE + total + TAG_SIZE * count)
        out[:HEADER_SIZE] = header
        ad, base = header + associated, int.from_bytes(nonce, "big")
        view, pos = memoryview(out), HEADER_SIZE
        for index, piece in enumerate(_pieces(plaintext, total, self._segment)):
            end = pos + memoryview(piece).nbytes + TAG_SIZE
            if self._in_place:
                aead.encrypt_into(_nonce(base, index, count), piece, ad, view[pos:end])
            else:  # pragma: no cover - older cryptography (tested with 42)
                view[pos:end] = aead.encrypt(_nonce(base, index, count), bytes(piece), ad)
            pos = end
        return out

    def open(self, sealed: Buffer, associated: bytes) -> bytes | bytearray:
        """The plaintext of a sealed message, once every segment has verified; raises
        :class:`AuthenticationError` for anything else (another key, purpose or associated data, a
        tampered, truncated or extended message, or no sealed message at all)."""
        view = memoryview(sealed).cast("B")
        if view.nbytes < HEADER_SIZE + TAG_SIZE or bytes(view[: len(MAGIC)]) != MAGIC:
            raise AuthenticationError(f"not an encrypted message ({view.nbytes} bytes)")
        if view[len(MAGIC)] != VERSION:
            raise AuthenticationError(f"encrypted message of an unknown format version {view[len(MAGIC)]}")
        header = bytes(view[:HEADER_SIZE])
        body = view.nbytes - HEADER_SIZE
        stride = self._segment + TAG_SIZE
        count = -(-body // stride)
        if body - (count - 1) * stride < TAG_SIZE:
            raise AuthenticationError("encrypted message truncated inside a segment's tag")
        salt = header[HEADER_SIZE - NONCE_SIZE - SALT_SIZE : HEADER_SIZE - NONCE_SIZE]
        aead, known = self._receiving_session(salt)
        ad, base = header + associated, int.from_bytes(header[-NONCE_SIZE:], "big")
        # The first segment is authenticated before room for the whole plaintext is allocated, and before
        # a new session's key is remembered (so forgeries cannot flush the cache).
        first = self._open_segment(aead, _nonce(base, 0, count), view[HEADER_SIZE : HEADER_SIZE + min(stride, body)],
                                   ad, 0, count)
        if not known:
            self._remember(salt, aead)
        if count == 1:  # the common case, a small message: no second copy
            return first
        out = bytearray(body - TAG_SIZE * count)
        out[: len(first)] = first
        out_view, pos_in, pos_out = memoryview(out), HEADER_SIZE + stride, len(first)
        for index in range(1, count):
            segment = view[pos_in : pos_in + stride]
            size = segment.nbytes - TAG_SIZE
            nonce = _nonce(base, index, count)
            if self._in_place:
                self._open_into(aead, nonce, segment, ad, out_view[pos_out : pos_out + size], index, count)
            else:  # pragma: no cover - older cryptography (tested with 42)
                out_view[pos_out : pos_out + size] = self._open_segment(aead, nonce, segment, ad, index, count)
            pos_in, pos_out = pos_in + stride, pos_out + size
        return out

    # --- sessions -----------------------------------------------------------------------------------------

    def _sending_session(self) -> tuple[bytes, Any]:
        with self._lock:
            if self._sealed_in_session >= SESSION_MESSAGES:
                salt = os.urandom(SALT_SIZE)
                self._session, self._sealed_in_session = (salt, self._session_aead(salt)), 0
            self._sealed_in_session += 1
            return self._session

    def _receiving_session(self, salt: bytes) -> tuple[Any, bool]:
        """The session's cipher, and whether it is a session already verified."""
        with self._lock:
            aead = self._opened.get(salt)
            if aead is not None:
                self._opened.move_to_end(salt)
                return aead, True
        return self._session_aead(salt), False

    def _remember(self, salt: bytes, aead: Any) -> None:
        with self._lock:
            self._opened[salt] = aead
            while len(self._opened) > OPEN_SESSIONS:
                self._opened.popitem(last=False)

    def _session_aead(self, salt: bytes) -> Any:
        """AES-256-GCM under HKDF-Expand (RFC 5869; one HMAC block for 32 bytes) of the root key, the
        session's salt in the info."""
        return self._aead_class(hmac.digest(self._root, _SESSION_INFO + salt + b"\x01", "sha256"))

    # --- segments -----------------------------------------------------------------------------------------

    def _open_segment(self, aead: Any, nonce: bytes, segment: memoryview, ad: bytes, index: int,
                      count: int) -> bytes:
        try:
            plain: bytes = aead.decrypt(nonce, bytes(segment), ad)
        except self._invalid_tag:
            raise _failed(index, count) from None
        return plain

    def _open_into(self, aead: Any, nonce: bytes, segment: memoryview, ad: bytes, out: memoryview, index: int,
                   count: int) -> None:
        try:
            aead.decrypt_into(nonce, segment, ad, out)
        except self._invalid_tag:
            raise _failed(index, count) from None


def _nonce(base: int, index: int, count: int) -> bytes:
    """Segment ``index``'s nonce: the message's random nonce XOR (last-segment flag, segment number)."""
    return (base ^ (_LAST if index == count - 1 else 0) ^ index).to_bytes(NONCE_SIZE, "big")


def _failed(index: int, count: int) -> AuthenticationError:
    return AuthenticationError(
        f"encrypted message does not verify (segment {index + 1} of {count}): another key, a message meant "
        f"for something else, or tampered with"
    )


def _pieces(buffers: Sequence[Buffer], total: int, size: int) -> Iterator[Buffer]:
    """The concatenation of ``buffers`` (``total`` bytes) cut into ``size``-byte pieces, the last shorter
    (empty only if it all is): a view where a piece lies within one buffer, a joined copy only where it
    spans several."""
    if total <= size:  # the common case, a small message: one piece
        yield buffers[0] if len(buffers) == 1 else b"".join(buffers)
        return
    pending: list[memoryview] = []
    filled = 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        offset = 0
        while offset < view.nbytes:
            take = min(size - filled, view.nbytes - offset)
            piece = view[offset : offset + take]
            offset += take
            if not pending and take == size:
                yield piece
                continue
            pending.append(piece)
            filled += take
            if filled == size:
                yield b"".join(pending)
                pending, filled = [], 0
    if pending:
        yield b"".join(pending)
