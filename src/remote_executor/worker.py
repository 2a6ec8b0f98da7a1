"""The worker process, whatever the transport: run initializers and calls, report outcomes.

``python -m remote_executor.worker URL`` runs one worker process (the supervisor of
``remote-executor worker --processes N`` and the embedded cluster start these). The transport module
named by the URL's scheme provides the connection loop (``run_worker``); this module holds what every
loop shares: :class:`WorkerCore` (initializers once per executor, calls, outcomes), the settings, the
drain flag set by SIGTERM, and the lifeline that ends the process when its parent dies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InitializerFailed
from .security import TOKEN_ENV, key_from_env
from .wire.serialization import Parts, error_outcome, run_initializer, run_task

log = logging.getLogger("remote_executor.worker")

LIFELINE_ENV = "REMOTE_EXECUTOR_LIFELINE_FD"


@dataclass
class WorkerSettings:
    url: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    key: bytes | None = None
    token: bytes | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    reconnect_timeout: float = float("inf")
    connect_timeout: float = 10.0
    drain: threading.Event = field(default_factory=threading.Event)


class WorkerCore:
    """Runs calls for any number of executors; remembers which initializers ran (and how)."""

    def __init__(self) -> None:
        self._init_failures: dict[int, Parts | None] = {}  # executor id -> None (ok) or error outcome

    def initialize(self, executor_id: int, parts: Parts) -> Parts | None:
        """Run an executor's initializer once per process; its error outcome if it raised."""
        if executor_id not in self._init_failures:
            self._init_failures[executor_id] = run_initializer(parts)
            if self._init_failures[executor_id] is not None:
                log.error("initializer of executor %x failed", executor_id)
        return self._init_failures[executor_id]

    def run(self, executor_id: int, parts: Parts) -> Parts:
        """The serialized outcome of one call (or chunk); never raises."""
        if self._init_failures.get(executor_id) is not None:
            return error_outcome(InitializerFailed("A worker initializer failed, the executor is not usable anymore"))
        return run_task(parts)


def install_drain_handler(drain: threading.Event) -> None:
    """SIGTERM: finish the running call, take no new ones, then exit (dist-gearman's exit-all-workers)."""

    def on_sigterm(signum: int, frame: object) -> None:
        drain.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def watch_lifeline(fd: int) -> None:
    """Exit at once when the parent (which holds the pipe's other end) dies: no orphaned workers."""

    def wait_for_eof() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=wait_for_eof, name="remote-executor-lifeline", daemon=True).start()


def run(settings: WorkerSettings) -> int:
    """Serve ``settings.url`` with the worker loop of its transport until drained or fatally refused."""
    scheme = settings.url.split("://", 1)[0]
    module = importlib.import_module(f"remote_executor.transports.{scheme}")
    code: int = module.run_worker(settings, WorkerCore())
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote_executor.worker", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--name", default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--reconnect-timeout", type=float, default=float("inf"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    settings = WorkerSettings(
        url=args.url,
        key=key_from_env(),
        token=(os.environ.get(TOKEN_ENV) or "").encode() or None,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        reconnect_timeout=args.reconnect_timeout,
    )
    if args.name:
        settings.name = args.name
    lifeline = os.environ.get(LIFELINE_ENV)
    if lifeline:
        watch_lifeline(int(lifeline))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains us
    install_drain_handler(settings.drain)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
