"""``remote-executor``: run a job server or workers, and look at a running cluster.

    remote-executor server tcp://127.0.0.1:5555            the job server for tcp:// (zmq:// likewise)
    remote-executor worker tcp://host:5555 --processes 4   N worker processes, restarted if they crash
    remote-executor status tcp://host:5555                 workers, clients and queues
    remote-executor ping tcp://host:5555                   is it up, and how far away

Every frame carries an HMAC with the key from ``--key-file``, else ``$REMOTE_EXECUTOR_KEY``, else this
user's key file (``$REMOTE_EXECUTOR_KEY_FILE``, default ``~/.config/remote_executor/key``, made on first
use). ``--insecure`` runs without a key when none is given (a server then listens anywhere). SIGTERM or
Ctrl-C stops a server; for workers it drains them (running calls finish, no new ones start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .errors import RemoteExecutorError
from .security import key_to_env, resolve_key
from .supervisor import Supervisor
from .transports import get_backend, scheme_of
from .transports.base import Backend, Options, ServerSettings
from .wire.frames import Limits

log = logging.getLogger("remote_executor.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code: int = args.func(args)
    except (RemoteExecutorError, OSError, ValueError) as exc:
        print(f"remote-executor: {exc}", file=sys.stderr)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remote-executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, func, helptext in (
        ("server", _server, "run a job server (tcp://, zmq://)"),
        ("worker", _worker, "run worker processes for a job server or gearmand"),
        ("status", _status, "show workers, clients and queues of a job server"),
        ("ping", _ping, "check that a job server answers"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        sub.add_argument("url", help="tcp://HOST:PORT, zmq://HOST:PORT or gearman://HOST:PORT[,HOST:PORT]")
        sub.add_argument("--key-file", help="file holding the shared HMAC key, mode 600 (default: "
                         "$REMOTE_EXECUTOR_KEY, else this user's key file)")
        sub.add_argument("--insecure", action="store_true", help=_INSECURE_HELP[name])
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
        if name in ("server", "worker"):
            sub.add_argument("--heartbeat-interval", type=float, default=1.0)
            sub.add_argument("--heartbeat-timeout", type=float, default=10.0)
    server = commands.choices["server"]
    server.add_argument("--max-frame-size", type=int, default=Limits().max_frame,
                        help="largest frame accepted, in bytes")
    server.add_argument("--curve-secret-key", metavar="FILE",
                        help="zmq only: encrypt with CURVE using this secret certificate (zmq.auth)")
    worker = commands.choices["worker"]
    worker.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    return parser


_INSECURE_HELP = {
    "server": "no key unless one is given, on any address: anyone who can connect runs code as the "
              "workers' user (trusted networks only)",
    "worker": "no key unless one is given: whoever can reach the server runs code as this user",
    "status": "no key unless one is given (for a server started with --insecure)",
    "ping": "no key unless one is given (for a server started with --insecure)",
}


def _backend(url: str) -> Backend:
    """The backend of a URL given on the command line (a clear error for a missing ``scheme://``)."""
    if "://" not in url:
        raise ValueError(f"expected a URL like tcp://host:port, got {url!r}")
    return get_backend(scheme_of(url))


def _options(args: argparse.Namespace, **extra: Any) -> Options:
    return Options(key=resolve_key(key_file=args.key_file, insecure=args.insecure), insecure=args.insecure,
                   connect_timeout=args.timeout,
                   extra={k: v for k, v in extra.items() if v is not None})


def _server(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    extra = {"curve_secret_key": args.curve_secret_key} if args.curve_secret_key else {}
    if extra and backend.scheme != "zmq":
        raise ValueError("--curve-secret-key is for zmq:// servers only")
    key = resolve_key(key_file=args.key_file, insecure=args.insecure)
    settings = ServerSettings(key=key, insecure=args.insecure,
                              limits=Limits(max_frame=args.max_frame_size),
                              heartbeat_interval=args.heartbeat_interval,
                              heartbeat_timeout=args.heartbeat_timeout, extra=extra)
    if key is None:
        log.warning("no key (--insecure): anyone who can connect can run code as the workers' user")
    server = backend.server(args.url, settings)
    _on_stop_signals(lambda: server.stop())
    log.info("serving %s", server.url)
    print(f"serving {server.url}", flush=True)
    server.serve_forever()
    return 0


def _worker(args: argparse.Namespace) -> int:
    key = resolve_key(key_file=args.key_file, insecure=args.insecure)
    _backend(args.url)  # fail now, clearly, for an unknown scheme or a missing extra
    worker_args = ("--heartbeat-interval", str(args.heartbeat_interval),
                   "--heartbeat-timeout", str(args.heartbeat_timeout), *(["--insecure"] if key is None else []))
    if key is None:
        log.warning("no key (--insecure): whoever can reach %s can make these workers run code", args.url)
    supervisor = Supervisor(args.url, args.processes, env=key_to_env(key), worker_args=worker_args,
                            name=f"{os.uname().nodename}-{os.getpid()}")
    stop = threading.Event()
    _on_stop_signals(stop.set)
    supervisor.start()
    print(f"{args.processes} worker process(es) serving {args.url}", flush=True)
    stop.wait()
    log.info("draining workers")
    supervisor.drain(timeout=None)
    return 0


def _status(args: argparse.Namespace) -> int:
    info = _backend(args.url).status(args.url, _options(args))
    print(json.dumps(info, indent=2))
    return 0


def _ping(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _backend(args.url).status(args.url, _options(args))
    print(f"{args.url} answered in {(time.perf_counter() - start) * 1e3:.1f} ms")
    return 0


def _on_stop_signals(callback: Any) -> None:
    def handler(signum: int, frame: object) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
