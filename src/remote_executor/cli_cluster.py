"""``remote-executor cluster``: a long-lived cluster of workers on other machines, started over SSH.

    remote-executor cluster up --hosts node1,node2 --processes 4   the job server here (in the background),
                                                                    workers on node1 and node2 over SSH
    remote-executor cluster status                                  where it is; its hosts and workers
    remote-executor cluster down                                    drain the workers, stop everything
    remote-executor cluster run --hosts ...                         as `up`, in the foreground (systemd)
    remote-executor cluster start -n 4                              a job server and 4 workers on this machine
    remote-executor cluster stop                                    the same as `down`

`up` records the cluster in $XDG_CONFIG_HOME/remote_executor/ (default ~/.config/remote_executor/):
cluster.json (its URL, key file and the file that verifies the job server) and cluster.key, both readable by
you only, and cluster.log; `start` records its cluster there too. Connect with remote_executor.connect().
--transport tcp (TLS, the default) or zmq (CURVE) encrypts the wire of an SSH cluster.

A hosts file (--hosts-file) has one `host [processes] [pool] [command=...] [workdir=...] [env.NAME=...]` per
line; `#` starts a comment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RemoteExecutorError
from .signals import SignalEvent, set_on_signals
from .usage import UsageError

if TYPE_CHECKING:
    from .ssh import ClusterInfo, SSHHost

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # subscriptable for type checkers only

log = logging.getLogger("remote_executor.cli")

STATE_NAME, KEY_NAME, LOG_NAME = "cluster.json", "cluster.key", "cluster.log"
READY_MARGIN = 30.0  # seconds `up` waits for the background process beyond its start timeout


def add_cluster_command(commands: Subcommands) -> Subcommands:
    """Register ``remote-executor cluster up|run|status|down`` (the work is imported when it runs); the
    actions, for the local cluster's ``start``/``stop`` (:mod:`remote_executor.cli_local`) to join them."""
    cluster = commands.add_parser("cluster", help="a long-lived cluster: here (start/stop) or over SSH (up/down)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cluster.add_subparsers(required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start a cluster in the background")
    run = actions.add_parser("run", help="run a cluster in the foreground until SIGTERM (for systemd)")
    for parser in (up, run):
        _launch_arguments(parser)
    up.set_defaults(func=_up)
    run.set_defaults(func=_run)
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # how `up` hears that the cluster is up
    status = actions.add_parser("status", help="show the running cluster: URL, key file, hosts, workers")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the job server")
    status.set_defaults(func=_status)
    down = actions.add_parser("down", help="drain the workers, stop the job server, forget the cluster")
    down.add_argument("--timeout", type=float, default=600.0,
                      help="seconds to let running calls finish before everything is stopped at once")
    down.set_defaults(func=_down)
    return actions


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", help="comma-separated hosts, as ssh takes them (node1,user@node2,alias)")
    parser.add_argument("--hosts-file", help="one `host [processes] [pool] [option=value ...]` per line")
    parser.add_argument("--processes", type=int, help="worker processes per host (default: its CPU count)")
    parser.add_argument("--transport", choices=("tcp", "zmq", "gearman"), default="tcp",
                        help="tcp: our job server here, with TLS; zmq: with CURVE (pyzmq on every host); "
                             "gearman: gearmand, jobs sealed with the key (default: %(default)s)")
    parser.add_argument("--gearmand-host", help="with --transport gearman: start gearmand on this host over SSH "
                                                "(default: here)")
    parser.add_argument("--scheduler-host", help="address of this machine the hosts connect to "
                                                 "(default: the one that routes to the first host)")
    parser.add_argument("--port", type=int, default=0, help="the job server's port (default: any free one)")
    parser.add_argument("--remote-command", default="remote-executor",
                        help="shell command that runs remote-executor on the hosts "
                             "(e.g. /opt/venv/bin/remote-executor)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the workers (repeatable; visible on the remote command line)")
    parser.add_argument("--workdir", help="directory the workers start in")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="ARGS",
                        help="extra ssh arguments, split as a shell would: --ssh-option='-i /path/key' (repeatable)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="start on the hosts that work (a warning names the others)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for every host's workers to attach")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="seconds between heartbeats while nothing else is sent")
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0,
                        help="seconds of silence after which the other side counts as lost")


