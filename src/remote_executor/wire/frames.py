"""The frame format of the tcp and zmq transports (and of Gearman job payloads), sans I/O.

A frame is a fixed 24-byte header, one uint64 length per part, an optional 32-byte HMAC-SHA256, then the
parts themselves::

    magic "RE" | version u8 | type u8 | nparts u16 | flags u16 | a u64 | b u64 | lengths u64 * nparts | mac | parts

``a`` and ``b`` are two integers whose meaning depends on the type (a task id, a status, a capacity); the
``KEYED`` flag says a MAC follows. The header is validated before anything is allocated for the parts,
and the HMAC (over header, lengths and parts, and within a session the frame's sequence number: see
:mod:`.session`) is checked before a frame is handed on, so nothing is ever unpickled unauthenticated.
The job server forwards parts as opaque bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import AuthenticationError, KeyRejectedError, ProtocolError
from .serialization import Buffer, Parts
from .session import MAC_SIZE, Mac, as_mac

MAGIC = b"RE"
NOT_STARTED = b"not started"  # the part of a REQUEUED frame for a call a stopping server will never start
LOST_ON = b"lost on"  # a REQUEUED frame's first part when its second names the worker the call was lost with
VERSION = 5  # 2: the KEYED flag, attempt counts in SUBMIT, REQUEUED; 3: time limits (LIMITED), TIMED_OUT;
# 4: broadcast (WORKERS, PINNED), status for clients, worker host/pid in HELLO, STOP; 5: a call's function
# shipped by value travels as its own pickle (an older worker could not run it)
HEADER = struct.Struct("!2sBBHHQQ")
_HEADER_SIZE = HEADER.size
# A flag bit every signed frame carries, so a reader knows from the header alone whether a MAC follows:
# a key on one side only is a clear error at once, never a frame misparsed around a MAC.
KEYED = 0x8000
# What a job server answers, unsigned, to a first frame signed with another key (or with none where it needs
# one, or with one where it has none), and what a peer that reads such an answer is told.
KEY_REJECTED = "the job server rejected our key: a wrong key, or none where it needs one (or one where it has none)"
# SUBMIT and TASK: the call has a run-time limit, carried as the first part (wire.messages.split_limit).
# A flag rather than a field, so a call without a limit costs nothing on the wire.
LIMITED = 0x4000
# SUBMIT: the call must run on one named worker (a broadcast), carried as the first part (before the limit);
# it is never run elsewhere, and fails at once if that worker is gone (wire.messages.split_pinned).
PINNED = 0x2000
# RESULT (worker -> server): the outcome is an error (the call raised, or could not be unpickled, or its
# result could not be pickled), so the server counts the call as failed for its worker (status). A worker
# older than the flag never sets it: its failures count as 0. The server does not pass it on.
FAILED = 0x1000
DEFAULT_MAX_FRAME = 1 << 32  # 4 GiB: a whole frame, header and parts
DEFAULT_MAX_PARTS = 1024
# Parts at least this big are received straight into their own buffer instead of the staging buffer.
DIRECT_READ_THRESHOLD = 256 * 1024
STAGING_SIZE = 512 * 1024
FIRST_DIRECT_SIZE = 1 << 20  # a large part's buffer starts here and doubles as its bytes arrive


class FrameSizeError(ProtocolError):
    """A frame announces more bytes than the receiver's limit (told from its prefix, before any MAC)."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(f"frame of {total} bytes exceeds the limit of {limit} bytes")
        self.total = total
        self.limit = limit

    def __reduce__(self) -> tuple[type[FrameSizeError], tuple[int, int]]:
        return (type(self), (self.total, self.limit))


