"""``remote-executor``: run a job server or workers, and look at a running cluster.

    remote-executor server tcp://127.0.0.1:5555            the job server for tcp:// (zmq:// likewise)
    remote-executor worker tcp://host:5555 --processes 4   N worker processes, restarted if they crash
    remote-executor status tcp://host:5555                 workers, clients and queues
    remote-executor ping tcp://host:5555                   is it up, and how far away
    remote-executor tls-keygen DIR --host NAME_OR_IP       a private CA and certificates for TLS (tcp://)

A key (``--key-file`` or ``$REMOTE_EXECUTOR_KEY``) turns on HMAC for every frame; without one, servers
only listen on loopback unless given ``--insecure`` or mutual TLS (``--tls-ca``). SIGTERM or Ctrl-C stops
a server; for workers it drains them (running calls finish, no new ones start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from typing import Any

from .errors import RemoteExecutorError
from .security import key_to_env, resolve_key
from .supervisor import Supervisor
from .tls import TlsConfig, make_cluster_material
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
        sub.add_argument("--key-file", help="file holding the shared HMAC key (default: $REMOTE_EXECUTOR_KEY)")
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
        if name in ("server", "worker"):
            sub.add_argument("--heartbeat-interval", type=float, default=1.0)
            sub.add_argument("--heartbeat-timeout", type=float, default=10.0)
        TlsConfig.add_arguments(sub, server=name == "server")
    server = commands.choices["server"]
    server.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without a key (trusted networks only)")
    server.add_argument("--max-frame-size", type=int, default=Limits().max_frame,
                        help="largest frame accepted, in bytes")
    server.add_argument("--curve-secret-key", metavar="FILE",
                        help="zmq only: encrypt with CURVE using this secret certificate (zmq.auth)")
    worker = commands.choices["worker"]
    worker.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    keygen = commands.add_parser("tls-keygen", help="write a private CA and TLS certificates for a tcp:// cluster",
                                 description=make_cluster_material.__doc__)
    keygen.set_defaults(func=_tls_keygen)
    keygen.add_argument("directory", help="where to write ca.pem, server.pem/.key and client.pem/.key")
    keygen.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                        help="a name or IP address clients and workers reach the server by (repeat for more)")
    keygen.add_argument("--days", type=int, default=825, help="how long the certificates are valid")
    return parser


def _backend(url: str) -> Backend:
    """The backend of a URL given on the command line (a clear error for a missing ``scheme://``)."""
    if "://" not in url:
        raise ValueError(f"expected a URL like tcp://host:port, got {url!r}")
    return get_backend(scheme_of(url))


def _options(args: argparse.Namespace, **extra: Any) -> Options:
    return Options(key=resolve_key(key_file=args.key_file), connect_timeout=args.timeout,
                   extra={k: v for k, v in extra.items() if v is not None})


def _tls_options(args: argparse.Namespace, backend: Backend) -> dict[str, Any]:
    """The TLS options of the command line (TLS is an option of tcp:// only)."""
    options = TlsConfig.options_from_args(args)
    if options and backend.scheme != "tcp":
        raise ValueError(f"the --tls options are for tcp:// only, not {backend.scheme}://")
    return options


def _server(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    extra: dict[str, Any] = {"curve_secret_key": args.curve_secret_key} if args.curve_secret_key else {}
    if extra and backend.scheme != "zmq":
        raise ValueError("--curve-secret-key is for zmq:// servers only")
    extra.update(_tls_options(args, backend))
    settings = ServerSettings(key=resolve_key(key_file=args.key_file), insecure=args.insecure,
                              limits=Limits(max_frame=args.max_frame_size),
                              heartbeat_interval=args.heartbeat_interval,
                              heartbeat_timeout=args.heartbeat_timeout, extra=extra)
    server = backend.server(args.url, settings)
    _on_stop_signals(lambda: server.stop())
    log.info("serving %s", server.url)
    print(f"serving {server.url}", flush=True)
    server.serve_forever()
    return 0


def _worker(args: argparse.Namespace) -> int:
    key = resolve_key(key_file=args.key_file)
    backend = _backend(args.url)  # fail now, clearly, for an unknown scheme or a missing extra
    worker_args: tuple[str, ...] = ("--heartbeat-interval", str(args.heartbeat_interval),
                                    "--heartbeat-timeout", str(args.heartbeat_timeout))
    tls = TlsConfig.from_options(_tls_options(args, backend))
    if tls is not None:
        tls.client_context()  # a file that cannot be loaded fails here, once, not in every worker process
        worker_args += tls.to_args()
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
    backend = _backend(args.url)
    info = backend.status(args.url, _options(args, **_tls_options(args, backend)))
    print(json.dumps(info, indent=2))
    return 0


def _ping(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    options = _options(args, **_tls_options(args, backend))
    start = time.perf_counter()
    backend.status(args.url, options)
    print(f"{args.url} answered in {(time.perf_counter() - start) * 1e3:.1f} ms")
    return 0


def _tls_keygen(args: argparse.Namespace) -> int:
    material = make_cluster_material(args.directory, args.host, days=args.days)
    hosts = ", ".join(args.host)
    print(textwrap.dedent(f"""\
        wrote a private CA and certificates for {hosts} (keys readable by you only):
          the CA, trusted by every side:   {material.ca}
          the job server's:                {material.server_cert}, {material.server_key}
          every client's and worker's:     {material.client_cert}, {material.client_key}
        the CA's own key was not kept: to add a server host, make new material.

          remote-executor server tcp://HOST:PORT --tls-cert {material.server_cert} --tls-key {material.server_key} \\
              --tls-ca {material.ca}
          remote-executor worker tcp://HOST:PORT --tls-ca {material.ca} --tls-cert {material.client_cert} \\
              --tls-key {material.client_key}
          RemoteExecutor(transport="tcp://HOST:PORT", tls_ca="{material.ca}", tls_cert="{material.client_cert}",
                         tls_key="{material.client_key}")"""))
    return 0


def _on_stop_signals(callback: Any) -> None:
    def handler(signum: int, frame: object) -> None:
        callback()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
