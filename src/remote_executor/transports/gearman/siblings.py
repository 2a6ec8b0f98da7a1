"""Which time-limited jobs the worker processes of one supervisor have started, so that a job is not run
again after its limit.

A call stuck in C code past its limit is ended by killing its process (the watchdog thread cannot run to
answer). gearmand then hands the job to another worker as if that one had merely been lost, and that
worker would run the call again: one more run, with its side effects, of a call the caller already got as
timed out. So before running a job with a limit, a worker leaves a record of its start in a directory
private to its supervisor's children (``SIBLINGS_DIR_ENV``, made by the supervisor and removed when it
stops), and removes it once the job is answered. A worker handed a job whose record a sibling left, longer
ago than the job's limit, answers it as timed out without running it; a younger record (that sibling died
early, a crash) lets it run as the retry it is.

Only the job id of an encrypted job names a record (a random id the key authenticates, new for each
submission): a handle of gearmand's is reused after it restarts. Workers on other machines, or not started
by one supervisor, share no records: there a call stuck in C code past its limit may run once more, though
the executor has already settled it as timed out.
"""

from __future__ import annotations

import logging
import os
import time

from ...logsafe import limited
from ..base import SIBLINGS_DIR_ENV

log = logging.getLogger("remote_executor.gearman")


class SiblingStarts:
    """Start records in one directory shared by sibling worker processes; every failure is only logged
    (a record that cannot be kept costs that protection, never the call)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @classmethod
    def from_env(cls) -> SiblingStarts | None:
        directory = os.environ.get(SIBLINGS_DIR_ENV)
        return cls(directory) if directory and os.path.isdir(directory) else None

    def earlier(self, job_id: bytes) -> tuple[float, str] | None:
        """(when, by whom) a sibling started this job and left without answering it, or None. ``when`` is a
        ``time.monotonic()``: the clock is the machine's, shared by the siblings, and never stepped."""
        try:
            with open(self._path(job_id), encoding="utf-8", errors="replace") as f:
                when, _, worker = f.read(4096).partition(" ")
            return float(when), worker
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            limited(log, logging.WARNING, "start record", "cannot read the start record of job %s: %s",
                    job_id.hex(), exc)
            return None

    def record(self, job_id: bytes, worker: str) -> None:
        """This process starts the job now (replacing an earlier record: the limit runs anew)."""
        try:
            fd = os.open(self._path(job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{time.monotonic()!r} {worker}".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            limited(log, logging.WARNING, "start record", "cannot record the start of job %s: %s", job_id.hex(),
                    exc)

    def forget(self, job_id: bytes) -> None:
        """The job is answered: gearmand will not hand it out again."""
        try:
            os.unlink(self._path(job_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            limited(log, logging.WARNING, "start record", "cannot remove the start record of job %s: %s",
                    job_id.hex(), exc)

    def _path(self, job_id: bytes) -> str:
        return os.path.join(self.directory, job_id.hex())
