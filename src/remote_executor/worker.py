"""The worker process, whatever the transport: run initializers and calls, report outcomes.

``python -m remote_executor.worker URL`` runs one worker process (the supervisor of
``remote-executor worker --processes N`` and the embedded cluster start these). The backend of the URL's
scheme provides the connection loop (``Backend.run_worker``); this module holds the process around it: the
settings from the command line and environment, the drain flag set by SIGTERM, and the lifeline that ends
the process when its parent dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .errors import RemoteExecutorError
from .security import take_worker_secrets
from .transports import get_backend, scheme_of
from .transports.base import WorkerCore, WorkerSettings

log = logging.getLogger("remote_executor.worker")

LIFELINE_ENV = "REMOTE_EXECUTOR_LIFELINE_FD"


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
    """Serve ``settings.url`` with the worker loop of its backend until drained or fatally refused."""
    return get_backend(scheme_of(settings.url)).run_worker(settings, WorkerCore())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote_executor.worker", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--name", default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--reconnect-timeout", type=float, default=float("inf"))
    parser.add_argument("--insecure", action="store_true", help="no key unless one is handed down")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    try:
        # Read once and removed from os.environ before any initializer or call runs.
        key, token = take_worker_secrets(insecure=args.insecure)
    except (OSError, ValueError) as exc:  # an unreadable or unsafe key file: restarting will not help
        log.error("%s", exc)
        return 2
    settings = WorkerSettings(
        url=args.url,
        key=key,
        token=token,
        insecure=args.insecure,
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
    try:
        return run(settings)
    except RemoteExecutorError as exc:  # an unknown scheme, a missing extra: restarting will not help
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
