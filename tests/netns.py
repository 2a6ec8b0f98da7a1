"""Hosts for the chaos and SSH tests: Linux network namespaces on one private bridge, nothing in the root
namespace.

A :class:`Network` is a "switch" namespace holding a bridge, and one namespace per host, each joined to the
bridge by a veth pair that is created *inside* the switch namespace (its other end moved straight into the
host's namespace). Addresses come from :data:`SUBNET` and exist only inside these namespaces; there is no
default route, so a host can reach the other hosts of its network and nothing else::

    with Network() as net:
        server = net.add_host("srv")                    # 10.213.0.1 on eth0
        proc = net.exec_in(server, ["python3", "-m", "http.server", "--bind", server.addr])
        net.link_down(server)                           # a partition: the host's cable is pulled
        net.link_up(server)

Every name starts with a prefix (:data:`PREFIX` unless a suite chooses its own) followed by the owning process
id, so :func:`cleanup_stale` can delete what a crashed run left behind without touching a concurrent run's
namespaces. :meth:`Network.close` kills
every process still inside its namespaces and deletes them (and with them every link).

Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PREFIX = "rexc-"
SUBNET = "10.213.0"  # /24, inside the namespaces only
BRIDGE = "br0"
_counter = itertools.count(1)


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def ip(*args: str, check: bool = True, timeout: float = 30.0) -> str:
    """Run ``ip ARGS``; its stdout. :class:`NetnsError` with stderr if it fails (and ``check``)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``, no netns support), or None if they can."""
    if os.geteuid() != 0:
        return "the chaos tests need root (they create network namespaces)"
    if shutil.which("ip") is None:
        return "the chaos tests need `ip` (iproute2: apt-get install -y iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "probe-br", "type", "bridge")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` does not work here: {exc}"
    finally:
        ip("netns", "delete", probe, check=False)
    return None


def namespaces() -> list[str]:
    """Every named network namespace on the machine."""
    return [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    """The processes inside namespace ``ns`` (none if it does not exist)."""
    return [int(p) for p in ip("netns", "pids", ns, check=False).split()]


def _kill_all_in(ns: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (pids := ns_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but be explicit
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def delete_namespace(ns: str) -> None:
    """Kill what runs inside ``ns``, then delete it (its links go with it)."""
    _kill_all_in(ns)
    ip("netns", "delete", ns, check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(include_own: bool = False, prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>-...`` whose owner process is gone (or is us, if
    ``include_own``). Returns the names deleted."""
    deleted = []
    name = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    for ns in namespaces():
        match = name.match(ns)
        if match is None:
            continue
        owner = int(match.group(1))
        if (owner == os.getpid() and include_own) or (owner != os.getpid() and not pid_alive(owner)):
            delete_namespace(ns)
            deleted.append(ns)
    return deleted


@dataclass
class Host:
    """One host: a namespace with ``eth0`` at ``addr`` on the network's bridge (``port`` on the switch)."""

    name: str
    ns: str
    addr: str
    port: str  # the veth end in the switch namespace


