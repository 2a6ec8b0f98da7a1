"""The worker process, whatever the transport: run initializers and calls, report outcomes.

``python -m remote_executor.worker URL`` runs one worker process (the supervisor of
``remote-executor worker --processes N`` and the embedded cluster start these). The backend of the URL's
scheme provides the connection loop (``Backend.run_worker``); this module holds the process around it: the
settings from the command line and environment, the drain flag set by SIGTERM, and the lifeline that ends
the process when its parent dies.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RemoteExecutorError
from .security import take_worker_secrets
from .signals import SignalEvent, set_on_signals
from .tls import TlsConfig
from .transports import get_backend, scheme_of
from .transports.base import LIFELINE_ENV, REFUSED, SERVING_ENV, WorkerCore, WorkerSettings

__all__ = ["LIFELINE_ENV", "REFUSED", "SERVING_ENV", "main", "run"]

log = logging.getLogger("remote_executor.worker")


def install_drain_handler(drain: SignalEvent) -> None:
    """SIGTERM: finish the running call, take no new ones, then exit (dist-gearman's exit-all-workers).

    The flag is raised in the handler itself, so the worker sees it before it sends its next result; the
    handler takes no lock (see :mod:`remote_executor.signals`), so a SIGTERM that comes while the worker
    waits on ``drain`` (its reconnection backoff) cannot leave it waiting on itself. A second SIGTERM
    (systemd signals the whole group) changes nothing."""
    if threading.current_thread() is threading.main_thread():
        set_on_signals(drain, signums=(signal.SIGTERM,))


ATEXIT_GRACE = 2.0
"""Seconds the user's ``atexit`` handlers get when the lifeline closes, before the process ends regardless."""


def exit_now(code: int) -> None:
    """End the process from any thread: ``atexit`` handlers first, bounded by :data:`ATEXIT_GRACE`."""
    watchdog = threading.Timer(ATEXIT_GRACE, os._exit, (code,))
    watchdog.daemon = True
    watchdog.start()
    try:
        atexit._run_exitfuncs()  # logging.shutdown is one of them
    finally:
        os._exit(code)


def watch_lifeline(fd: int) -> None:
    """Exit when the parent (which holds the pipe's other end) dies or closes it: no orphaned workers.

    The embedded cluster stops its idle workers this way, so the ``atexit`` handlers of user code (an
    initializer's database connection, a flushed file) run first, as at a normal exit; a watchdog ends the
    process after :data:`ATEXIT_GRACE` seconds even if one of them hangs."""

    def wait_for_eof() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        exit_now(3)

    threading.Thread(target=wait_for_eof, name="remote-executor-lifeline", daemon=True).start()


def announce_serving(serving: threading.Event, fd: int) -> None:
    """Write one byte to ``fd`` once ``serving`` is set (the first handshake), so the supervisor knows."""

    def wait_and_tell() -> None:
        serving.wait()
        try:
            os.write(fd, b"s")
            os.close(fd)
        except OSError:
            pass  # the supervisor is gone: the lifeline ends us

    threading.Thread(target=wait_and_tell, name="remote-executor-serving", daemon=True).start()


def read_stdin_line(fd: int = 0) -> bytes:
    """One line of standard input, read without a buffer: what follows it stays for :func:`watch_stdin`."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return bytes(line)


def watch_stdin(drain: threading.Event, fd: int = 0, on_eof: Callable[[], object] | None = None) -> None:
    """``--exit-on-stdin-eof``: standard input is the line to whoever started this command (an SSH session).

    A ``drain`` line drains (as SIGTERM does); end of file runs ``on_eof`` (which ends the supervisor's
    worker processes), then ends this process at once, so a session that ends, however it ends (the client
    exited, was killed, lost its network), leaves nothing running here. Plain ``os.read``: a daemon thread
    blocked in a buffered ``sys.stdin`` would abort the interpreter's exit after a drain."""

    def read_until_eof() -> None:
        pending = b""
        try:
            while chunk := os.read(fd, 4096):
                *lines, pending = (pending + chunk).split(b"\n")
                if any(line.strip() == b"drain" for line in lines):
                    log.info("asked to drain on standard input")
                    drain.set()
        except OSError:
            pass
        log.info("standard input closed: exiting now")
        if on_eof is not None:
            try:
                on_eof()
            except Exception:  # exit all the same
                log.exception("ending the worker processes failed")
        exit_now(0)

    threading.Thread(target=read_until_eof, name="remote-executor-stdin", daemon=True).start()


def run(settings: WorkerSettings) -> int:
    """Serve ``settings.url`` with the worker loop of its backend until drained or fatally refused."""
    return get_backend(scheme_of(settings.url)).run_worker(settings, WorkerCore(settings.name))


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, sized to the terminal as argparse sizes it, without importing ``shutil``
    (and with it zlib, bz2 and lzma): every ``add_argument`` builds a formatter, and that import was some
    4 ms of every worker's start-up."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None, **kwargs: Any) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width, **kwargs)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's width, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote_executor.worker", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--name", default=None)
    parser.add_argument("--pool", default=None, help="the worker pool to serve (default: the URL's /POOL)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--reconnect-timeout", type=float, default=float("inf"))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    TlsConfig.add_arguments(parser)
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="zmq:// only: the server's public CURVE certificate "
                             "(default: $REMOTE_EXECUTOR_CURVE_SERVER_KEY)")
    parser.add_argument("--curve-client-key", metavar="FILE",
                        help="zmq:// only: this worker's secret CURVE certificate (default: an ephemeral key)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="exit when standard input closes; a 'drain' line on it drains")
    parser.add_argument("--insecure", action="store_true", help="no key unless one is handed down")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    try:
        key = take_worker_secrets(insecure=args.insecure)  # read once, gone from os.environ before any call
    except (OSError, ValueError) as exc:  # an unreadable or unsafe key file: restarting will not help
        log.error("%s", exc)
        return 2
    settings = WorkerSettings(
        url=args.url,
        key=key,
        insecure=args.insecure,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        reconnect_timeout=args.reconnect_timeout,
        extra={**TlsConfig.options_from_args(args), **_backend_extra(args)},
    )
    if args.name:
        settings.name = args.name
    settings.pool = args.pool
    lifeline = os.environ.get(LIFELINE_ENV)
    if lifeline:
        watch_lifeline(int(lifeline))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains us
    serving_fd = os.environ.get(SERVING_ENV)
    if serving_fd:
        announce_serving(settings.serving, int(serving_fd))
    install_drain_handler(settings.drain)
    if args.exit_on_stdin_eof:
        watch_stdin(settings.drain)
    try:
        return run(settings)
    except RemoteExecutorError as exc:  # an unknown scheme, a missing extra: restarting will not help
        log.error("%s", exc)
        return REFUSED


def _backend_extra(args: argparse.Namespace) -> dict[str, Any]:
    """Backend-specific options given on the command line (key file paths: never secrets themselves)."""
    given = {"curve_server_key": args.curve_server_key, "curve_client_key": args.curve_client_key}
    return {name: value for name, value in given.items() if value}


if __name__ == "__main__":
    sys.exit(main())
