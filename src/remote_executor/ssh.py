"""Workers on other machines without managing them by hand: a job server here, workers started over SSH.

    with RemoteExecutor(transport=SSHCluster(["node1", "node2"], processes=4)) as ex:
        ...

:class:`SSHCluster` runs our tcp job server in this process, with a fresh random key, listening on an
address the hosts can reach, and starts on every host, in an SSH session of the system's OpenSSH client
(so ``~/.ssh/config``, agents, jump hosts and known-hosts checking work as they do for the user)::

    remote-executor worker tcp://SCHEDULER:PORT --key-file - --exit-on-stdin-eof --name HOST [--processes N]

The key is the first line the session's standard input carries, never part of a command line another user
could read; the worker command exits the moment that input closes, so when this process ends, however it
ends (even SIGKILL), every SSH session ends and nothing is left running on any host. ``remote-executor
cluster up`` (:mod:`remote_executor.cli_cluster`) runs the same thing as a background process and records
where it is (:func:`running_cluster`).

Threads: one per host, which owns that host's SSH session: it reads the session's output (the worker
command's announcement, its log lines, a refusal by the job server), notices the session's end and, for a
host that had joined, starts a new session after a backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import privatedirs
from .errors import TransportError
from .netio import Backoff
from .pools import DEFAULT_POOL, is_pool_name
from .security import generate_key, normalize_key
from .ssh_servers import (
    GEARMAND_PORT,
    SCHEMES,
    ClusterServer,
    RemoteGearmand,
    gearmand_command,
    start_cluster_server,
)
from .transports.base import ClientTransport, ForwardingTransport, Listener, Options, Session

__all__ = [
    "ClusterInfo",
    "SSHCluster",
    "SSHClusterError",
    "SSHHost",
    "SSHJobServer",
    "parse_hosts",
    "read_hosts_file",
    "running_cluster",
]

log = logging.getLogger("remote_executor.ssh")

DEFAULT_REMOTE_COMMAND = "remote-executor"
TAIL_LINES = 40  # the last lines of each session's output, quoted when the host fails
RESTART_FIRST, RESTART_MAX = 1.0, 60.0  # backoff before a lost host's next session
# Used only where neither the user's ssh configuration nor ssh_options set them (ssh -G tells): a host that
# does not answer fails in seconds, not at the TCP timeout, and a session whose host vanished ends.
CONNECT_TIMEOUT = ("-o", "ConnectTimeout=15")
SERVER_ALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")
_ANNOUNCED = re.compile(r"^(\d+) worker process\(es\) serving ")
_CONNECT_FAILED = re.compile(r"connecting to (gearmand )?\S+: ")  # a worker's log line when a connection attempt failed
_REFUSED = "refused this worker: "  # how a worker logs a job server's REJECT (version, key): fatal for the host
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SERIOUS = re.compile(r" (WARNING|ERROR|CRITICAL) ")  # the level in the worker command's log lines


class SSHClusterError(TransportError):
    """Workers could not be started on one or more hosts; ``failures`` maps each host to what went wrong."""

    def __init__(self, message: str, failures: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)


@dataclass(frozen=True)
class SSHHost:
    """One host of a cluster, and what differs on it from the cluster's defaults.

    ``host`` is what ``ssh`` is given (``node1``, ``user@node1``, an alias of ``~/.ssh/config``);
    ``label`` names the host's workers in ``status`` (default: ``host``); ``remote_command`` is shell text
    that runs ``remote-executor`` there (``/opt/venv/bin/remote-executor``, ``python3 -m remote_executor.cli``);
    ``env`` is set for the workers (it is visible on the remote command line: never put a secret there);
    ``workdir`` is where they start; ``pool``: the worker pool they serve (default: the default pool), so that
    ``RemoteExecutor(transport=URL + "/POOL")`` sends calls to this host's workers only."""

    host: str
    processes: int | None = None
    label: str | None = None
    remote_command: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    pool: str | None = None

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise ValueError(f"not a host for ssh: {self.host!r}")
        if self.processes is not None and self.processes < 1:
            raise ValueError(f"{self.host}: processes must be at least 1, not {self.processes}")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{self.host}: not an environment variable name: {name!r}")
        if self.pool is not None and not is_pool_name(self.pool):
            raise ValueError(f"{self.host}: bad pool name {self.pool!r}: use 1 to 200 letters, digits, '.', '_' "
                             f"or '-'")

    @property
    def name(self) -> str:
        return self.label or self.host


