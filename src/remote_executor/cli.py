"""``remote-executor``: run a job server or workers, and look at a running cluster.

    remote-executor server tcp://127.0.0.1:5555            the job server for tcp:// (zmq:// likewise)
    remote-executor worker tcp://host:5555 --processes 4   N worker processes, restarted if they crash
    remote-executor status tcp://host:5555                 workers, clients and queues
    remote-executor ping tcp://host:5555 --wait 30         is it up (waiting for it), and how far away
    remote-executor stop tcp://host:5555 --workers         drain and stop a job server (and its workers)
    remote-executor tls-keygen DIR --host NAME_OR_IP       a private CA and certificates for TLS (tcp://)
    remote-executor cluster up --hosts n1,n2 --processes 4 a job server here, workers on n1 and n2 over SSH

Every frame carries an HMAC with the key from ``--key-file``, else ``$REMOTE_EXECUTOR_KEY``, else this
user's key file (``$REMOTE_EXECUTOR_KEY_FILE``, default ``~/.config/remote_executor/key``, made on first
use). ``--insecure`` runs without a key when none is given (a server then listens anywhere). SIGTERM or
Ctrl-C stops a server; for workers it drains them (running calls finish, no new ones start).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from . import __version__, privatedirs
from .errors import RemoteExecutorError, TransportError
from .netio import retry_with_backoff
from .pools import pool_of_url
from .security import key_to_env, resolve_key
from .signals import SignalEvent, set_on_signals
from .supervisor import Supervisor
from .tls import TlsConfig, make_cluster_material
from .transports import UnknownSchemeError, get_backend, scheme_of
from .transports.base import Backend, Options, ServerSettings, check_heartbeats
from .usage import RUNTIME, USAGE, UsageError
from .wire.frames import PRE_SESSION_LIMITS, Limits
from .worker import ATEXIT_GRACE, read_stdin_line, watch_stdin

log = logging.getLogger("remote_executor.cli")


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
_N = TypeVar("_N", int, float)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # named with the command that did not take them, whose --help lists what it takes
        prog = getattr(args, _PROG, parser.prog)
        parser.exit(USAGE, f"remote-executor: unrecognized arguments: {' '.join(extras)} (see: {prog} --help)\n")
    vars(args).pop(_PROG, None)
    if getattr(args, "heartbeat_timeout", None) is not None:  # (server, worker)
        try:
            check_heartbeats(args.heartbeat_interval, args.heartbeat_timeout,
                             ("--heartbeat-interval", "--heartbeat-timeout"))
        except ValueError as exc:
            print(f"remote-executor: {exc}", file=sys.stderr)
            return USAGE
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the user; the traceback only when asked for (--log-level DEBUG)
        log.debug("the command failed", exc_info=True)
        known = isinstance(exc, (RemoteExecutorError, OSError, ValueError))
        message = str(exc) if known else f"unexpected error: {type(exc).__name__}: {exc}"
        hint = "" if known or args.log_level == "DEBUG" else " (--log-level DEBUG shows the traceback)"
        print(f"remote-executor: {message}{hint}", file=sys.stderr)
        return USAGE if isinstance(exc, UsageError) else RUNTIME
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other error of the command (its usage block would
    push the reason off the first line); ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"remote-executor: {message} (see: {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, _PROG):  # the innermost command parses first (its namespace is copied up)
            setattr(parsed, _PROG, self.prog)
        return parsed, extras


_PROG = "_remote_executor_command"  # the namespace attribute naming the (sub)command that was parsed


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; "(default: X)" after every option that has a default and does not say it
    already; reST markup of the docstrings the descriptions come from shown as plain text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)

    def format_help(self) -> str:
        return _plain(super().format_help())


def positive(kind: Callable[[str], _N], at_least: _N | None = None, zero: bool = False) -> Callable[[str], _N]:
    """An argparse type: a number of ``kind`` greater than 0 (or at least ``at_least``; or 0 too with
    ``zero``); anything else is a usage error (status 2) that says why, not a server that starts and then
    refuses every peer."""

    def parse(text: str) -> _N:
        value = kind(text)  # a ValueError: argparse says "invalid float value"
        if at_least is not None and not value >= at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least}, not {text}")
        if zero and value == 0:
            return value
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'0 or ' if zero else ''}a positive number, not {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # (what argparse names in its message)
    return parse


MIN_MAX_FRAME = PRE_SESSION_LIMITS.max_frame  # a smaller one would refuse the handshake's own frames


def _plain(text: str) -> str:
    """``x`` and :role:`x` (reST, in the docstrings the descriptions come from) as x."""
    return re.sub(r"(?::[\w.]+:)?`{1,2}([^`]+)`{1,2}", r"\1", text)


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(prog="remote-executor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="how much to log on standard error (DEBUG also shows tracebacks of errors)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, func, helptext in (
        ("server", _server, "run a job server (tcp://, zmq://)"),
        ("worker", _worker, "run worker processes for a job server or gearmand"),
        ("status", _status, "show workers, clients and queues of a job server"),
        ("ping", _ping, "check that a job server answers"),
        ("stop", _stop, "drain and stop a job server (and with --workers its workers)"),
    ):
        sub = commands.add_parser(name, help=helptext, description=textwrap.fill(_DESCRIPTIONS[name], 100))
        sub.set_defaults(func=func)
        sub.add_argument("url", help="tcp://HOST:PORT, zmq://HOST:PORT or gearman://HOST:PORT[,HOST:PORT]")
        sub.add_argument("--key-file", help="file holding the shared HMAC key, mode 600 (default: "
                         "$REMOTE_EXECUTOR_KEY, else this user's key file); - reads it from standard input")
        sub.add_argument("--insecure", action="store_true", help=_INSECURE_HELP[name])
        if name in ("status", "ping", "stop"):
            sub.add_argument("--timeout", type=positive(float), default=5.0, help="seconds to wait for an answer")
        if name in ("server", "worker"):
            sub.add_argument("--heartbeat-interval", type=positive(float), default=1.0,
                             help="seconds between heartbeats while nothing else is sent")
            sub.add_argument("--heartbeat-timeout", type=positive(float), default=10.0,
                             help="seconds of silence after which the other side counts as lost")
        TlsConfig.add_arguments(sub, server=name == "server")
    server = commands.choices["server"]
    server.add_argument("--max-frame-size", type=positive(int, at_least=MIN_MAX_FRAME), default=Limits().max_frame,
                        help="largest frame accepted, in bytes: a larger call or result fails with "
                             "FrameTooLargeError")
    status = commands.choices["status"]
    status.add_argument("--watch", action="store_true",
                        help="a live view refreshed in the terminal (workers, queues, calls/s) until Ctrl-C")
    status.add_argument("--interval", type=positive(float), default=2.0, help="seconds between refreshes of --watch")
    commands.choices["ping"].add_argument(
        "--wait", type=positive(float, zero=True), default=0.0, metavar="SECONDS",
        help="retry until the server answers or SECONDS have passed (a server that is still starting)")
    commands.choices["stop"].add_argument(
        "--workers", action="store_true",
        help="its workers exit for good too (their `remote-executor worker` commands end with status 0)")
    worker = commands.choices["worker"]
    worker.add_argument("--processes", type=positive(int), default=os.cpu_count() or 1,
                        help="how many worker processes to run (default: the number of CPUs)")
    keygen = commands.add_parser("tls-keygen", help="write a private CA and TLS certificates for a tcp:// cluster",
                                 description=make_cluster_material.__doc__)
    keygen.set_defaults(func=_tls_keygen)
    keygen.add_argument("directory", help="where to write ca.pem, server.pem/.key and client.pem/.key")
    keygen.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                        help="a name or IP address clients and workers reach the server by (repeat for more)")
    keygen.add_argument("--days", type=int, default=825, help="how long the certificates are valid")
    _add_curve_flags(commands.choices)
    worker.add_argument("--name", help="name of the worker processes in status (default: HOSTNAME-PID)")
    worker.add_argument("--reconnect-timeout", type=float, default=None, metavar="S",
                        help="exit (status 1) after this many seconds without reaching the job server "
                             "(default: retry for ever)")
    worker.add_argument("--pool", help="the worker pool to serve: only calls of executors of that pool come "
                                       "here (default: the URL's /POOL, else 'default')")
    worker.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="exit at once when standard input closes (a 'drain' line on it drains): "
                             "workers that end with the SSH session that started them")
    from .cli_cluster import add_cluster_command  # the subcommands live there; their work is imported lazily
    from .cli_local import add_local_actions

    add_local_actions(add_cluster_command(commands))  # cluster start/stop: a local cluster, beside up/down
    from .cli_gearmand import add_gearmand_command

    add_gearmand_command(commands)
    _everywhere(parser)
    return parser


_DESCRIPTIONS = {
    "server": "Run the job server for tcp:// or zmq:// in the foreground, until SIGTERM or Ctrl-C. Without a "
              "key it listens on loopback only (unless --insecure).",
    "worker": "Run worker processes for a job server (tcp://, zmq://) or gearmand (gearman://), restarting "
              "any that crash. It says it serves once the job server has let a worker in; SIGTERM or Ctrl-C "
              "drains (running calls finish, then the processes exit).",
    "status": "Print, as JSON, the workers, clients and queues of a running job server (or gearmand).",
    "ping": "Check that a job server answers, and how fast; with --wait, retry until it does.",
    "stop": "Stop a job server from any machine with its key: no queued call starts any more, running calls "
            "finish, then it exits (its clients resubmit what was queued to another server of their URL, "
            "or fail once none answers). With --workers its workers then exit for good: their supervisors "
            "(`remote-executor worker`) do not restart them and end with status 0.",
}


def _everywhere(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """The same help formatter, and ``--log-level`` (after the subcommand too), for every (sub)command."""
    parser.formatter_class = _HelpFormatter
    if not top and not any("--log-level" in a.option_strings for a in parser._actions):
        # SUPPRESS: given after the subcommand it wins; not given there, it leaves the top level's value alone
        parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                            help="how much to log on standard error (default: INFO)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                line = helps.get(name)
                if sub.description is None and line:  # the one line of the command list, at least
                    sub.description = f"{line[:1].upper()}{line[1:]}."
                _everywhere(sub, top=False)


_INSECURE_HELP = {
    "server": "no key unless one is given, on any address: anyone who can connect runs code as the "
              "workers' user (trusted networks only)",
    "worker": "no key unless one is given: whoever can reach the server runs code as this user",
    "status": "no key unless one is given (for a server started with --insecure)",
    "ping": "no key unless one is given (for a server started with --insecure)",
    "stop": "no key unless one is given (for a server started with --insecure)",
}


def _backend(url: str) -> Backend:
    """The backend of a URL given on the command line (a clear error for a missing ``scheme://``)."""
    if "://" not in url:
        raise UsageError(f"expected a URL like tcp://host:port, got {url!r}")
    try:
        backend = get_backend(scheme_of(url))
    except UnknownSchemeError as exc:  # a typo in the command line ("did you mean 'tcp'?")
        raise UsageError(str(exc)) from exc
    try:
        backend.check_url(url)
    except TransportError as exc:  # a malformed address or pool name: a usage error, before anything starts
        raise UsageError(str(exc)) from exc
    return backend


def _key(args: argparse.Namespace) -> bytes | None:
    """The key of ``--key-file`` (``-``: the first line of standard input, so it is on no command line)."""
    if args.key_file == "-":
        return resolve_key(key=read_stdin_line())
    return resolve_key(key_file=args.key_file, insecure=args.insecure)


def _options(args: argparse.Namespace, **extra: Any) -> Options:
    return Options(key=_key(args), insecure=args.insecure, connect_timeout=args.timeout,
                   extra={k: v for k, v in extra.items() if v is not None})


def _client_options(args: argparse.Namespace, backend: Backend) -> Options:
    """Options of a client command (status, ping): the key, the timeout, TLS or CURVE files."""
    return _options(args, **_tls_options(args, backend), **_curve_client_extra(args, backend))


def _tls_options(args: argparse.Namespace, backend: Backend) -> dict[str, Any]:
    """The TLS options of the command line (for tcp:// and gearman://; zmq:// has CURVE instead)."""
    options = TlsConfig.options_from_args(args)
    if options and backend.scheme not in ("tcp", "gearman"):
        raise UsageError(f"the --tls options are for tcp:// and gearman:// only, not {backend.scheme}://")
    return options


def _server(args: argparse.Namespace) -> int:
    from .jobserver.backend import JobServerBackend, one_address
    from .jobserver.server import ServerCore

    backend = _backend(args.url)
    if isinstance(backend, JobServerBackend):
        try:
            one_address(args.url)
        except TransportError as exc:  # a list of servers, as clients take: a mistake in the command line
            raise UsageError(str(exc)) from exc
    extra = {**_curve_server_extra(args, backend), **_tls_options(args, backend)}
    key = _key(args)
    settings = ServerSettings(key=key, insecure=args.insecure,
                              limits=Limits(max_frame=args.max_frame_size),
                              heartbeat_interval=args.heartbeat_interval,
                              heartbeat_timeout=args.heartbeat_timeout, extra=extra)
    if key is None:
        log.warning("no key (--insecure): anyone who can connect can run code as the workers' user")
    server = backend.server(args.url, settings)

    # Ours first tell their clients which calls never started (resubmitted uncounted); a plugin's just stop.
    _stop_on_signals((lambda: server.stop(tell_clients=True)) if isinstance(server, ServerCore) else server.stop)
    log.info("serving %s", server.url)
    print(f"serving {server.url}", flush=True)
    server.serve_forever()
    return 0


def _worker(args: argparse.Namespace) -> int:
    key = _key(args)
    if getattr(args, "tls_ca", None) == "-":  # after the key's line: the SSH cluster sends both on stdin
        args.tls_ca = _tls_ca_from_stdin()
    backend = _backend(args.url)  # fail now, clearly, for an unknown scheme or a missing extra
    if type(backend).run_worker is Backend.run_worker:  # (memory://: its calls run in the executor's process)
        raise UsageError(f"{backend.scheme}:// has no worker processes to start")
    try:
        pool = pool_of_url(args.url, args.pool)  # and for a bad --pool
    except TransportError as exc:
        raise UsageError(str(exc)) from exc
    worker_args: tuple[str, ...] = ("--pool", pool, "--heartbeat-interval", str(args.heartbeat_interval),
                                    "--heartbeat-timeout", str(args.heartbeat_timeout),
                                    *(["--reconnect-timeout", str(args.reconnect_timeout)]
                                      if args.reconnect_timeout is not None else []),
                                    *(["--insecure"] if key is None else []),
                                    *_curve_worker_args(_curve_client_extra(args, backend)))
    if key is None:
        log.warning("no key (--insecure): whoever can reach %s can make these workers run code", args.url)
    tls = TlsConfig.from_options(_tls_options(args, backend))
    if tls is not None:
        tls.client_context()  # a file that cannot be loaded fails here, once, not in every worker process
        worker_args += tls.to_args()
    supervisor = Supervisor(args.url, args.processes, env=key_to_env(key), worker_args=worker_args,
                            name=args.name or f"{os.uname().nodename}-{os.getpid()}",
                            sibling_records=backend.sibling_records)
    stop = _stop_on_signals()
    supervisor.start()
    if args.exit_on_stdin_eof:
        # After start(): stop() must not run while start() is still spawning (the end of input, already
        # there, is read at once). The worker processes exit through their lifelines; one that cannot read
        # it (stopped, or in a C call holding the interpreter lock) is killed after ATEXIT_GRACE, so none
        # outlives the session.
        watch_stdin(stop, on_eof=lambda: supervisor.stop(timeout=ATEXIT_GRACE))
    announced = False
    while not stop.wait(0.1):  # the supervisor's events, and a signal's: whichever comes first
        if supervisor.refused.is_set():  # every process's log line above says why
            supervisor.stop()
            raise RemoteExecutorError(f"the job server {args.url} refused every worker process; each one's "
                                      f"reason is above (a key, TLS or CURVE setting, or other versions)")
        if supervisor.unreachable.is_set():
            supervisor.stop()
            raise RemoteExecutorError(f"could not reach {args.url} within --reconnect-timeout "
                                      f"{args.reconnect_timeout:g}s (see above); giving up")
        if supervisor.stopped.is_set():
            print(f"the job server {args.url} was stopped with its workers; exiting", flush=True)
            supervisor.stop()
            return 0
        if not announced and supervisor.serving.is_set():
            # Only now: "serving" means one process has been welcomed by the job server, not just started.
            print(f"{args.processes} worker process(es) serving {args.url} (pool {pool})", flush=True)
            announced = True
    log.info("draining workers")
    supervisor.drain(timeout=None)
    return 0


def _tls_ca_from_stdin() -> str:
    """``--tls-ca -``: the CA certificate as one line of standard input (base64 of its PEM), kept in a
    private file for the worker processes while this command runs."""
    line = read_stdin_line().strip()
    try:
        pem = base64.b64decode(line, validate=True)
    except ValueError:
        pem = b""
    if not pem.startswith(b"-----BEGIN CERTIFICATE-----"):
        raise ValueError("--tls-ca -: standard input did not carry a CA certificate (one line, base64 of its PEM)")
    directory = privatedirs.make("ca")
    atexit.register(directory.remove)
    path = os.path.join(directory.path, "ca.pem")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(pem)
    return path


def _status(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    options = _client_options(args, backend)
    if args.watch:
        if not args.interval > 0:
            raise UsageError("--interval must be a positive number of seconds")
        return _watch(args.url, backend, options, args.interval)
    info = backend.status(args.url, options)
    print(json.dumps(info, indent=2))
    return 0


def _watch(url: str, backend: Backend, options: Options, interval: float) -> int:
    """``status --watch``: redraw the view every ``interval`` seconds until SIGINT/SIGTERM (status 0)."""
    from .status import ClusterStatus, render

    stop = _stop_on_signals()
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""  # a log of views when not a terminal
    previous: ClusterStatus | None = None
    taken = 0.0
    while not stop.is_set():
        now = time.monotonic()
        try:
            current = ClusterStatus.from_dict(backend.status(url, options), url)
            text = render(current, previous, now - taken)
            previous, taken = current, now
        except RemoteExecutorError as exc:  # keep watching: the server may come back
            text = f"{url}: not answering: {exc}"
        print(f"{clear}{time.strftime('%H:%M:%S')}  every {interval:g}s, Ctrl-C to quit\n{text}\n", flush=True)
        stop.wait(interval)
    return 0


def _ping(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    options = _client_options(args, backend)
    stop = _stop_on_signals()
    start = time.perf_counter()

    def attempt() -> float:
        began = time.perf_counter()
        backend.status(args.url, options)
        return time.perf_counter() - began

    took = retry_with_backoff(attempt, args.wait, stop,
                              lambda exc, delay: log.info("no answer yet (%s); retrying in %.1fs", exc, delay),
                              transient=(RemoteExecutorError, OSError))
    if took is None:  # interrupted while waiting
        return 130
    waited = time.perf_counter() - start - took
    after = f" after waiting {waited:.1f}s" if waited >= 0.05 else ""
    print(f"{args.url} answered in {took * 1e3:.1f} ms{after}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    backend = _backend(args.url)
    if args.workers and backend.cannot_stop_workers:
        raise UsageError(f"--workers is not available for {backend.scheme}:// ({args.url}): "
                         f"{backend.cannot_stop_workers}")
    answers = backend.stop(args.url, _client_options(args, backend), args.workers)
    for answer in answers:
        workers = f"; its {answer.get('workers', 0)} worker(s) exit for good then" if args.workers else ""
        calls = f"{answer.get('running', 0)} running call(s)"
        if "queued" in answer:  # gearmand finishes its queued jobs too before it exits
            calls = f"{answer.get('running', 0)} running and {answer['queued']} queued call(s)"
        print(f"{answer.get('server', args.url)} is stopping: {calls} finish first{workers}", flush=True)
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


# --- zmq:// CURVE ---------------------------------------------------------------------------------------


def _add_curve_flags(commands: dict[str, argparse.ArgumentParser]) -> None:
    server = commands["server"]
    server.add_argument("--curve-secret-key", metavar="FILE",
                        help="zmq only: encrypt with CURVE using this secret certificate (zmq.auth)")
    server.add_argument("--curve-allow", metavar="DIR",
                        help="zmq only: admit only clients and workers whose public certificate (*.key) is in "
                             "DIR (needs --curve-secret-key; default: anyone with the server's public key)")
    for name in ("worker", "status", "ping", "stop"):
        commands[name].add_argument(
            "--curve-server-key", metavar="FILE",
            help="zmq only: the server's public CURVE certificate (default: $REMOTE_EXECUTOR_CURVE_SERVER_KEY)")
        commands[name].add_argument(
            "--curve-client-key", metavar="FILE",
            help="zmq only: this side's secret CURVE certificate, for a server with --curve-allow "
                 "(default: an ephemeral key)")


def _curve_server_extra(args: argparse.Namespace, backend: Backend) -> dict[str, str]:
    extra = {name: value for name, value in (("curve_secret_key", args.curve_secret_key),
                                             ("curve_allow", args.curve_allow)) if value}
    if extra and backend.scheme != "zmq":
        raise UsageError("--curve-secret-key and --curve-allow are for zmq:// servers only")
    if "curve_allow" in extra and "curve_secret_key" not in extra:
        raise UsageError("--curve-allow needs --curve-secret-key: the allow-list checks the keys of "
                         "CURVE connections, and without a secret key the server does not speak CURVE")
    return extra


def _curve_client_extra(args: argparse.Namespace, backend: Backend) -> dict[str, str]:
    """``--curve-server-key`` / ``--curve-client-key`` as transport options; the key files (and
    ``$REMOTE_EXECUTOR_CURVE_SERVER_KEY``) are read now, so a bad one fails before any process starts."""
    extra = {name: value for name, value in (("curve_server_key", args.curve_server_key),
                                             ("curve_client_key", args.curve_client_key)) if value}
    if backend.scheme != "zmq":
        if extra:
            raise UsageError("--curve-server-key and --curve-client-key are for zmq:// only")
        return extra
    from .transports.zmq.sockets import Curve  # pyzmq is installed: the zmq backend loaded

    Curve.from_options(extra)
    return extra


def _curve_worker_args(extra: dict[str, str]) -> tuple[str, ...]:
    """The same options as ``python -m remote_executor.worker`` arguments."""
    return tuple(arg for name, value in extra.items() for arg in (f"--{name.replace('_', '-')}", value))


def _stop_on_signals(then: Callable[[], object] | None = None) -> SignalEvent:
    """An event set by SIGTERM or Ctrl-C, which then calls ``then`` (on another thread: it may take locks)."""
    stop = SignalEvent()
    set_on_signals(stop, then)
    return stop


if __name__ == "__main__":
    sys.exit(main())
