"""The bodies of the control frames, sans I/O: HELLO/WELCOME/REJECT/STATUS, and a lost call's report.

A HELLO says who a peer is (its role, name and the runtime versions that must match); a REJECT carries a
:class:`RejectCode` in its ``a`` field, so a peer learns *why* it was refused without parsing prose, and
:func:`rejection` turns it into the package's exception.
"""

from __future__ import annotations

import enum
import json
import math
import platform
import struct
import sys
from collections.abc import Sequence
from typing import Any

import cloudpickle

from ..errors import (
    INITIALIZER_FAILED,
    AuthenticationError,
    CallTimeoutError,
    FrameTooLargeError,
    InitializerFailed,
    KeyRejectedError,
    ProtocolError,
    TransportError,
    VersionMismatchError,
    WorkerLostError,
)
from .frames import KEY_REJECTED, LIMITED, PINNED, VERSION, Frame, Kind, frame_size
from .serialization import Buffer, Parts, decode_outcome


class RejectCode(enum.IntEnum):
    """Why a job server refused a peer: the ``a`` field of a REJECT frame."""

    PROTOCOL = 1  # a malformed or unexpected frame
    AUTHENTICATION = 2  # a missing or wrong cluster token
    VERSION = 3  # Python, cloudpickle or protocol versions differ


def reject(code: RejectCode, reason: str) -> Frame:
    """The REJECT frame a server sends before it closes the connection."""
    return Frame(Kind.REJECT, a=code, parts=[reason.encode()])


def key_rejected() -> Frame:
    """The REJECT a server sends, unsigned, to a peer whose first frame was not signed with its key."""
    return reject(RejectCode.AUTHENTICATION, KEY_REJECTED)


def rejection(frame: Frame, peer: str) -> Exception:
    """The exception a REJECT frame from ``peer`` means."""
    reason = bytes(frame.parts[0]).decode(errors="replace") if frame.parts else "no reason given"
    if frame.a == RejectCode.VERSION:
        return VersionMismatchError(reason)
    if frame.a == RejectCode.AUTHENTICATION:
        if reason == KEY_REJECTED:
            return KeyRejectedError(f"{peer}: {reason}")
        return AuthenticationError(f"{peer} refused this peer's credentials: {reason}")
    return TransportError(f"{peer} refused this peer: {reason}")


def runtime_versions() -> dict[str, str]:
    """What must match between a client, the job server and its workers."""
    return {
        "python": "{}.{}".format(*sys.version_info[:2]),
        "cloudpickle": str(cloudpickle.__version__),
        "protocol": str(VERSION),
        "implementation": platform.python_implementation(),
    }


def hello(role: str, info: dict[str, Any], extra_parts: Parts | None = None) -> Frame:
    """The first frame a client, worker or admin peer sends."""
    body = {"role": role, **runtime_versions(), **info}
    return Frame(Kind.HELLO, parts=[json.dumps(body).encode(), *(extra_parts or [])])


def json_frame(kind: Kind, body: dict[str, Any]) -> Frame:
    return Frame(kind, parts=[json.dumps(body).encode()])


def parse_json(frame: Frame) -> dict[str, Any]:
    """Decode the JSON first part of a HELLO, WELCOME or STATUS frame, strictly."""
    if not frame.parts:
        raise ProtocolError(f"{frame.kind.name} frame without a body")
    try:
        body = json.loads(bytes(frame.parts[0]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{frame.kind.name} body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"{frame.kind.name} body must be a JSON object")
    return body


def check_versions(peer: dict[str, Any], peer_name: str, local_name: str) -> None:
    """Raise :class:`VersionMismatchError` unless the peer runs the versions this side runs."""
    local = runtime_versions()
    different = {k: (peer.get(k), v) for k, v in local.items() if peer.get(k) != v}
    if different:
        detail = ", ".join(f"{k} {theirs} on {peer_name} vs {ours} on {local_name}"
                           for k, (theirs, ours) in different.items())
        raise VersionMismatchError(
            f"version mismatch: {detail}; clients, job server and workers must run the same Python "
            f"(major.minor) and cloudpickle versions"
        )


def announced_limit(welcome: dict[str, Any]) -> int | None:
    """The largest frame a job server accepts, as its WELCOME announces it (None: not announced)."""
    limit = welcome.get("max_frame")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def oversize(frame: Frame, keyed: bool, limit: int | None, what: str) -> FrameTooLargeError | None:
    """The error for a frame the job server would refuse for its size (None if it fits, or no limit)."""
    size = frame_size(frame, keyed)
    if limit is None or size <= limit:
        return None
    return FrameTooLargeError(too_large_message(what, size, limit))


def too_large_message(what: str, size: int, limit: int) -> str:
    return (f"{what} is too large to send: {_megabytes(size)} exceeds the job server's limit of "
            f"{_megabytes(limit)} (--max-frame-size, or the transport option limits={{'max_frame': N}}); "
            f"pass large data another way (a file or store the workers can read) or raise the limit")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def worker_lost_parts(workers: Sequence[str], attempts: int, reason: str | None = None) -> Parts:
    """The body of a ``Status.WORKER_LOST`` result: who was lost, how often the call was tried, and (for
    a call pinned to one worker, which is never retried elsewhere) what happened, in words."""
    body: dict[str, Any] = {"workers": list(workers), "attempts": attempts}
    if reason is not None:
        body["reason"] = reason
    return [json.dumps(body).encode()]


def with_earlier_losses(parts: Parts, earlier: Sequence[str]) -> Parts:
    """A ``Status.WORKER_LOST`` body from a job server, with ``earlier`` (the workers and servers this call
    was lost with before it reached that server) put first. A body that does not parse is left as it is:
    it becomes an error of its own when read."""
    try:
        info = json.loads(bytes(parts[0]))
        info["workers"] = [*earlier, *info["workers"]]
        return [json.dumps(info).encode()]
    except (ValueError, TypeError, KeyError, IndexError):
        return parts


def worker_lost_error(parts: Sequence[Buffer]) -> WorkerLostError:
    info = json.loads(bytes(parts[0]))
    workers = tuple(str(w) for w in info["workers"])
    attempts = int(info["attempts"])
    reason = info.get("reason")
    if isinstance(reason, str):
        return WorkerLostError(reason, workers)
    return WorkerLostError(
        f"the call was lost with its worker {attempts} time(s) and not retried further; "
        f"worker(s) lost: {', '.join(workers)}",
        workers,
    )


# --- calls pinned to one worker (broadcast: SUBMIT with the PINNED flag) -----------------------------------


def pinned(frame: Frame, worker: str | None) -> Frame:
    """``frame`` (a SUBMIT) pinned to ``worker``: the PINNED flag and the worker's name as the first part."""
    if worker is None:
        return frame
    return Frame(frame.kind, a=frame.a, b=frame.b, parts=[worker.encode(), *frame.parts],
                 flags=frame.flags | PINNED)


def split_pinned(frame: Frame) -> tuple[str | None, Frame]:
    """The worker a SUBMIT is pinned to (None: any worker of the pool) and the frame without it."""
    if not frame.flags & PINNED:
        return None, frame
    if not frame.parts:
        raise ProtocolError(f"a PINNED {frame.kind.name} frame must start with a worker name")
    try:
        worker = bytes(frame.parts[0]).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"a PINNED {frame.kind.name} frame names its worker in UTF-8: {exc}") from exc
    return worker, Frame(frame.kind, a=frame.a, b=frame.b, parts=list(frame.parts[1:]), flags=frame.flags & ~PINNED)