# --- hosts files -----------------------------------------------------------------------------------------


def parse_hosts(text: str, source: str = "hosts") -> list[SSHHost]:
    """Hosts from the lines of a hosts file: ``host [processes] [pool] [option=value ...]``, ``#`` comments.

    ``processes`` is a number (``-`` or absent: the cluster's default); ``pool`` is the worker pool the host's
    workers serve. Options: ``command=`` (the remote command), ``workdir=``, ``label=`` (the host's name in
    ``status``, needed when one host appears twice), ``env.NAME=VALUE``; quote a value that holds spaces as a
    shell would."""
    hosts: list[SSHHost] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from exc
        if not tokens:
            continue
        try:
            hosts.append(_host_from_tokens(tokens))
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from exc
    return hosts


def read_hosts_file(path: str | os.PathLike[str]) -> list[SSHHost]:
    return parse_hosts(Path(path).read_text(), os.fspath(path))


def _host_from_tokens(tokens: list[str]) -> SSHHost:
    host, rest = tokens[0], tokens[1:]
    positional = [t for t in rest if "=" not in t]
    options = dict(t.split("=", 1) for t in rest if "=" in t)
    if len(positional) > 2:
        raise ValueError(f"expected `host [processes] [pool] [option=value ...]`, got {len(positional)} words "
                         f"after {host!r}")
    processes: int | None = None
    if positional and positional[0] != "-":
        if not positional[0].isdigit():
            raise ValueError(f"processes must be a number or -, not {positional[0]!r}")
        processes = int(positional[0])
    env = {name[4:]: value for name, value in options.items() if name.startswith("env.")}
    unknown = sorted(set(options) - {"command", "workdir", "label"} - {f"env.{n}" for n in env})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} (known: command=, workdir=, label=, env.NAME=)")
    return SSHHost(host, processes, options.get("label"), options.get("command"), env, options.get("workdir"),
                   positional[1] if len(positional) > 1 else None)


def as_hosts(hosts: Iterable[str | SSHHost]) -> list[SSHHost]:
    """Host names or :class:`SSHHost` objects as a list of SSHHost, each label once."""
    if isinstance(hosts, str):
        raise TypeError("hosts must be a list of host names, not one string")
    result = [h if isinstance(h, SSHHost) else SSHHost(h) for h in hosts]
    if not result:
        raise ValueError("an SSH cluster needs at least one host")
    seen: set[str] = set()
    for host in result:
        if host.name in seen:
            raise ValueError(f"{host.name!r} appears twice: give each entry a label of its own")
        seen.add(host.name)
    return result


# --- where the hosts reach us ------------------------------------------------------------------------------


def ssh_config(host: str, ssh_options: Sequence[str] = ()) -> dict[str, str]:
    """What ``ssh -G`` says ssh would use for ``host`` (its real hostname, jump host, ...): no connection."""
    argv = ["ssh", "-G", *ssh_options, "--", host]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise TransportError("the OpenSSH client (ssh) is not installed on this machine") from exc
    if result.returncode != 0:
        raise SSHClusterError(f"{host}: ssh -G failed: {result.stderr.strip()}", {host: result.stderr.strip()})
    config: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(" ")
        config.setdefault(name.lower(), value)
    return config


