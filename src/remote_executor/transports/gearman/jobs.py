"""What the gearman client and worker share: URLs and pools, function names, and job payloads.

A job's payload is one of our frames: ``TASK(a=task id, b=executor id, flags=number of initializer parts,
parts=[*initializer parts, *call parts])``, signed with the key when there is one; the answer is a ``RESULT``
frame (``a`` = task id, parts = outcome) or, when the executor's initializer failed, a ``BROKEN`` frame. Every
job carries its executor's initializer because Gearman cannot send a worker anything but jobs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from ...errors import TransportError
from ...wire.frames import DEFAULT_LIMITS, Frame, Kind, Limits, decode_whole, encode
from ...wire.serialization import Buffer
from .. import split_hostports
from ..base import Call, Session

__all__ = ["DEFAULT_POOL", "decode_job_frame", "encode_job", "function_name", "parse_url"]

DEFAULT_POOL: Final = "default"
FUNCTION_PREFIX: Final = "remote_executor."
STARTED: Final = b"started by "  # WORK_DATA a worker sends as it starts a job: "started by <worker name>"
REFUSED: Final = b"refused by "  # WORK_DATA before a WORK_FAIL for a job the worker would not run
ALIVE: Final = b"alive"  # WORK_DATA every heartbeat interval while the job runs: Gearman has no heartbeat
_POOL_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def parse_url(url: str, pool: str | None = None) -> tuple[list[tuple[str, int]], str]:
    """``gearman://h1:p1,h2:p2[/POOL]`` -> ([(h1, p1), (h2, p2)], pool); ``pool`` overrides the path."""
    addresses = split_hostports(url)
    path = url.split("://", 1)[1].partition("/")[2].strip("/")
    chosen = pool or path or DEFAULT_POOL
    if not _POOL_RE.fullmatch(chosen):
        raise TransportError(f"bad gearman pool name {chosen!r} in {url!r}: use letters, digits, '.', '_' or '-'")
    return addresses, chosen


def function_name(pool: str) -> bytes:
    """The Gearman function name of a worker pool: ``remote_executor.<pool>``."""
    return f"{FUNCTION_PREFIX}{pool}".encode()


def join(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(buffers)


def encode_job(call: Call, session: Session, key: bytes | None) -> bytes:
    """The payload of the job that runs ``call``: a TASK frame carrying the initializer too."""
    init = session.initializer or []
    frame = Frame(Kind.TASK, a=call.task_id, b=session.executor_id, flags=len(init), parts=[*init, *call.parts])
    return join(encode(frame, key))


def decode_job_frame(payload: Buffer, key: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Validate one frame that fills a whole job payload; the HMAC is checked before anything is unpickled.
    The parts are views of ``payload``, not copies."""
    return decode_whole(payload, key, limits)