class Kind(enum.IntEnum):
    """Frame types. Direction and the meaning of ``a``/``b`` are given per type."""

    HELLO = 1  # peer -> server, first under the session keys: parts [json info, *initializer parts]
    WELCOME = 2  # server -> peer: parts [json info]
    REJECT = 3  # server -> peer: parts [utf-8 reason]; the server then closes
    SUBMIT = 4  # client -> server: a=client task id, b=times it may already have run, parts=[limit?, *call]
    TASK = 5  # server -> worker: a=server task id, b=executor id, parts=[limit?, *call]
    RESULT = 6  # worker -> server: a=server task id, b=DONE or TIMED_OUT; server -> client: a=client task id,
    #             b=Status
    INIT = 7  # server -> worker: a=executor id, parts=initializer
    INIT_FAILED = 8  # worker -> server: a=executor id, parts=error outcome
    BROKEN = 9  # server -> client: parts=error outcome of the initializer
    CAPACITY = 10  # server -> client: a=free-or-busy worker slots attached to the server
    HEARTBEAT = 11  # any direction: "I am alive"
    DRAIN = 12  # worker -> server: finish what I run, send me nothing new; server -> worker: exit now
    #           (b=1: for good, the job server was stopped with its workers: do not restart)
    STATUS = 13  # admin or client -> server: a=request id; server -> it: a=request id, parts [json status]
    REQUEUED = 14  # server -> client: a=client task id, b=times it may have run (its worker was lost);
    #              parts [NOT_STARTED]: a stopping server will not start it (resubmit it, counting nothing);
    #              then [LOST_ON, utf-8 name]: the worker it was lost with (for WorkerLostError.workers)
    OPEN = 15  # peer -> server, first frame: parts [nonce]; signed with the shared key (wire.session)
    CHALLENGE = 16  # server -> peer: parts [nonce]; signed with the shared key, bound to the peer's nonce
    STARTED = 17  # server -> client: a=client task id: a worker has the call (sent for calls with a limit)
    WORKERS = 18  # client -> server: a=request id; server -> client: a=request id, parts [json {"workers": [names]}]
    #             (the workers of the client's pool that take calls now: the targets of a broadcast)
    STOP = 19  # admin -> server: b=1 to stop its workers too; server -> admin: parts [json]: stopping;
    #          server -> client, last: stopped, nothing runs: no call without an answer ever started here


class Status(enum.IntEnum):
    """What a RESULT frame to a client carries."""

    DONE = 0  # parts: an outcome envelope from the worker (serialization.decode_outcome)
    WORKER_LOST = 1  # parts: [json {"workers": [...], "attempts": n}]
    REJECTED = 2  # parts: [utf-8 reason]: the server refused the task (executor broken, bad input)
    TIMED_OUT = 3  # parts: [json {"worker": name, "limit": seconds}]: stopped at its time limit, not retried


@dataclass(slots=True)
class Frame:
    kind: Kind
    a: int = 0
    b: int = 0
    parts: Parts = field(default_factory=list)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = DEFAULT_MAX_FRAME
    max_parts: int = DEFAULT_MAX_PARTS


def encode(frame: Frame, key: bytes | Mac | None = None) -> list[Buffer]:
    """Buffers to send, in order: the prefix (header, lengths, mac) then the parts, uncopied.

    With a session's :class:`Mac`, the frame takes the next sequence number: encode exactly the frames
    that are sent, in the order they are sent."""
    parts = frame.parts
    lengths = _lengths(parts)
    if frame.flags & KEYED:
        raise ValueError(f"frame flags {frame.flags:#x} claim the KEYED bit, which encode() alone sets")
    mac = key if key is None or type(key) is Mac else as_mac(key)
    flags = frame.flags | (KEYED if mac is not None else 0)
    prefix = HEADER.pack(MAGIC, VERSION, frame.kind, len(lengths), flags, frame.a, frame.b)
    prefix += struct.pack(f"!{len(lengths)}Q", *lengths)
    if mac is not None:
        prefix += mac.sign(prefix, parts, sum(lengths))
    return [prefix, *parts]


def _lengths(parts: Sequence[Buffer]) -> list[int]:
    """Each part's size in bytes. A loop, not a comprehension: one Python call fewer per frame on 3.10/3.11,
    and bytes (most parts) need no memoryview to be measured."""
    lengths: list[int] = []
    for part in parts:
        lengths.append(len(part) if type(part) is bytes else memoryview(part).nbytes)
    return lengths


def frame_size(frame: Frame, keyed: bool) -> int:
    """The bytes ``frame`` takes on the wire, as a reader's ``limits.max_frame`` counts them."""
    return HEADER.size + 8 * len(frame.parts) + (MAC_SIZE if keyed else 0) + sum(_lengths(frame.parts))


def encode_bytes(frame: Frame, key: bytes | Mac | None = None) -> bytes:
    """The whole frame as one bytes object (small frames, tests)."""
    return b"".join(bytes(b) if not isinstance(b, bytes) else b for b in encode(frame, key))