def route_address(host: str, ssh_options: Sequence[str] = ()) -> str:
    """The address of this machine's interface that routes to ``host`` (as ssh resolves it)."""
    config = ssh_config(host, ssh_options)
    target = config.get("hostname", host)
    if config.get("proxyjump", "none") != "none" or config.get("proxycommand", "none") != "none":
        log.warning("%s is reached through a jump host or proxy command: the address that routes to %s may not "
                    "be one %s can reach; pass scheduler_host (--scheduler-host) if the workers do not attach",
                    host, target, host)
    try:
        family, _, _, _, address = socket.getaddrinfo(target, 22, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)  # sends nothing: asks the kernel which local address routes there
            return str(probe.getsockname()[0])
    except OSError as exc:
        reason = f"cannot find the local address that routes to {target} ({exc}); pass scheduler_host " \
                 f"(--scheduler-host): an address of this machine the hosts can reach"
        raise SSHClusterError(f"{host}: {reason}", {host: reason}) from exc


# --- one host's SSH session --------------------------------------------------------------------------------


class _HostSession:
    """One host's SSH session running the worker command, restarted (if asked) after it is lost."""

    def __init__(self, host: SSHHost, argv: list[str], command: str, secrets: Sequence[bytes], restart: bool,
                 changed: threading.Event) -> None:
        self.host = host
        self.name = host.name
        self.argv = argv
        self.command = command  # the remote command, for the error when it is not found
        self._secrets = list(secrets)  # the key, then what the transport sends (a CA certificate), a line each
        self._restart = restart
        self._changed = changed  # set whenever something the cluster waits for happened
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.announced: int | None = None  # worker processes the command said it started
        self.refusal: str | None = None  # why the job server refused this host's workers
        self.exit_code: int | None = None  # of the session that ended last (None: running)
        self.joined = False  # its workers attached once: a lost session is restarted
        self.sessions = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._run, name=f"remote-executor-ssh {self.name}", daemon=True)
        self._thread.start()

    def _spawn(self) -> bool:
        """Start a session (False if stopping, or ssh could not even be started)."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self.announced = self.exit_code = None
            self.tail.clear()  # why a session ends is in its own output, not in that of the ones before it
            self.sessions += 1
            log.debug("%s: %s", self.name, shlex.join(self.argv))
            try:
                # A session of its own: Ctrl-C in the user's terminal reaches this process, which closes the
                # sessions in order, instead of killing ssh under the executor's feet.
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.proc = None
                self.exit_code = 255
                self.tail.append(f"cannot run ssh: {exc}")
                return False
            stdin = self.proc.stdin
            assert stdin is not None
            try:
                stdin.write(b"".join(line + b"\n" for line in self._secrets))  # never on a command line
                stdin.flush()
            except OSError:
                pass  # ssh already exited: its output says why
            return True

    def _run(self) -> None:
        backoff = Backoff(RESTART_FIRST, RESTART_MAX)
        while True:
            proc = self.proc
            started = time.monotonic()
            if proc is not None:
                self._read(proc)
                code = proc.wait()
                with self._lock:
                    self.exit_code = code
            with self._lock:
                joined = self.joined
            self._changed.set()
            if self._stopping.is_set():
                return
            if not (joined and self._restart and self.refusal is None):
                if joined:
                    log.warning("lost host %s: %s", self.name, self.describe_exit())
                return
            log.warning("lost host %s (%s); starting a new session", self.name, self.describe_exit())
            if time.monotonic() - started > RESTART_MAX:
                backoff.reset()
            if self._stopping.wait(backoff.next()):
                return
            if not self._spawn() and self._stopping.is_set():
                return  # (a session that ssh could not even start is retried like a lost one)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        output = proc.stdout
        assert output is not None
        for raw in output:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            # The host's warnings and errors reach this side's log; the rest only when debugging.
            log.log(logging.WARNING if _SERIOUS.search(line) else logging.DEBUG, "%s: %s", self.name, line)
            announced = _ANNOUNCED.match(line)
            if announced:
                self.announced = int(announced.group(1))
                self._changed.set()
            elif _REFUSED in line:
                if self.joined and self.refusal is None:
                    log.warning("%s: the job server refuses the host's workers now: %s", self.name, line)
                self.refusal = line.split(_REFUSED, 1)[1]
                self._changed.set()
        output.close()

    def mark_joined(self) -> bool:
        """Its workers attached: from now on a lost session is restarted. False if it has just ended."""
        with self._lock:
            if self.exit_code is not None:
                return False
            self.joined = True
            return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None

    def describe_exit(self) -> str:
        """Why the last session ended, with the last lines it printed."""
        tail = list(self.tail)  # a snapshot: the session's thread appends to it
        # What explains an end: not the announcement, nor the workers' routine reconnection attempts.
        lines = [line for line in tail if "connecting to" not in line and not _ANNOUNCED.match(line)][-6:]
        lines = lines or tail[-6:]
        said = " | ".join(lines) or "no output"
        code = self.exit_code
        if code == 255:
            if any(line.startswith("ssh:") for line in tail) or self.announced is None:
                return f"ssh failed: {said}"
            # ssh's own status, but ssh said nothing: the session was up and its command killed (a signal)
            # or the connection cut.
            return f"the SSH session ended (status 255: the worker command was killed, or the connection cut): {said}"
        if code == 127:
            return (f"the remote command was not found there ({self.command!r}; give the right one with "
                    f"remote_command= or --remote-command): {said}")
        return f"the worker command exited with status {code}: {said}"

    def request_stop(self, drain: bool) -> None:
        """Drain (a ``drain`` line: running calls finish) or stop at once (end of input)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is None or proc.stdin is None:
            return
        try:
            if drain:
                proc.stdin.write(b"drain\n")
                proc.stdin.flush()
            else:
                proc.stdin.close()
        except (OSError, ValueError):  # ssh has exited; or the input was closed already
            pass

    def finish(self, deadline: float | None) -> None:
        """Wait for the session to end by ``deadline``; then end it (input closed, then ssh killed)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None:
            # A command that never said it serves has nothing to drain, and may not read its input yet (a
            # shell still running what comes before the worker command): end its session without waiting.
            grace = 5.0 if self.announced is not None else 1.0
            if self.announced is None:
                deadline = time.monotonic() if deadline is None else min(deadline, time.monotonic())
            if not _wait(proc, deadline):
                _close(proc.stdin)  # end of input: the worker command exits at once
                if not _wait(proc, time.monotonic() + grace):
                    log.warning("%s: the SSH session did not end; killing ssh", self.name)
                    proc.kill()
                    proc.wait()
            _close(proc.stdin)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _wait(proc: subprocess.Popen[bytes], deadline: float | None) -> bool:
    """Whether ``proc`` exited by ``deadline`` (None: wait as long as it takes)."""
    try:
        proc.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return False
    return True


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            stream.close()


def _cluster_key(key: bytes | None) -> bytes:
    """The cluster's key: the one given, normalized as every key is, else a fresh one. The hosts read it as
    the first line of their standard input, so a key with a line break inside could never reach them."""
    if key is None:
        return generate_key()
    key = normalize_key(key, source="the cluster's key")
    if b"\n" in key:
        raise ValueError("the cluster's key reaches the hosts as one line: it cannot contain a line break "
                         "(hex-encode a binary key: key=key.hex().encode())")
    return key


# --- the job server and the hosts' workers -----------------------------------------------------------------


class SSHJobServer:
    """Our tcp job server in this process and workers started over SSH on each host: the part of
    :class:`SSHCluster` that ``remote-executor cluster up`` runs too.

    :meth:`launch` returns once every host's workers have attached (or raises :class:`SSHClusterError`
    naming each host that failed; with ``allow_partial`` those are a warning, as long as one host is up);
    :meth:`stop` ends the SSH sessions, and with them the workers, then the server."""

    def __init__(
        self,
        hosts: Iterable[str | SSHHost],
        processes: int | None = None,
        *,
        scheduler_host: str | None = None,
        port: int = 0,
        ssh_options: Sequence[str] = (),
        remote_command: str = DEFAULT_REMOTE_COMMAND,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        allow_partial: bool = False,
        start_timeout: float = 60.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        restart_hosts: bool = True,
        key: bytes | None = None,
        transport: str = "tcp",
        gearmand_host: str | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("processes must be at least 1")
        if isinstance(ssh_options, str):
            raise TypeError("ssh_options must be a list of arguments, e.g. ['-i', '/path/key', '-o', 'Port=2222']")
        self.hosts = as_hosts(hosts)
        self.processes = processes
        self.scheduler_host = scheduler_host
        self.port = port
        self.ssh_options = list(ssh_options)
        self.remote_command = remote_command
        self.env = dict(env or {})
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        self.workdir = workdir
        self.allow_partial = allow_partial
        self.start_timeout = start_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.restart_hosts = restart_hosts
        self.key = _cluster_key(key)
        if transport not in SCHEMES:
            raise ValueError(f"an SSH cluster's transport is one of {', '.join(SCHEMES)}, not {transport!r}")
        self.transport = transport
        if gearmand_host is not None and transport != "gearman":
            raise ValueError("gearmand_host is for transport='gearman'")
        self.gearmand_host = gearmand_host
        self.url = ""
        self.failures: dict[str, str] = {}  # hosts left out (allow_partial)
        self.server: Any = None  # the job server (a ServerCore), once launched
        self._launched: ClusterServer | None = None
        self._sessions: dict[str, _HostSession] = {}
        self._changed = threading.Event()
        self._stopped = False

    # --- starting ------------------------------------------------------------------------------------------

    @property
    def client_options(self) -> dict[str, str]:
        """What a client in another process passes besides the URL and the key: the files that let it verify
        the job server (the cluster CA for tcp's TLS, the server's public CURVE key for zmq)."""
        return dict(self._launched.client_options) if self._launched is not None else {}

    def launch(self) -> None:
        """Start the server and every host's workers; return once they are attached."""
        address = self.scheduler_host or route_address(self.hosts[0].host, self.ssh_options)
        material = privatedirs.make("cluster")  # keys and certificates
        try:
            self._launched = start_cluster_server(
                self.transport, address, self.port, self.key, material, heartbeat_interval=self.heartbeat_interval,
                heartbeat_timeout=self.heartbeat_timeout, gearmand=self._remote_gearmand())
        except OSError as exc:
            material.remove()
            raise TransportError(f"cannot listen on {address} port {self.port} for the SSH cluster's job server: "
                                 f"{exc.strerror or exc} (scheduler_host must be an address of this machine)") from exc
        except BaseException:
            material.remove()
            raise
        self.server = getattr(self._launched, "core", None)  # our job server; None for gearmand
        self.url = self._launched.url
        log.info("job server for the SSH cluster at %s", self.url)
        try:
            for host in self.hosts:
                session = _HostSession(host, self.ssh_argv(host), host.remote_command or self.remote_command,
                                       [self.key, *self._launched.stdin_lines], self.restart_hosts, self._changed)
                self._sessions[host.name] = session
                session.start()
            failures = self._wait_attached(time.monotonic() + self.start_timeout)
            self._settle(failures)
        except BaseException:
            self.stop()
            raise

    def ssh_argv(self, host: SSHHost) -> list[str]:
        """The ssh command line that runs ``host``'s workers (the key is not on it)."""
        return self._ssh_argv(host.host, self.remote_command_line(host))

    def _ssh_argv(self, target: str, command: str) -> list[str]:
        """``ssh ... TARGET COMMAND``. Options on a command line win over ssh's configuration files, so a
        default of ours is added only where the user's configuration leaves the setting at ssh's own default."""
        config = ssh_config(target, self.ssh_options)
        defaults = [*(CONNECT_TIMEOUT if config.get("connecttimeout", "none") == "none" else ()),
                    *(SERVER_ALIVE if config.get("serveraliveinterval", "0") == "0" else ())]
        return ["ssh", "-o", "BatchMode=yes", *self.ssh_options, *defaults, "-T", "--", target, command]

    def _remote_gearmand(self) -> RemoteGearmand | None:
        """Where to start gearmand over SSH (``gearmand_host``), or None (ours, or gearmand here)."""
        if self.gearmand_host is None:
            return None
        port = self.port or GEARMAND_PORT
        address = ssh_config(self.gearmand_host, self.ssh_options).get("hostname", self.gearmand_host)
        command = gearmand_command(self.remote_command, port)
        if self.env:  # the cluster's environment (PYTHONPATH, PATH): what finds remote-executor there
            command = " ".join(["env", *(shlex.quote(f"{k}={v}") for k, v in self.env.items()), command])
        argv = self._ssh_argv(self.gearmand_host, command)
        return RemoteGearmand(self.gearmand_host, argv, address, port)

    def remote_command_line(self, host: SSHHost) -> str:
        """The shell command the host runs: ``[cd DIR &&] [env K=V ...] REMOTE-COMMAND worker URL ...``."""
        processes = host.processes or self.processes
        args = ["worker", self.url, "--key-file", "-", "--exit-on-stdin-eof", "--name", host.name,
                "--heartbeat-interval", str(self.heartbeat_interval),
                "--heartbeat-timeout", str(self.heartbeat_timeout)]
        if self._launched is not None:
            args += self._launched.worker_args
        if processes is not None:
            args += ["--processes", str(processes)]
        if host.pool is not None:
            args += ["--pool", host.pool]
        env = {**self.env, **host.env}
        words = [host.remote_command or self.remote_command, *map(shlex.quote, args)]
        if env:
            words = ["env", *(shlex.quote(f"{k}={v}") for k, v in env.items()), *words]
        workdir = host.workdir or self.workdir
        if workdir:
            words = ["cd", shlex.quote(workdir), "&&", *words]
        return " ".join(words)

    def _wait_attached(self, deadline: float) -> dict[str, str]:
        """Wait until each host's workers are attached or it failed; what failed, per host."""
        failures: dict[str, str] = {}
        waiting = dict(self._sessions)
        while waiting:
            self._changed.clear()
            attached = self.workers_attached()
            for name, session in list(waiting.items()):
                reason = self._failure(session)
                if reason is not None:
                    failures[name] = reason
                elif session.announced is not None and attached.get(name, 0) >= session.announced:
                    if not session.mark_joined():
                        continue  # its session ended meanwhile: the next round reports why
                    log.info("%s: %d worker process(es) attached", name, session.announced)
                else:
                    continue
                del waiting[name]
            if waiting and time.monotonic() >= deadline:
                for name, session in waiting.items():
                    failures[name] = self._timed_out(session, attached.get(name, 0))
                break
            # Session events (output, exit) set the flag; workers attaching do not, hence the short wait.
            self._changed.wait(0.1)
        return failures

    def _failure(self, session: _HostSession) -> str | None:
        if session.refusal is not None:
            return f"the job server refused its workers: {session.refusal}"
        if session.exit_code is not None or session.proc is None:
            return session.describe_exit()
        return None

    def _timed_out(self, session: _HostSession, attached: int) -> str:
        tail = list(session.tail)  # a snapshot: the session's thread appends to it
        lines = " | ".join(tail[-4:]) or "no output"
        reach = (f"can the host reach {self.url}? (pass scheduler_host / --scheduler-host: an address of this "
                 f"machine it can reach) Last output: {lines}")
        if session.announced is None:
            # A worker says it serves only once the job server took it: one that keeps failing to connect
            # says "connecting to URL: <why>" instead, which is the question to ask, not "did not start".
            if any(_CONNECT_FAILED.search(line) for line in tail):
                return f"its worker processes could not connect within {self.start_timeout:g}s; {reach}"
            return f"the worker command did not start within {self.start_timeout:g}s: {lines}"
        return f"{attached} of {session.announced} worker process(es) attached within {self.start_timeout:g}s; {reach}"

    def _settle(self, failures: dict[str, str]) -> None:
        if not failures:
            return
        self.failures = failures
        for name in failures:
            session = self._sessions.pop(name)
            session.request_stop(drain=False)
            session.finish(time.monotonic() + 5.0)
        detail = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
        message = f"could not start workers on {len(failures)} of {len(self.hosts)} host(s): {detail}"
        if self.allow_partial and self._sessions:
            log.warning("%s; running on the others", message)
            warnings.warn(f"{message}; running on the others", RuntimeWarning, stacklevel=2)
            return
        raise SSHClusterError(message, failures)

    # --- running -------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The job server's view (``remote-executor status``), read in this process (gearmand: asked)."""
        return self._launched.status() if self._launched is not None else {}

    def server_ended(self) -> bool:
        """True once the cluster's job server stopped without us (``remote-executor stop URL``)."""
        return self._launched is not None and self._launched.ended()

    def workers_attached(self) -> dict[str, int]:
        """How many worker processes of each host are attached now (draining ones do not count)."""
        counts: dict[str, int] = {}
        for worker in self._launched.workers() if self._launched is not None else []:
            if worker.get("draining"):
                continue
            label = host_of_worker(str(worker.get("name", "")))
            counts[label] = counts.get(label, 0) + 1
        return counts

    def host_states(self) -> dict[str, dict[str, Any]]:
        """Each host: its workers attached, whether its SSH session is up, how many sessions it took."""
        attached = self.workers_attached()
        states = {name: {"workers": attached.get(name, 0), "session": "up" if s.running else "down",
                         "sessions": s.sessions} for name, s in self._sessions.items()}
        for name, reason in self.failures.items():
            states[name] = {"workers": 0, "session": "failed", "error": reason}
        return states

    # --- stopping ------------------------------------------------------------------------------------------

    def stop(self, drain: bool = False, timeout: float | None = 10.0) -> None:
        """End every SSH session (``drain``: running calls finish first), then the server. Idempotent.

        After ``timeout`` seconds a session still running is ended at once (its input closed, then ssh
        killed); ``None`` waits as long as the drain takes."""
        sessions = list(self._sessions.values())
        for session in sessions:
            session.request_stop(drain)
        deadline = None if timeout is None else time.monotonic() + timeout
        for session in sessions:
            session.finish(deadline)
        if self._launched is not None and not self._stopped:
            self._stopped = True
            self._launched.stop()


