"""What the gearman client and worker share: URLs and pools, function names, and job payloads.

A job carries one of our frames: ``TASK(a=task id, b=executor id, flags=number of initializer parts,
parts=[*initializer parts, *call parts])``; the answer is a ``RESULT`` frame (``a`` = task id, ``b`` = its
:class:`~remote_executor.wire.frames.Status`, parts = outcome) or, when the executor's initializer failed, a
``BROKEN`` frame. Every job carries its executor's initializer because Gearman cannot send a worker anything
but jobs. Besides the initializer count, the TASK's flags may hold:

- ``LIMITED`` (the wire's own bit): the call has a run-time limit, carried as the first part (before the
  initializer, as :func:`~remote_executor.wire.messages.call_frame` puts it). The worker stops the call by
  ending its process at the limit and answers ``RESULT(b=TIMED_OUT)`` first. A job without the bit is the
  format of before time limits and decodes as it always did; a worker older than the bit refuses such a
  job as malformed (the call fails, nothing runs).
- ``QUIET``: the client needs no ``started by`` report for this job (its gearmand bounds retries itself with
  ``-j``, and the call has no limit whose clock the start would start), so the worker saves that packet and
  its client the wake-up; the worker's first heartbeat names it instead. Old jobs lack the bit: reported.

With a key, gearmand and whoever else reaches it must learn nothing and forge or replay nothing, so every
payload is sealed (:mod:`remote_executor.wire.aead`, AES-256-GCM under a key derived for this use only)::

    job:    sealed(job id (16 random bytes) | expiry (ms since the epoch) | TASK frame,
                   associated data: "job", the function name)
    result: sealed(RESULT or BROKEN frame,
                   associated data: "result", the function name, executor id, task id, job id)

The frame goes inside the ciphertext whole rather than part by part: its header (which executor, how many
parts of what size, initializer or not) is information too, and one sealed message per job leaves gearmand
nothing but its length. Inside, the frame is not signed again: the AEAD authenticates every byte, and the
frame decoder only ever sees authenticated plaintext. The job's identity (job id, expiry, executor and task
ids) travels in that authenticated plaintext, where gearmand cannot read it, rather than in cleartext
associated data; the worker cannot know it before it decrypts, and the AEAD binds it all the same. A result
binds everything the client knows about the job it submitted, so the result of another job, of an earlier
submission of the same call, or for another pool does not open. Each submission of a call gets a new job
id, so a worker can refuse a copy of a job it has run (:mod:`.replay`).

Without a key the payloads are the bare frames (no HMAC, no job id): anyone who reaches gearmand can run
code on the workers anyway, so there is nothing left to protect.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ...errors import AuthenticationError, ProtocolError
from ...pools import DEFAULT_POOL, pool_of_url
from ...security import normalize_key
from ...wire.aead import Sealer, is_sealed
from ...wire.entropy import random_bytes
from ...wire.frames import DEFAULT_LIMITS, LIMITED, Frame, Kind, Limits, decode_whole, encode
from ...wire.messages import split_limit
from ...wire.serialization import Buffer
from .. import split_hostports
from ..base import Call, Session
from .codec import DEFAULT_MAX_PACKET_SIZE

__all__ = [
    "DEFAULT_JOB_TTL",
    "DEFAULT_POOL",
    "JobCodec",
    "JobIdentity",
    "OpenedJob",
    "SealedJob",
    "function_name",
    "parse_url",
]

# gearmand announces no size limit; a job (or its result) must fit in one packet our worker (or client)
# accepts, with room for the job handle and function name around the payload.
MAX_JOB_SIZE: Final = DEFAULT_MAX_PACKET_SIZE - 64 * 1024
FUNCTION_PREFIX: Final = "remote_executor."
STARTED: Final = b"started by "  # WORK_DATA a worker sends as it starts a job: "started by <worker name>"
REFUSED: Final = b"refused by "  # WORK_DATA before a WORK_FAIL for a job the worker would not run
ALIVE: Final = b"alive"  # WORK_DATA every heartbeat interval while the job runs: Gearman has no heartbeat
DEFAULT_JOB_TTL: Final = 300.0  # seconds a job may wait in gearmand's queue before workers refuse it
MAX_JOB_TTL: Final = 86_400.0
AEAD_PURPOSE: Final = b"remote_executor gearman v1"  # HKDF info: this key is for gearman payloads only
JOB_ID_SIZE: Final = 16
_JOB_AD: Final = b"remote_executor gearman job\0"
_RESULT_AD: Final = b"remote_executor gearman result\0"
_JOB_HEADER: Final = struct.Struct("!16sQ")  # job id, expiry in milliseconds since the epoch
_RESULT_IDS: Final = struct.Struct("!QQ16s")  # executor id, task id, job id
_LIMIT_PART: Final = struct.Struct("!Q")  # a LIMITED job's first part: the limit in microseconds
# TASK flags of a job, besides LIMITED (0x4000): QUIET, and below it the number of initializer parts.
QUIET: Final = 0x0800
INIT_MASK: Final = QUIET - 1


def parse_url(url: str, pool: str | None = None) -> tuple[list[tuple[str, int]], str]:
    """``gearman://h1:p1,h2:p2[/POOL]`` -> ([(h1, p1), (h2, p2)], pool); ``pool`` overrides the path."""
    return split_hostports(url), pool_of_url(url, pool)