# --- up / run --------------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    """Start ``cluster run`` as a background process; return once it says the cluster is up (or failed)."""
    _refuse_if_running()
    _hosts(args), _env(args), _ssh_options(args)  # bad arguments are an error here, not in a log file
    report = _background(["cluster", "run", *_run_arguments(args)], args.log_level, args.timeout + READY_MARGIN)
    for host, reason in report.get("failed", {}).items():
        print(f"remote-executor: warning: no workers on {host}: {reason}", file=sys.stderr)
    hosts = ", ".join(f"{host} ({count})" for host, count in report["workers"].items())
    log_path = report["log_file"]
    print(f"cluster up: {report['url']}, worker processes on {hosts}\n"
          f"key file:   {report['key_file']}\n"
          f"state:      {report['state_file']} (log: {log_path})\n"
          f"use it:     RemoteExecutor(**running_cluster().executor_options())   "
          f"(from remote_executor.ssh import running_cluster)\n"
          f"stop it:    remote-executor cluster down", flush=True)
    return 0


def _background(command_args: list[str], log_level: str, timeout: float) -> dict[str, Any]:
    """Run ``remote-executor COMMAND_ARGS --ready-fd FD`` in the background, its output in cluster.log; return
    its report once it says the cluster is up, or raise with why it is not."""
    from .ssh import config_dir

    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = directory / LOG_NAME
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "remote_executor.cli", "--log-level", log_level, *command_args,
               "--ready-fd", str(write_end)]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # A session of its own: the cluster outlives this command and the terminal's Ctrl-C.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                pass_fds=(write_end,), start_new_session=True, env=_child_env())
    finally:
        os.close(log_fd)
        os.close(write_end)
    try:
        with _signals_raise():
            report = _read_report(read_end, timeout)
    except BaseException as exc:  # Ctrl-C, SIGTERM, SIGHUP: what was starting must not come up behind our back
        print("remote-executor: interrupted; stopping the cluster that was starting", file=sys.stderr, flush=True)
        _stop_starting(proc)
        if isinstance(exc, _Terminated):
            raise SystemExit(128 + exc.signum) from None
        raise
    finally:
        os.close(read_end)
    if report is None:
        code = proc.poll()
        if code is None:
            proc.terminate()  # its SSH sessions, and with them the workers, end with it
            proc.wait()
            detail = f"it did not report within {timeout:g}s"
        else:
            detail = f"it exited with status {code}"
        raise RemoteExecutorError(f"the cluster did not start: {detail}; see {log_path}:\n{_tail(log_path)}")
    if not report.get("ok"):
        proc.wait()
        raise RemoteExecutorError(f"the cluster did not start: {report.get('error')} (log: {log_path})")
    return {**report, "log_file": str(log_path)}