@dataclass
class Proc:
    """A process started in a namespace, in its own process group; its stdout lines are collected."""

    name: str
    popen: subprocess.Popen[str]
    log: Path | None
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    def __post_init__(self) -> None:
        if self.popen.stdout is not None:
            threading.Thread(target=self._read, name=f"stdout {self.name}", daemon=True).start()
        else:
            self._eof = True

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()
        self.popen.stdout.close()

    def wait_line(self, needle: str, timeout: float) -> str:
        """The first stdout line containing ``needle``; AssertionError (with the log tail) if none comes
        within ``timeout`` or the process closes its stdout first."""
        found = self.wait_for(lambda line: needle in line, timeout)
        if found is None:
            raise AssertionError(f"{self.name} printed no line with {needle!r} within {timeout}s "
                                 f"(exit code {self.popen.poll()})\n{self.tail()}")
        return found

    def wait_for(self, match: object, timeout: float) -> str | None:
        """The first stdout line for which ``match(line)`` is true, or None (timeout or end of output)."""
        assert callable(match)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if match(line):
                        return line
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def line_after(self, seen: int, timeout: float) -> str | None:
        """Stdout line number ``seen`` (0-based) once it is there, or None after ``timeout`` or at the end."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.lines) <= seen:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self.lines[seen]

    def tail(self, count: int = 30) -> str:
        text = ""
        if self.log is not None and self.log.exists():
            text = "\n".join(self.log.read_text(errors="replace").splitlines()[-count:])
        return f"--- {self.name} stderr (last {count} lines) ---\n{text}"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the whole process group (the process and its children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the process group and reap the process; idempotent."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()


class Network:
    """A switch namespace with a bridge, and host namespaces plugged into it. A context manager."""

    def __init__(self, subnet: str = SUBNET, prefix: str = PREFIX) -> None:
        self.tag = f"{prefix}{os.getpid()}-{next(_counter)}"
        self.subnet = subnet
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self._created: list[str] = []
        ip("netns", "add", self.switch)
        self._created.append(self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", self.switch, "link", "set", BRIDGE, "up")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def add_host(self, name: str, last_octet: int) -> Host:
        """A new host namespace ``<tag>-<name>`` with ``eth0`` at ``<subnet>.<last_octet>/24``, no default
        route."""
        if name in self.hosts or len(name) > 12:
            raise ValueError(f"bad or duplicate host name {name!r}")
        ns = f"{self.tag}-{name}"
        addr = f"{self.subnet}.{last_octet}"
        port = f"v-{name}"
        ip("netns", "add", ns)
        self._created.append(ns)
        # Both ends are born in the switch namespace; one moves straight into the host: the root namespace
        # never sees either.
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.switch, "link", "set", port, "master", BRIDGE)
        ip("-n", self.switch, "link", "set", port, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name, ns, addr, port)
        self.hosts[name] = host
        return host

    # --- processes ------------------------------------------------------------------------------------

    def exec_in(self, host: Host, argv: Sequence[str], *, name: str | None = None, env: dict[str, str] | None = None,
                log: Path | None = None, stdin: bool = False) -> Proc:
        """Start ``argv`` inside ``host``'s namespace, in a new process group (``ip netns exec`` execs the
        program, so the pid is the program's). Stdout is read line by line; stderr goes to ``log``."""
        stderr = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *argv],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
                start_new_session=True,
            )
        finally:
            if log is not None:
                stderr.close()  # type: ignore[union-attr]
        proc = Proc(name or f"{argv[0]}@{host.name}", popen, log)
        self.procs.append(proc)
        return proc

    def run_in(self, host: Host, argv: Sequence[str], *, env: dict[str, str] | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``'s namespace to completion (killed after ``timeout``)."""
        return subprocess.run(["ip", "netns", "exec", host.ns, *argv], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def pids(self) -> dict[str, list[int]]:
        """The processes inside each namespace of this network that has any."""
        found = {ns: ns_pids(ns) for ns in self._created}
        return {ns: pids for ns, pids in found.items() if pids}

    # --- faults ---------------------------------------------------------------------------------------

    def link_down(self, host: Host) -> None:
        """Unplug ``host`` from the switch: packets both ways are dropped, connections are not told."""
        ip("-n", self.switch, "link", "set", host.port, "down")

    def link_up(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.port, "up")

    def namespaces(self) -> list[str]:
        """This network's namespaces, the switch first."""
        return list(self._created)

    @contextlib.contextmanager
    def partitioned(self, host: Host) -> Iterator[None]:
        self.link_down(host)
        try:
            yield
        finally:
            self.link_up(host)

    # --- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process this network started or that runs in its namespaces; delete the namespaces."""
        for proc in self.procs:
            proc.kill()
        for ns in reversed(self._created):
            delete_namespace(ns)
        self._created.clear()