def function_name(pool: str) -> bytes:
    """The Gearman function name of a worker pool: ``remote_executor.<pool>``."""
    return f"{FUNCTION_PREFIX}{pool}".encode()


def join(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(buffers)


def check_job_ttl(ttl: object) -> float:
    """``job_ttl`` as given to the executor, checked."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_JOB_TTL:
        raise ValueError(f"job_ttl must be a number of seconds in (0, {MAX_JOB_TTL:.0f}], not {ttl!r}")
    return float(ttl)


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """Everything the client knows about one submission of a call: what its result must name."""

    function: bytes
    executor_id: int
    task_id: int
    job_id: bytes  # empty without a key

    def result_associated_data(self) -> bytes:
        return _RESULT_AD + _RESULT_IDS.pack(self.executor_id, self.task_id, self.job_id) + self.function


@dataclass(frozen=True, slots=True)
class SealedJob:
    """One submission's payload and the id it carries (empty without a key)."""

    job_id: bytes
    payload: Buffer


@dataclass(frozen=True, slots=True)
class OpenedJob:
    """A job that verified: its TASK frame and, with a key, its id and expiry (seconds since the epoch)."""

    frame: Frame  # TASK: flags = the number of initializer parts, parts = [*initializer, *call]
    job_id: bytes = b""
    expiry: float | None = None
    limit: float | None = None  # seconds the call may run (None: no limit)
    report_start: bool = True  # the client wants WORK_DATA "started by <name>" before the call runs

    def identity(self, function: bytes) -> JobIdentity:
        return JobIdentity(function, self.frame.b, self.frame.a, self.job_id)


class JobCodec:
    """Builds and checks the payloads of one pool's jobs and results, sealed when there is a key.

    Every ``decode`` method authenticates before it parses, and nothing it returns has been unpickled."""

    def __init__(self, key: bytes | None, function: bytes, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.function = function
        self.limits = limits
        key = normalize_key(key)  # the rule every entry point keeps, so clients and workers agree on the key
        self._sealer = None if key is None else Sealer(key, AEAD_PURPOSE, what="a gearman key (encrypted jobs)")

    @property
    def encrypted(self) -> bool:
        return self._sealer is not None

    # --- the client's side ----------------------------------------------------------------------------------

    def encode_job(self, call: Call, session: Session, expiry: float, *, report_start: bool = True) -> SealedJob:
        """The payload of one submission of ``call``; a fresh job id each time. ``report_start=False``: the
        worker need not say when it starts the call (it does all the same if the call has a limit)."""
        init = session.initializer or []
        if len(init) > INIT_MASK:
            raise ValueError(f"an initializer of {len(init)} parts does not fit a gearman job (at most {INIT_MASK})")
        flags = len(init) | (0 if report_start or call.limit is not None else QUIET)
        parts = [*init, *call.parts]
        if call.limit is not None:
            flags |= LIMITED
            parts.insert(0, _LIMIT_PART.pack(max(1, round(call.limit * 1e6))))
        frame = Frame(Kind.TASK, a=call.task_id, b=session.executor_id, flags=flags, parts=parts)
        if self._sealer is None:
            return SealedJob(b"", join(encode(frame)))
        job_id = random_bytes(JOB_ID_SIZE)
        header = _JOB_HEADER.pack(job_id, max(0, round(expiry * 1000)))
        return SealedJob(job_id, self._sealer.seal([header, *encode(frame)], _JOB_AD + self.function))

    def decode_result(self, payload: Buffer, identity: JobIdentity) -> Frame:
        """The RESULT or BROKEN frame answering exactly the submission ``identity``; raises
        :class:`AuthenticationError` (or :class:`ProtocolError`) for anything else, before any parsing."""
        if self._sealer is None:
            if is_sealed(payload):
                raise AuthenticationError("the result is encrypted: the worker has a key and this client none")
            return decode_whole(payload, None, self.limits)
        if not is_sealed(payload):
            raise AuthenticationError("the result is not encrypted, so it does not come from a worker with the key")
        plaintext = self._sealer.open(payload, identity.result_associated_data())
        return decode_whole(plaintext, None, self.limits)

    # --- the worker's side ----------------------------------------------------------------------------------

    def decode_job(self, payload: Buffer) -> OpenedJob:
        """A job that verified; its frame's parts are views of the plaintext. Raises
        :class:`AuthenticationError` or :class:`ProtocolError`; nothing is parsed before it verifies."""
        if self._sealer is None:
            if is_sealed(payload):
                raise AuthenticationError("the job is encrypted with a key and this worker has none")
            return self._task(decode_whole(payload, None, self.limits))
        if not is_sealed(payload):
            raise AuthenticationError("the job is not encrypted: its client has no key, or it is forged")
        plaintext = memoryview(self._sealer.open(payload, _JOB_AD + self.function))
        if plaintext.nbytes < _JOB_HEADER.size:
            raise ProtocolError(f"encrypted job of {plaintext.nbytes} bytes has no job header")
        job_id, expiry_ms = _JOB_HEADER.unpack_from(plaintext)
        opened = self._task(decode_whole(plaintext[_JOB_HEADER.size :], None, self.limits))
        return OpenedJob(opened.frame, job_id, expiry_ms / 1000, opened.limit, opened.report_start)

    def encode_result(self, frame: Frame, identity: JobIdentity) -> Buffer:
        """The payload answering the job ``identity``: bound to it, so it answers no other."""
        if self._sealer is None:
            return join(encode(frame))
        return self._sealer.seal(encode(frame), identity.result_associated_data())

    @staticmethod
    def _task(frame: Frame) -> OpenedJob:
        """The job a TASK frame describes, its limit split off and its flags read (ProtocolError if bad)."""
        if frame.kind != Kind.TASK:
            raise ProtocolError(f"expected a TASK frame, got {frame.kind.name}")
        unknown = frame.flags & ~(LIMITED | QUIET | INIT_MASK)
        if unknown:
            raise ProtocolError(f"a TASK frame with unknown flags {unknown:#x} (from a newer client?)")
        limit, parts = split_limit(frame)
        init = frame.flags & INIT_MASK
        if init > len(parts):
            raise ProtocolError(f"a TASK frame of {len(parts)} parts cannot hold {init} initializer parts")
        task = Frame(Kind.TASK, a=frame.a, b=frame.b, flags=init, parts=list(parts))
        return OpenedJob(task, limit=limit, report_start=limit is not None or not frame.flags & QUIET)
