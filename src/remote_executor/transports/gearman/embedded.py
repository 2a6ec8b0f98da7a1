"""The embedded gearman cluster's server: a private gearmand on loopback, a free port and ``-j``.

gearmand has no authentication, so the cluster always runs with a key (a random one unless the executor
has its own), and with a key every job and result is encrypted (:mod:`.jobs`): another local user who finds
the port can neither make the workers run code nor read a call or its result, so the cluster needs the
``cryptography`` package, checked before anything starts. gearmand is started
and stopped by an owner thread, because the kernel kills it when the thread that started it exits
(PR_SET_PDEATHSIG) and the executor may be created on a short-lived thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from ...errors import TransportError
from ...security import generate_key, key_to_env
from ...wire.aead import require_cryptography
from ..base import ClientTransport, EmbeddedServer, Options, Session
from .codec import GearmanError
from .connection import admin_status
from .gearmand import GearmandNotFoundError, GearmandProcess
from .jobs import DEFAULT_POOL, function_name

# gearmand wakes every sleeping worker for each job by default, and all but one of them grab nothing: one
# is enough here (strace over gearmand and 2 workers, sequential calls: 34 system calls per call, not 41).
WORKER_WAKEUP = 1


class EmbeddedGearmand(EmbeddedServer):
    """A gearmand whose ``-j`` fails a job after ``max_retries + 1`` lost workers."""

    def __init__(self, options: Options, session: Session, workers: int) -> None:
        require_cryptography('transport="gearman" (its jobs are always encrypted)')
        self.options = options
        self.workers = workers
        self.job_retries = session.max_retries + 1
        self.key = options.key if options.key is not None else generate_key()
        self.gearmand: GearmandProcess | None = None
        self._launched = threading.Event()  # gearmand runs, on a port known, but may not accept yet
        self._started = threading.Event()  # it accepts connections, or could not start (self._error)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._owner: threading.Thread | None = None
        self._kill_hung: Callable[[int | str, float | None], object] | None = None

    def start(self) -> None:
        """Launch gearmand and return as soon as its port is known: the workers start while it does."""
        self._owner = threading.Thread(target=self._own_gearmand, name="remote-executor-gearmand", daemon=True)
        self._owner.start()
        self._launched.wait()
        self._raise_error()

    def wait_started(self) -> None:
        self._started.wait()
        self._raise_error()
        assert self.gearmand is not None
        self.url = self.gearmand.url

    def _raise_error(self) -> None:
        if self._error is not None:
            assert self._owner is not None
            self._owner.join()
            raise self._error

    def _on_launch(self, url: str) -> None:
        self.url = url
        self._launched.set()

    def stop(self) -> None:
        self._stop.set()
        if self._owner is not None and self._owner is not threading.current_thread():
            self._owner.join()

    def client(self, options: Options) -> ClientTransport:
        from .client import GearmanClientTransport

        # gearmand queues the jobs until the workers register; its -j already fails a job after
        # max_retries + 1 lost workers, so the client needs no start report for a call without a limit.
        return GearmanClientTransport(self.url, replace(options, key=self.key), capacity=self.workers,
                                      gearmand_retries=self.job_retries, on_hung=self._on_hung)

    def on_hung_worker(self, kill: Callable[[int | str, float | None], object]) -> None:
        self._kill_hung = kill

    def _on_hung(self, worker: str, since: float) -> None:
        """The client gave up a silent worker, which named itself as the cluster named it ``since`` then."""
        if self._kill_hung is not None:
            self._kill_hung(worker, since)

    def worker_env(self) -> dict[str, str]:
        return key_to_env(self.key)

    def attached_workers(self) -> int | None:
        assert self.gearmand is not None
        try:
            statuses = admin_status(*self.gearmand.address, timeout=self.options.connect_timeout)
        except (GearmanError, OSError):
            return 0
        return sum(s.workers for s in statuses if s.function.encode() == function_name(DEFAULT_POOL))

    def worker_args(self) -> tuple[str, ...]:
        return ("--heartbeat-interval", str(self.options.heartbeat_interval),
                "--heartbeat-timeout", str(self.options.heartbeat_timeout),
                "--log-level", "WARNING")  # the executor's own terminal: only what needs attention

    def _own_gearmand(self) -> None:
        try:
            gearmand = GearmandProcess(threads=0, job_retries=self.job_retries, worker_wakeup=WORKER_WAKEUP)
            self.gearmand = gearmand.start(on_launch=self._on_launch)
        except GearmandNotFoundError as exc:
            self._error = TransportError(f'transport="gearman" needs gearmand: {exc}')
        except BaseException as exc:
            self._error = exc
        self._launched.set()
        self._started.set()
        if self._error is None:
            assert self.gearmand is not None
            self._stop.wait()
            self.gearmand.stop()