def _run(args: argparse.Namespace) -> int:
    """The cluster in this process until SIGTERM or Ctrl-C: then drain the workers and stop."""
    from .ssh import SSHJobServer, config_dir, state_path, write_private

    ready_fd: int | None = args.ready_fd
    try:
        _refuse_if_running()
        hosts = _hosts(args)
        cluster = SSHJobServer(
            hosts, args.processes, scheduler_host=args.scheduler_host, port=args.port, transport=args.transport,
            gearmand_host=args.gearmand_host,
            ssh_options=_ssh_options(args), remote_command=args.remote_command, env=_env(args),
            workdir=args.workdir, allow_partial=args.allow_partial, start_timeout=args.timeout,
            heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout)
    except Exception as exc:
        _report(ready_fd, {"ok": False, "error": str(exc)})
        raise
    stop = SignalEvent()

    def at_once() -> None:  # a second signal while draining: stop at once
        raise KeyboardInterrupt

    set_on_signals(stop, again=at_once)
    key_file, state_file = config_dir() / KEY_NAME, state_path()
    write_private(key_file, cluster.key + b"\n")
    try:
        try:
            cluster.launch()
        except Exception as exc:
            _report(ready_fd, {"ok": False, "error": str(exc)})
            raise
        attached = cluster.workers_attached()
        running = [h.name for h in cluster.hosts if h.name not in cluster.failures]
        state = {"url": cluster.url, "key_file": str(key_file), "pid": os.getpid(), "hosts": running,
                 "options": cluster.client_options, "failed": cluster.failures,
                 "log_file": str(config_dir() / LOG_NAME), "started": time.time()}
        write_private(state_file, json.dumps(state, indent=2).encode() + b"\n")
        _report(ready_fd, {"ok": True, "url": cluster.url, "key_file": str(key_file), "state_file": str(state_file),
                           "workers": {h: attached.get(h, 0) for h in running}, "failed": cluster.failures})
        log.info("cluster up at %s", cluster.url)
        print(f"cluster up at {cluster.url}; key file {key_file}", flush=True)
        while not stop.wait(0.5):
            if cluster.server_ended():  # `remote-executor stop URL`: the cluster ends with its job server
                log.warning("the job server %s was stopped; stopping the cluster", cluster.url)
                break
        log.info("draining the workers and stopping the cluster")
        try:
            cluster.stop(drain=True, timeout=None)
        except KeyboardInterrupt:
            log.warning("stopping the workers at once")
    finally:
        cluster.stop()
        _forget(state_file, key_file, os.getpid())
    return 0