def host_of_worker(name: str) -> str:
    """The host label in a worker's name as the job server shows it: ``LABEL-INDEX#CONNECTION``."""
    base = name.rsplit("#", 1)[0]
    label, sep, index = base.rpartition("-")
    return label if sep and index.isdigit() else base


# --- the executor's transport ----------------------------------------------------------------------------


class SSHCluster(SSHJobServer, ForwardingTransport):
    """``RemoteExecutor(transport=SSHCluster(["node1", "node2"], processes=4))``: workers on other machines,
    started over SSH when the executor starts and stopped at its shutdown.

    ``hosts``: host names (anything ``ssh`` accepts, aliases of ``~/.ssh/config`` included) or
    :class:`SSHHost` objects for per-host settings. ``processes``: worker processes per host (default: the
    host's CPU count). ``scheduler_host``: the address of this machine the hosts connect to (default: the
    address of the interface that routes to the first host); ``port``: its port (default: any free one).
    ``ssh_options``: extra ``ssh`` arguments (``["-i", "/path/key", "-o", "UserKnownHostsFile=/path"]``);
    where neither they nor the user's ssh configuration set them, a 15 s connect timeout and keepalives
    every 5 s are added; ``BatchMode=yes`` is always on: nothing can prompt. ``remote_command``: how to run
    ``remote-executor`` on the hosts; ``env`` and ``workdir``: the workers' environment and directory.
    ``allow_partial``: a host that fails to start is a warning, not an error, as long as one host runs.
    ``restart_hosts``: a host whose session is lost after it joined gets a new session, with a backoff.
    ``start_timeout``: how long every host's workers have to attach; ``heartbeat_interval`` and
    ``heartbeat_timeout``: how soon a silent worker counts as lost (its calls then run elsewhere).

    ``transport``: ``"tcp"`` (the default: TLS with a certificate made for the cluster) or ``"zmq"`` (CURVE
    with a key pair made for the cluster; pyzmq on every host). ``pool``: the worker pool this executor's calls
    go to (hosts serve the pool of their :class:`SSHHost`; default: the default pool).

    The job server's key is fresh and random for each cluster, and reaches the hosts on the SSH sessions'
    standard input; the workers exit when their session ends, so nothing outlives this process.
    """

    def __init__(self, hosts: Iterable[str | SSHHost], processes: int | None = None, *, pool: str | None = None,
                 **options: Any) -> None:
        SSHJobServer.__init__(self, hosts, processes, **options)
        if pool is not None and not is_pool_name(pool):
            raise ValueError(f"bad pool name {pool!r}: use 1 to 200 letters, digits, '.', '_' or '-'")
        self.pool = pool or DEFAULT_POOL
        self._client: ClientTransport | None = None

    def start(self, session: Session, listener: Listener) -> None:
        self.launch()
        assert self._launched is not None
        # Our job server: linked in-process, no socket hop; gearmand: a client of it, jobs sealed with the key.
        self._client = self._launched.client(self.pool, Options(
            key=self.key, heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout))
        self._client.start(session, listener)
        self.time_limits = self._client.time_limits  # what the job server's client can do, this transport can

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.stop()


