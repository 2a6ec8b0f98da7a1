"""A sans-I/O codec for the subset of the Gearman protocol this package speaks.

Binary packets (client/worker <-> gearmand)::

    magic  b"\\0REQ" (to gearmand) or b"\\0RES" (from it)
    type   uint32, big-endian (:class:`PacketType`)
    length uint32, big-endian: size of what follows
    args   the arguments joined by NUL; only the last one may itself contain NUL

The decoder validates before it allocates or guesses: a bad magic, an unknown type, a length over the
limit or too few arguments is a :class:`GearmanProtocolError`, and the stream is unusable afterwards
(framing is lost, so the connection must be dropped). The admin text protocol (``status``,
``workers``, ``cancel job H``) shares the port; its replies are parsed at the bottom of this module.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ...errors import ProtocolError, TransportError

__all__ = [
    "ARG_COUNTS",
    "DEFAULT_MAX_PACKET_SIZE",
    "REQ",
    "RES",
    "AdminError",
    "FunctionStatus",
    "GearmanError",
    "GearmanProtocolError",
    "Packet",
    "PacketDecoder",
    "PacketType",
    "WorkerInfo",
    "encode",
    "encode_parts",
    "parse_admin_ok",
    "parse_status",
    "parse_workers",
]

REQ: Final = b"\0REQ"
RES: Final = b"\0RES"
_HEADER: Final = struct.Struct(">4sII")
HEADER_SIZE: Final = _HEADER.size

# The protocol allows 4 GiB - 1; gearmand keeps a whole job in RAM, so we refuse more than this by
# default and let callers raise it on purpose.
DEFAULT_MAX_PACKET_SIZE: Final = 1 << 30

# A last argument at least this big is handed back as its own buffer by encode_parts, so the payload is
# written to the socket without being copied into a joined packet.
_SEPARATE_PAYLOAD_SIZE: Final = 64 * 1024

Buffer = bytes | bytearray | memoryview


class GearmanError(TransportError):
    """Base class of every Gearman-specific error in this package."""


class GearmanProtocolError(GearmanError, ProtocolError):
    """The peer broke the Gearman framing; the stream cannot be resynchronised and must be dropped."""


class AdminError(GearmanError):
    """gearmand answered an admin text command with ``ERR``."""


class PacketType(enum.IntEnum):
    """The packet types we send or accept, with their numbers from the Gearman protocol."""

    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_LOW = 33


P = PacketType
# Exact number of arguments of each type. Because the last argument may contain NUL, "exact" means:
# at least count - 1 separators, and an empty body for a type without arguments.
ARG_COUNTS: Final[dict[PacketType, int]] = {
    P.CAN_DO: 1,  # function
    P.CANT_DO: 1,  # function
    P.RESET_ABILITIES: 0,
    P.PRE_SLEEP: 0,
    P.NOOP: 0,
    P.SUBMIT_JOB: 3,  # function, unique, payload
    P.JOB_CREATED: 1,  # handle
    P.GRAB_JOB: 0,
    P.NO_JOB: 0,
    P.JOB_ASSIGN: 3,  # handle, function, payload
    P.WORK_STATUS: 3,  # handle, numerator, denominator
    P.WORK_COMPLETE: 2,  # handle, payload
    P.WORK_FAIL: 1,  # handle
    P.GET_STATUS: 1,  # handle
    P.ECHO_REQ: 1,  # payload
    P.ECHO_RES: 1,  # payload
    P.ERROR: 2,  # code, text
    P.STATUS_RES: 5,  # handle, known, running, numerator, denominator
    P.SUBMIT_JOB_HIGH: 3,
    P.SET_CLIENT_ID: 1,  # id
    P.CAN_DO_TIMEOUT: 2,  # function, timeout
    P.WORK_EXCEPTION: 2,  # handle, payload
    P.OPTION_REQ: 1,  # option name
    P.OPTION_RES: 1,  # option name
    P.WORK_DATA: 2,  # handle, payload
    P.WORK_WARNING: 2,  # handle, payload
    P.GRAB_JOB_UNIQ: 0,
    P.JOB_ASSIGN_UNIQ: 4,  # handle, function, unique, payload
    P.SUBMIT_JOB_LOW: 3,
}
del P


@dataclass(frozen=True)
class Packet:
    """One decoded binary packet; ``args`` has exactly ``ARG_COUNTS[type]`` items."""

    magic: bytes
    type: PacketType
    args: tuple[bytes, ...]


# --------------------------------------------------------------------------------------------- encoding


def encode(magic: bytes, type: PacketType, *args: Buffer) -> bytes:
    """Return one packet as a single bytes object (copies the payload; see :func:`encode_parts`)."""
    return b"".join(encode_parts(magic, type, *args))


def encode_parts(magic: bytes, type: PacketType, *args: Buffer) -> list[Buffer]:
    """Return one packet as buffers to write in order; a big last argument is its own, uncopied, buffer."""
    _check_encodable(magic, type, args)
    sizes = [memoryview(a).nbytes for a in args]
    length = sum(sizes) + max(len(args) - 1, 0)
    if length > 0xFFFFFFFF:
        raise ValueError(f"Gearman packet body of {length} bytes exceeds the protocol's 4 GiB limit")
    header = _HEADER.pack(magic, type, length)
    if args and sizes[-1] >= _SEPARATE_PAYLOAD_SIZE:
        head = b"".join([header, *(bytes(a) + b"\0" for a in args[:-1])])
        return [head, args[-1]]
    return [header + b"\0".join(bytes(a) for a in args)]


def _check_encodable(magic: bytes, type: PacketType, args: Sequence[Buffer]) -> None:
    if magic not in (REQ, RES):
        raise ValueError(f"Gearman magic must be {REQ!r} or {RES!r}, not {magic!r}")
    expected = ARG_COUNTS[PacketType(type)]
    if len(args) != expected:
        raise ValueError(f"{PacketType(type).name} takes {expected} argument(s), got {len(args)}")
    for i, arg in enumerate(args[:-1]):
        # A NUL inside a leading argument would silently shift every later argument on the far side.
        if b"\0" in bytes(arg):
            raise ValueError(f"argument {i} of {PacketType(type).name} contains a NUL byte: {bytes(arg)!r}")


# --------------------------------------------------------------------------------------------- decoding


class PacketDecoder:
    """Incremental decoder: ``feed()`` bytes as they arrive, get back every packet they complete.

    Runs in time linear in the bytes fed, however they are split: data is appended to one bytearray
    (amortised O(1) per byte, and CPython drops consumed bytes from its front without moving the rest)
    and each argument is copied out once. After a :class:`GearmanProtocolError` the decoder refuses
    further input, because the framing of everything after the bad header is unknown.
    """

    def __init__(self, *, expect_magic: bytes = RES, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        if expect_magic not in (REQ, RES):
            raise ValueError(f"expect_magic must be {REQ!r} or {RES!r}, not {expect_magic!r}")
        self._magic = expect_magic
        self._max = max_packet_size
        self._buf = bytearray()
        self._body_length: int | None = None  # set once the header of the pending packet is validated
        self._type = PacketType.NOOP
        self._broken: GearmanProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets (a partial packet)."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Packet]:
        """Consume ``data``; return the packets it completes, in order."""
        if self._broken is not None:
            raise GearmanProtocolError(f"decoder already failed: {self._broken}")
        self._buf += data
        packets: list[Packet] = []
        try:
            while (packet := self._next_packet()) is not None:
                packets.append(packet)
        except GearmanProtocolError as exc:
            self._broken = exc
            raise
        if not self._buf:
            self._buf = bytearray()  # release the capacity a large packet left behind
        return packets

    def _next_packet(self) -> Packet | None:
        if self._body_length is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            self._type, self._body_length = self._parse_header(bytes(self._buf[:HEADER_SIZE]))
        end = HEADER_SIZE + self._body_length
        if len(self._buf) < end:
            return None
        args = self._split_args(self._type, HEADER_SIZE, end)
        del self._buf[:end]
        self._body_length = None
        return Packet(self._magic, self._type, args)

    def _parse_header(self, header: bytes) -> tuple[PacketType, int]:
        magic, number, length = _HEADER.unpack(header)
        if magic != self._magic:
            raise GearmanProtocolError(f"bad packet magic {magic!r}, expected {self._magic!r}")
        try:
            type_ = PacketType(number)
        except ValueError:
            raise GearmanProtocolError(f"unknown or unsupported Gearman packet type {number}") from None
        if length > self._max:
            raise GearmanProtocolError(f"{type_.name} packet of {length} bytes exceeds the limit of {self._max} bytes")
        if ARG_COUNTS[type_] == 0 and length:
            raise GearmanProtocolError(f"{type_.name} takes no arguments but has a {length}-byte body")
        return type_, length

    def _split_args(self, type_: PacketType, start: int, end: int) -> tuple[bytes, ...]:
        count = ARG_COUNTS[type_]
        if count == 0:
            return ()
        bounds = [start]
        for _ in range(count - 1):
            nul = self._buf.find(b"\0", bounds[-1], end)
            if nul < 0:
                found = len(bounds)
                raise GearmanProtocolError(f"{type_.name} needs {count} arguments, packet has {found}")
            bounds.append(nul + 1)
        with memoryview(self._buf) as view:
            leading = tuple(bytes(view[a : b - 1]) for a, b in itertools.pairwise(bounds))
            return (*leading, bytes(view[bounds[-1] : end]))


# ------------------------------------------------------------------------------ admin text protocol


@dataclass(frozen=True)
class FunctionStatus:
    """One line of the admin ``status`` reply."""

    function: str
    total: int  # queued + running
    running: int
    workers: int  # connected workers that can do this function


@dataclass(frozen=True)
class WorkerInfo:
    """One line of the admin ``workers`` reply (every connection, clients included)."""

    fd: int
    address: str
    client_id: str  # "-" when the connection never sent SET_CLIENT_ID
    functions: tuple[str, ...]


def parse_status(lines: Iterable[str]) -> list[FunctionStatus]:
    """Parse the lines of a ``status`` reply (without the final ``.``)."""
    return [_parse_status_line(line) for line in lines]


def _parse_status_line(line: str) -> FunctionStatus:
    fields = line.split("\t")
    if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]):
        raise GearmanProtocolError(f"malformed admin status line {line!r}")
    return FunctionStatus(fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def parse_workers(lines: Iterable[str]) -> list[WorkerInfo]:
    """Parse the lines of a ``workers`` reply: ``FD ADDRESS CLIENT-ID : FUNCTION ...``. A connection gearmand
    is closing shows with the descriptor -1 (``-1 127.0.0.1 - :``): it is gone, so it is left out."""
    return [info for info in map(_parse_workers_line, lines) if info.fd >= 0]


def _parse_workers_line(line: str) -> WorkerInfo:
    left, colon, right = line.partition(" :")
    fields = left.split(" ")
    if not colon or len(fields) != 3 or not fields[0].removeprefix("-").isdigit():
        raise GearmanProtocolError(f"malformed admin workers line {line!r}")
    return WorkerInfo(int(fields[0]), fields[1], fields[2], tuple(right.split()))


def parse_admin_ok(line: str) -> str:
    """Return what follows ``OK`` in a one-line admin reply; raise :class:`AdminError` on ``ERR``."""
    if line == "OK" or line.startswith("OK "):
        return line[3:]
    if line.startswith("ERR"):
        # gearmand URL-encodes the text of its error replies ("Unknown+server+command...").
        raise AdminError(f"gearmand refused the admin command: {line[4:].replace('+', ' ')}")
    raise GearmanProtocolError(f"malformed admin reply {line!r}")