def _report(fd: int | None, message: dict[str, Any]) -> None:
    """Tell `up` (waiting on the other end of ``fd``) how the start went; once."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(message).encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP while ``cluster up``/``start`` waits for its background process."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Terminated` in the block (as Ctrl-C raises KeyboardInterrupt): their
    default action would end this process and leave the cluster it is starting to come up unseen."""
    def handler(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    # Only where the default would end us: a signal ignored (nohup) or handled by whoever runs us stays so.
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) is signal.SIG_DFL}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _stop_starting(proc: subprocess.Popen[bytes]) -> None:
    """Stop a background cluster that has not reported yet, and wait until it is gone: SIGTERM (it stops
    once started), a second one (an SSH cluster stops at once, even while starting), then SIGKILL; its
    files are removed if it could not remove them itself. Its hosts' sessions end with it."""
    from .ssh import config_dir, state_path

    for signum, wait in ((signal.SIGTERM, 2.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        break
    # Only files that name it: a missing or unreadable record may be another cluster's, starting.
    _forget(state_path(), config_dir() / KEY_NAME, proc.pid, unrecorded_is_ours=False)


def _read_report(fd: int, timeout: float) -> dict[str, Any] | None:
    """The background process's report; None if it ended (or went quiet) without one."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    try:
        report: dict[str, Any] = json.loads(data)
    except ValueError:
        return None
    return report


# --- status / down -----------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from .security import resolve_key
    from .ssh import host_of_worker, running_cluster, state_path
    from .transports import get_backend, scheme_of
    from .transports.base import Options

    info = running_cluster()
    if not _alive(info.pid):
        print(f"remote-executor: the cluster in {state_path()} is not running (process {info.pid} is gone); "
              f"`remote-executor cluster down` forgets it", file=sys.stderr)
        return 1
    server = get_backend(scheme_of(info.url)).status(
        info.url, Options(key=resolve_key(key_file=info.key_file), connect_timeout=args.timeout, extra=info.options))
    workers: dict[str, int] = dict.fromkeys(info.hosts, 0)
    for worker in server.get("workers", []):
        host = host_of_worker(str(worker.get("name", "")))
        workers[host] = workers.get(host, 0) + 1
    print(json.dumps({"url": info.url, "key_file": info.key_file, "pid": info.pid, "state_file": str(state_path()),
                      "log_file": info.log_file, "workers": workers, "server": server}, indent=2))
    return 0


def _down(args: argparse.Namespace) -> int:
    from .errors import TransportError
    from .ssh import config_dir, running_cluster, state_path

    if not state_path().exists():  # nothing to stop: done, as asked (not an error line, not a failure)
        print(f"no cluster is up (no {state_path()})", flush=True)
        return 0
    try:
        info = running_cluster()
    except TransportError as exc:  # a file that is not a cluster's: left for the user to look at
        print(f"remote-executor: {exc}", file=sys.stderr)
        return 1
    if _alive(info.pid):
        os.kill(info.pid, signal.SIGTERM)  # it drains its workers, stops its server, removes its files
        if not _wait_gone(info.pid, args.timeout):
            print(f"remote-executor: the cluster did not stop within {args.timeout:g}s; killing it "
                  f"(its workers end with their SSH sessions)", file=sys.stderr)
            os.kill(info.pid, signal.SIGKILL)
            _wait_gone(info.pid, 30.0)
    _forget(state_path(), config_dir() / KEY_NAME, info.pid)
    print(f"cluster down ({info.url})", flush=True)
    return 0


# --- helpers -------------------------------------------------------------------------------------------------


def _hosts(args: argparse.Namespace) -> list[SSHHost]:
    from .ssh import SSHHost, read_hosts_file

    hosts = read_hosts_file(args.hosts_file) if args.hosts_file else []
    hosts += [SSHHost(name.strip()) for name in (args.hosts or "").split(",") if name.strip()]
    if not hosts:
        raise UsageError("no hosts: give --hosts node1,node2 or --hosts-file FILE")
    return hosts


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env takes NAME=VALUE, not {item!r}")
        env[name] = value
    return env


def _ssh_options(args: argparse.Namespace) -> list[str]:
    return [word for option in args.ssh_option for word in shlex.split(option)]


def _run_arguments(args: argparse.Namespace) -> list[str]:
    """``up``'s arguments for the ``run`` it starts (paths made absolute: same meaning, any directory)."""
    argv = ["--port", str(args.port), "--transport", args.transport, "--remote-command", args.remote_command,
            "--timeout", str(args.timeout),
            "--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-timeout", str(args.heartbeat_timeout)]
    if args.hosts:
        argv += ["--hosts", args.hosts]
    if args.hosts_file:
        argv += ["--hosts-file", os.path.abspath(args.hosts_file)]
    for name in ("processes", "scheduler_host", "workdir", "gearmand_host"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += [f"--env={item}" for item in args.env] + [f"--ssh-option={item}" for item in args.ssh_option]
    return [*argv, "--allow-partial"] if args.allow_partial else argv


def _child_env() -> dict[str, str]:
    """This process's environment, with this very package first on the import path."""
    package_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, path) if p)}


def _refuse_if_running() -> None:
    from .errors import TransportError
    from .ssh import running_cluster, state_path

    try:
        info: ClusterInfo = running_cluster()
    except TransportError:
        return
    if _alive(info.pid) and info.pid != os.getpid():
        raise RemoteExecutorError(f"a cluster is already up at {info.url} (process {info.pid}, {state_path()}): "
                           f"`remote-executor cluster stop` (the same as `cluster down`) first")


def _forget(state_file: Path, key_file: Path, pid: int, unrecorded_is_ours: bool = True) -> None:
    """Remove the cluster's files, if they are still those of the cluster run by ``pid``; a missing or
    unreadable record counts as its own only with ``unrecorded_is_ours`` (the cluster itself, ending)."""
    try:
        recorded = json.loads(state_file.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        recorded = pid if unrecorded_is_ours else None
    if recorded == pid:
        state_file.unlink(missing_ok=True)
        key_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """True if ``pid`` runs, and (where /proc says) it is a remote_executor process that is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        return state != "Z" and b"remote_executor" in command  # not a stranger that reused the pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to end (a pidfd where there is one, else polling)."""
    deadline = time.monotonic() + timeout
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    try:
        while _alive(pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], min(remaining, 1.0))  # readable once it has exited
            else:
                time.sleep(min(remaining, 0.1))
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