# --- where `remote-executor cluster up` records its cluster ---------------------------------------------


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/remote_executor`` (an absolute ``$XDG_CONFIG_HOME`` only), else ``~/.config/...``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "remote_executor"


def state_path() -> Path:
    return config_dir() / "cluster.json"


@dataclass(frozen=True)
class ClusterInfo:
    """A cluster started by ``remote-executor cluster up``: where it is, and who runs it."""

    url: str
    key_file: str
    pid: int
    hosts: list[str]
    log_file: str = ""
    options: dict[str, str] = field(default_factory=dict)  # how to verify the server: tls_ca, curve_server_key

    def executor_options(self) -> dict[str, str]:
        """``RemoteExecutor(**info.executor_options())``: its URL, key file, and the file that verifies the
        job server (the cluster's CA for tcp, its public CURVE key for zmq)."""
        return {"transport": self.url, "key_file": self.key_file, **self.options}


def running_cluster() -> ClusterInfo:
    """The cluster ``remote-executor cluster up`` started (from its file in the config directory).

    Raises :class:`TransportError` if none is recorded there."""
    path = state_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TransportError(f"no cluster is up (no {path}): start one with `remote-executor cluster start` "
                             f"(on this machine) or `remote-executor cluster up` (over SSH)") from None
    except ValueError as exc:
        raise TransportError(f"{path} is not a cluster file: {exc}") from exc
    return ClusterInfo(url=str(data["url"]), key_file=str(data["key_file"]), pid=int(data["pid"]),
                       hosts=[str(h) for h in data.get("hosts", [])], log_file=str(data.get("log_file", "")),
                       options={str(k): str(v) for k, v in data.get("options", {}).items()})


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (created 0600 before any byte is in it), atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an umask cannot loosen it, and a leftover temporary file is reset
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)

