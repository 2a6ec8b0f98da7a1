"""Hosts for the SSH tests: Linux network namespaces on a private bridge (:class:`tests.netns.Network`), each
with a real sshd.

    switch namespace:          bridge br0, one veth per machine (v-client, v-node1, ...)
    host namespace client      10.214.0.2    the client (the executor, `remote-executor cluster`)
    host namespace node1       10.214.0.11   sshd on port 22 (node2: .12, node3: .13)

Every address exists only inside these namespaces (no default route, nothing in or attached to the root
namespace); the names start with ``ressh<pid>-``, so a later run can remove what a crashed run left behind
and nothing of anyone else's is touched. The sshd of each host is a real ``/usr/sbin/sshd -D`` with a host
key, an authorized key and its pid file in a temporary directory; the client uses an ssh config file written
here (host aliases node1.., a known_hosts file with the hosts' keys, the test's identity).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..netns import Network, cleanup_stale, ns_pids

PREFIX = "ressh"
SUBNET = "10.214.0"
CLIENT_ADDRESS = f"{SUBNET}.2"
UNREACHABLE_ADDRESS = f"{SUBNET}.99"  # on the bridge's subnet, but no machine answers there
SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition no event announces (processes in another namespace ending), with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def missing_tools() -> list[str]:
    return [tool for tool in ("ip", "ssh", "ssh-keygen", "/usr/sbin/sshd") if shutil.which(tool) is None]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Host:
    name: str  # the ssh alias: node1
    namespace: str
    address: str
    sshd: subprocess.Popen[bytes] | None = None
    sshd_log: list[str] = field(default_factory=list)


class NetLab:
    """The namespaces, the bridge, the hosts' sshd and the client's ssh configuration; :meth:`destroy` it."""

    def __init__(self, tmp: Path, hosts: int = 3) -> None:
        self.tmp = tmp
        self.count = hosts
        self.network: Network | None = None
        self.client = ""
        self.hosts: dict[str, Host] = {}
        self.ssh_config = tmp / "ssh_config"
        self.identity = tmp / "id_ed25519"
        self.known_hosts = tmp / "known_hosts"

    # --- building ------------------------------------------------------------------------------------

    def build(self) -> NetLab:
        cleanup_stale(prefix=PREFIX)
        try:
            self.network = Network(SUBNET, prefix=PREFIX)
            self.client = self.network.add_host("client", 2).ns
            for i in range(1, self.count + 1):
                made = self.network.add_host(f"node{i}", 10 + i)
                self.hosts[made.name] = Host(made.name, made.ns, made.addr)
            self._keys()
            for host in self.hosts.values():
                self._start_sshd(host)
        except BaseException:
            self.destroy()
            raise
        return self

    def _keys(self) -> None:
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ssh-test-client", "-f", str(self.identity))
        (self.tmp / "authorized_keys").write_text(self.identity.with_suffix(".pub").read_text())
        known, config = [], []
        for host in self.hosts.values():
            key = self.tmp / f"host_key_{host.name}"
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key))
            kind, blob = key.with_suffix(".pub").read_text().split()[:2]
            known.append(f"{host.address} {kind} {blob}")
            config.append(f"Host {host.name}\n    HostName {host.address}\n")
        self.known_hosts.write_text("\n".join(known) + "\n")
        config.append(f"Host nodeX\n    HostName {UNREACHABLE_ADDRESS}\n")
        config.append(
            "Host *\n"
            "    User root\n"
            f"    IdentityFile {self.identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"  # known_hosts is complete: a host not in it must fail
            "    ConnectTimeout 3\n"
            "    ServerAliveInterval 1\n"
            "    ServerAliveCountMax 3\n"
            "    LogLevel ERROR\n")
        self.ssh_config.write_text("".join(config))

    def _start_sshd(self, host: Host) -> None:
        config = self.tmp / f"sshd_config_{host.name}"
        config.write_text(
            f"ListenAddress {host.address}:22\n"
            f"HostKey {self.tmp / f'host_key_{host.name}'}\n"
            f"PidFile {self.tmp / f'sshd_{host.name}.pid'}\n"
            f"AuthorizedKeysFile {self.tmp / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"  # the temporary directory is not root-owned 0700 all the way up
            "ClientAliveInterval 1\n"  # a session whose client vanished ends within seconds
            "ClientAliveCountMax 3\n"
            "LogLevel INFO\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        sshd = host.sshd = subprocess.Popen(["ip", "netns", "exec", host.namespace, "/usr/sbin/sshd", "-D", "-e",
                                             "-f", str(config)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listening = threading.Event()
        stderr = sshd.stderr
        assert stderr is not None

        def read_log() -> None:
            # This process's pipe, captured now: host.sshd may be cleared or replaced while the thread runs.
            try:
                for raw in stderr:
                    host.sshd_log.append(raw.decode(errors="replace").rstrip())
                    if "Server listening on" in host.sshd_log[-1]:
                        listening.set()
            except ValueError:  # the pipe was closed under us at teardown: nothing more to read
                pass
            finally:
                stderr.close()
                listening.set()

        threading.Thread(target=read_log, name=f"sshd {host.name}", daemon=True).start()
        if not listening.wait(30) or host.sshd.poll() is not None:
            raise RuntimeError(f"sshd on {host.name} did not start: {host.sshd_log}")

    # --- using ---------------------------------------------------------------------------------------

    @property
    def ssh_options(self) -> list[str]:
        return ["-F", str(self.ssh_config)]

    def client_command(self, *argv: str) -> list[str]:
        """``argv`` run in the client's namespace, with this checkout's sources first on the import path."""
        return ["ip", "netns", "exec", self.client, "env", f"PYTHONPATH={SRC}", *argv]

    def python(self, *argv: str) -> list[str]:
        return self.client_command(sys.executable, *argv)

    def remote_command(self) -> str:
        """How the hosts run ``remote-executor``: this interpreter, this checkout (they share our disk)."""
        return f"{sys.executable} -m remote_executor.cli"

    def leftovers(self, namespace: str) -> dict[int, str]:
        """Processes in a namespace other than the host's listening sshd (pid -> command line)."""
        keep = {h.sshd.pid for h in self.hosts.values() if h.namespace == namespace and h.sshd is not None}
        return {pid: command_line(pid) for pid in ns_pids(namespace) if pid not in keep}

    def wait_empty(self, namespaces: list[str], timeout: float = 30.0) -> None:
        """Wait until nothing but the listening sshd runs in each of ``namespaces``."""
        try:
            wait_until(lambda: not any(self.leftovers(ns) for ns in namespaces), timeout,
                       "the namespaces to empty")
        except AssertionError:
            raise AssertionError(f"left running: { {ns: self.leftovers(ns) for ns in namespaces} }") from None

    def workers_in(self, namespace: str) -> list[int]:
        return [pid for pid, command in self.leftovers(namespace).items() if "remote_executor" in command]

    def set_link(self, host: str, up: bool) -> None:
        assert self.network is not None
        cable = self.network.hosts[host]
        if up:
            self.network.link_up(cable)
        else:
            self.network.link_down(cable)

    def stop_sshd(self, host: str) -> None:
        """sshd goes down on ``host``: the listener this lab started and every session it forked."""
        namespace = self.hosts[host].namespace
        for pid in ns_pids(namespace):
            if _comm(pid) == "sshd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        sshd = self.hosts[host].sshd
        if sshd is not None:
            sshd.wait()

    def start_sshd(self, host: str) -> None:
        self._start_sshd(self.hosts[host])

    # --- tearing down ----------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop every sshd, kill whatever still runs in the namespaces, delete them (and their links)."""
        for host in self.hosts.values():
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
                try:
                    host.sshd.wait(10)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait()
        if self.network is not None:
            self.network.close()  # kills what still runs inside, deletes the namespaces and their links
            self.network = None


@contextlib.contextmanager
def netlab(tmp: Path) -> Iterator[NetLab]:
    lab = NetLab(tmp).build()
    try:
        yield lab
    finally:
        lab.destroy()