DEFAULT_LIMITS = Limits()
# What either side takes from the other before it has proved it holds the key: the server until the peer's
# HELLO verifies under the session keys (an OPEN proves nothing, a recorded one replays), a client or worker
# until the server's CHALLENGE verifies (it answers this connection's fresh nonce).
PRE_SESSION_LIMITS = Limits(max_frame=64 * 1024, max_parts=4)


def pre_session(limits: Limits) -> Limits:
    """``limits``, no larger than :data:`PRE_SESSION_LIMITS`."""
    return Limits(min(limits.max_frame, PRE_SESSION_LIMITS.max_frame),
                  min(limits.max_parts, PRE_SESSION_LIMITS.max_parts))


class FrameReader:
    """Incremental, validating frame decoder for a byte stream.

    Use: ``buf = reader.buffer()``; ``n = sock.recv_into(buf)``; ``frames = reader.feed(n)``. Small
    frames are parsed out of one staging buffer; a large part gets a buffer of its own that the socket
    reads into directly, so a 100 MB argument is copied once (kernel to its final buffer).
    """

    def __init__(self, key: bytes | Mac | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.mac = as_mac(key)  # replaced by the session's once the handshake has derived it
        self.limits = limits  # raised once the peer has authenticated
        self._staging = bytearray(STAGING_SIZE)
        self._start = 0  # first unparsed byte in staging
        self._end = 0  # end of received bytes in staging
        self._pending: _Partial | None = None  # a frame whose header is parsed, parts incomplete

    def buffer(self) -> memoryview:
        """Where the next received bytes must be written."""
        direct = self._pending.direct_target() if self._pending is not None else None
        if direct is not None:
            return direct
        if self._end == len(self._staging):
            self._compact()
        return memoryview(self._staging)[self._end :]

    @property
    def mid_frame(self) -> bool:
        """True if part of a frame has arrived but not all of it (a truncated frame at end of stream)."""
        return self._pending is not None or self._end > self._start

    def feed(self, nbytes: int) -> list[Frame]:
        """Account for ``nbytes`` written into :meth:`buffer`; return the frames now complete."""
        if self._pending is not None and self._pending.direct_target() is not None:
            self._pending.advance_direct(nbytes)
        else:
            self._end += nbytes
        return self._parse()

    def _compact(self) -> None:
        used = self._end - self._start
        if self._start == 0 and used == len(self._staging):
            # A prefix bigger than staging: grow into a new buffer (the caller may still hold a view of
            # the old one, which a resize in place would refuse).
            self._staging = self._staging + bytes(len(self._staging))
            return
        self._staging[:used] = self._staging[self._start : self._end]
        self._start, self._end = 0, used

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        while self._pending is not None or self._start < self._end:
            if self._pending is None:
                whole = self._whole_frame()  # the common case: a small frame wholly in staging
                if whole is not None:
                    frames.append(whole)
                    continue
                self._pending = self._parse_prefix()
                if self._pending is None:
                    break
            complete = self._pending.take(self._staging_view())
            self._start += self._pending.consumed_from_staging
            if not complete:
                break
            frames.append(self._finish(self._pending))
            self._pending = None
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _whole_frame(self) -> Frame | None:
        """The next frame if it is all in staging and its prefix passes every check, else None: then
        :meth:`_parse_prefix` takes it, and it is the one that says what is wrong with a bad prefix.

        The same checks as :func:`parse_prefix`, in the same order, then the HMAC before the frame is handed
        on; written out here because this is every call's path on both sides of a socket, where the general
        parser's layers (a prefix object, a property, a header check) cost more than the parsing."""
        start = self._start
        available = self._end - start
        if available < _HEADER_SIZE:
            return None
        staging = self._staging
        magic, version, kind, nparts, flags, a, b = HEADER.unpack_from(staging, start)
        mac = self.mac
        size = _HEADER_SIZE + 8 * nparts + (MAC_SIZE if mac is not None else 0)
        if (magic != MAGIC or version != VERSION or kind not in _KINDS or nparts > self.limits.max_parts
                or bool(flags & KEYED) != (mac is not None) or available < size):
            return None
        lengths = struct.unpack_from(f"!{nparts}Q", staging, start + _HEADER_SIZE)
        body = sum(lengths)
        if size + body > self.limits.max_frame or size + body > available:
            return None
        view = memoryview(staging)
        parts: Parts = []
        offset = start + size
        for length in lengths:
            parts.append(bytes(view[offset : offset + length]))
            offset += length
        if mac is not None:
            mac_at = start + size - MAC_SIZE
            mac.verify(view[start:mac_at], parts, view[mac_at : start + size], body)
        self._start = offset
        return Frame(_KINDS[kind], a, b, parts, flags & ~KEYED)

    def _staging_view(self) -> memoryview:
        return memoryview(self._staging)[self._start : self._end]

    def _parse_prefix(self) -> _Partial | None:
        """The next frame's parsed prefix, once it is all in staging (its parts are collected next)."""
        start = self._start
        prefix = parse_prefix(memoryview(self._staging)[start : self._end], self.mac is not None, self.limits)
        if prefix is None:
            return None
        raw = bytes(self._staging[start : start + prefix.size])
        self._start += prefix.size
        return _Partial(prefix.frame([]), raw, list(prefix.lengths))

    def _finish(self, partial: _Partial) -> Frame:
        if self.mac is not None:
            _verify(self.mac, partial.prefix, partial.frame.parts, sum(partial.lengths))
        return partial.frame


def _verify(mac: Mac, prefix: Buffer, parts: Sequence[Buffer], nbytes: int | None = None) -> None:
    """Check the HMAC at the end of ``prefix`` against the rest of the prefix and the parts (``nbytes`` in
    all, if known)."""
    view = memoryview(prefix).cast("B")
    mac.verify(view[:-MAC_SIZE], parts, view[-MAC_SIZE:], nbytes)


_KINDS = {int(kind): kind for kind in Kind}


def decode_parts(prefix: Buffer, parts: Sequence[Buffer], key: bytes | Mac | None = None,
                 limits: Limits = DEFAULT_LIMITS, *, parsed: Prefix | None = None) -> Frame:
    """Validate a frame that arrived already split into its prefix and parts (a zmq multipart message).

    The same checks as :class:`FrameReader`, in the same order: header, part count and lengths, size limit,
    then the HMAC; the parts are handed on as they are (no copy). ``parsed``: what :func:`parse_prefix`
    made of this very ``prefix`` with this key and these limits, if the caller has it already."""
    view = memoryview(prefix).cast("B")
    if view.nbytes < HEADER.size:
        raise ProtocolError(f"truncated frame header ({view.nbytes} bytes)")
    mac = key if key is None or type(key) is Mac else as_mac(key)
    if parsed is None:
        parsed = parse_prefix(view, mac is not None, limits)
    if parsed is None or view.nbytes != parsed.size:
        expected = "" if parsed is None else f", expected {parsed.size}"
        raise ProtocolError(f"frame prefix of {view.nbytes} bytes{expected} (truncated, or a key mismatch?)")
    if len(parts) != len(parsed.lengths):
        raise ProtocolError(f"frame announces {parsed.nparts} parts but {len(parts)} arrived")
    sizes = _lengths(parts)
    if tuple(sizes) != parsed.lengths:
        raise ProtocolError(f"frame part lengths {sizes} differ from the announced {list(parsed.lengths)}")
    if mac is not None:
        _verify(mac, view, parts, sum(sizes))
    return parsed.frame(list(parts))


def decode_whole(payload: Buffer, key: bytes | Mac | None = None, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Validate one frame that fills ``payload`` exactly (a Gearman job); the parts are views, not copies."""
    view = memoryview(payload).cast("B")
    mac = as_mac(key)
    parsed = parse_prefix(view, mac is not None, limits)
    if parsed is None:
        raise ProtocolError(f"truncated frame prefix ({view.nbytes} bytes)")
    if parsed.total != view.nbytes:
        hint = " (signed with a key on one side only?)"
        raise ProtocolError(f"frame of {view.nbytes} bytes does not match its announced {parsed.total}{hint}")
    parts: list[Buffer] = []
    offset = parsed.size
    for length in parsed.lengths:
        parts.append(view[offset : offset + length])
        offset += length
    if mac is not None:
        _verify(mac, view[: parsed.size], parts, parsed.total - parsed.size)
    return parsed.frame(parts)


@dataclass(frozen=True, slots=True)
class Prefix:
    """A validated frame prefix: the header fields and the announced part lengths."""

    kind: Kind
    flags: int
    a: int
    b: int
    lengths: tuple[int, ...]
    size: int  # bytes of the prefix itself: header, lengths and MAC

    @property
    def nparts(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return self.size + sum(self.lengths)

    def frame(self, parts: Parts) -> Frame:
        return Frame(self.kind, self.a, self.b, parts, self.flags)


def parse_prefix(data: Buffer, keyed: bool, limits: Limits = DEFAULT_LIMITS) -> Prefix | None:
    """The one frame-prefix parser: None until the whole prefix is in ``data``, else the checked prefix.

    Raises :class:`ProtocolError` for a bad header, too many parts or a frame over ``limits.max_frame``, as
    soon as the bytes that show it are there: nothing waits for, or allocates, the announced parts."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER.size:
        return None
    magic, version, kind, nparts, flags, a, b = HEADER.unpack_from(view)
    _check_header(magic, version, kind, nparts, limits)
    if bool(flags & KEYED) != keyed:
        if keyed and kind == Kind.REJECT:  # a server cannot sign for a key it does not share with us
            raise KeyRejectedError(KEY_REJECTED)
        raise AuthenticationError("the peer signs its frames with a key but this side has none" if not keyed else
                                  "the peer sends unsigned frames but this side has a key: the keys differ")
    flags &= ~KEYED
    size = HEADER.size + 8 * nparts + (MAC_SIZE if keyed else 0)
    if view.nbytes < size:
        return None
    lengths = struct.unpack_from(f"!{nparts}Q", view, HEADER.size)
    total = size + sum(lengths)
    if total > limits.max_frame:
        raise FrameSizeError(total, limits.max_frame)
    return Prefix(_KINDS[kind], flags, a, b, lengths, size)


def _check_header(magic: bytes, version: int, kind: int, nparts: int, limits: Limits) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}: not a remote_executor peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown frame type {kind}")
    if nparts > limits.max_parts:
        raise ProtocolError(f"frame has {nparts} parts, more than the limit of {limits.max_parts}")


class _Partial:
    """A frame whose prefix is parsed and whose parts are being collected.

    A large part is received in place, into a buffer that grows with the bytes that actually arrive
    (doubling from :data:`FIRST_DIRECT_SIZE`), never straight to the length the peer announced: a peer
    that announces a gigabyte and sends nothing makes us hold nothing."""

    def __init__(self, frame: Frame, prefix: bytes, lengths: list[int]) -> None:
        self.frame = frame
        self.prefix = prefix
        self.lengths = lengths
        self.consumed_from_staging = 0
        self._direct: bytearray | None = None  # the large part being received in place
        self._direct_size = 0  # its announced length
        self._direct_filled = 0

    def direct_target(self) -> memoryview | None:
        if self._direct is None:
            return None
        if self._direct_filled == len(self._direct):
            self._grow()
        return memoryview(self._direct)[self._direct_filled :]

    def _grow(self) -> None:
        assert self._direct is not None
        bigger = bytearray(min(self._direct_size, 2 * len(self._direct)))
        bigger[: self._direct_filled] = self._direct  # a new buffer: the caller may hold a view of the old
        self._direct = bigger

    def advance_direct(self, nbytes: int) -> None:
        self._direct_filled += nbytes
        assert self._direct is not None
        if self._direct_filled == self._direct_size:
            self.frame.parts.append(self._direct)
            self._direct = None

    def take(self, staged: memoryview) -> bool:
        """Take parts from the staging bytes; True when the frame is complete."""
        self.consumed_from_staging = 0
        offset = 0
        while self._direct is None and len(self.frame.parts) < len(self.lengths):
            size = self.lengths[len(self.frame.parts)]
            available = len(staged) - offset
            if available >= size:
                self.frame.parts.append(bytes(staged[offset : offset + size]))
                offset += size
            elif size >= DIRECT_READ_THRESHOLD:
                self._direct = bytearray(min(size, max(available, FIRST_DIRECT_SIZE)))
                self._direct[:available] = staged[offset:]
                self._direct_size, self._direct_filled = size, available
                offset += available
            else:
                break
        self.consumed_from_staging = offset
        return self._direct is None and len(self.frame.parts) == len(self.lengths)