def initializer_failed(outcome: Sequence[Buffer]) -> InitializerFailed:
    """The broken-executor error for an initializer's error outcome, with the remote exception as cause."""
    _, remote = decode_outcome(outcome)
    error = InitializerFailed(INITIALIZER_FAILED)
    error.__cause__ = remote
    return error


# --- failed calls (RESULT from a worker with the FAILED flag) -----------------------------------------------
#
# A worker sets FAILED (frames.FAILED) on the RESULT of a call whose outcome is an error: it raised (a chunk:
# one of its calls raised), it could not be unpickled, its result could not be pickled, or it was too large
# to send. The job server counts it per worker ("failed" in STATUS, next to "done", which counts every
# answered call, failed ones included) and does not pass the flag on: the client learns the outcome itself.
# A stop at the time limit (TIMED_OUT) counts as failed too. A worker that predates the flag reports none.


# --- run-time limits (SUBMIT and TASK with the LIMITED flag) -----------------------------------------------

_LIMIT = struct.Struct("!Q")  # microseconds
MAX_LIMIT = 365 * 86400.0  # a year: anything longer is a mistake, not a limit


def check_limit(limit: object) -> float | None:
    """A call's time limit as a caller gave it: None (no limit) or a positive number of seconds."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit <= MAX_LIMIT \
            or math.isnan(limit):
        raise ValueError(f"a call timeout must be None or a number of seconds in (0, {MAX_LIMIT:.0f}], "
                         f"not {limit!r}")
    return float(limit)


def call_frame(kind: Kind, a: int, b: int, parts: Parts, limit: float | None) -> Frame:
    """A SUBMIT or TASK frame; with a limit, the LIMITED flag and the limit as the first part."""
    if limit is None:
        return Frame(kind, a=a, b=b, parts=parts)
    return Frame(kind, a=a, b=b, parts=[_LIMIT.pack(max(1, round(limit * 1e6))), *parts], flags=LIMITED)


def split_limit(frame: Frame) -> tuple[float | None, Parts]:
    """The time limit (seconds, None without one) and the call's parts of a SUBMIT or TASK frame."""
    if not frame.flags & LIMITED:
        return None, frame.parts
    if not frame.parts or memoryview(frame.parts[0]).nbytes != _LIMIT.size:
        raise ProtocolError(f"a LIMITED {frame.kind.name} frame must start with an {_LIMIT.size}-byte limit")
    (micros,) = _LIMIT.unpack(bytes(frame.parts[0]))
    if micros == 0:
        raise ProtocolError(f"a LIMITED {frame.kind.name} frame has a limit of 0")
    return micros / 1e6, list(frame.parts[1:])


def timed_out_parts(worker: str, limit: float) -> Parts:
    """The body of a ``Status.TIMED_OUT`` result: which worker stopped the call, at which limit."""
    return [json.dumps({"worker": worker, "limit": limit}).encode()]


def timed_out_error(parts: Sequence[Buffer]) -> CallTimeoutError:
    info = json.loads(bytes(parts[0])) if parts else {}
    limit, worker = float(info.get("limit", 0.0)), str(info.get("worker", ""))
    where = f" on worker {worker}" if worker else ""
    return CallTimeoutError(f"the call ran past its time limit of {limit:g}s{where}; its worker process was "
                            f"stopped and the call was not retried", limit, worker)
