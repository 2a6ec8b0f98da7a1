"""CURVE on zmq:// with a client allow-list: real sockets, a real job server and real worker processes.

The server runs pyzmq's ZAP authenticator beside its socket; a client or worker whose public key is not in
the allow-list directory never gets a session, fails (clients at construction) with an error naming the URL,
and leaves everyone else served. The wire is read through a TCP relay to show that CURVE encrypts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cloudpickle
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import AuthenticationThread

from remote_executor import RemoteExecutor
from remote_executor.errors import ConnectionFailedError, HandshakeClosedError, TransportError
from remote_executor.jobserver.client import handshake
from remote_executor.supervisor import Supervisor
from remote_executor.transports.zmq.allowlist import RefusalLog
from remote_executor.transports.zmq.server import ZmqServer
from remote_executor.transports.zmq.sockets import CURVE_SERVER_KEY_ENV, Curve, ZmqChannel
from remote_executor.wire.frames import Limits
from remote_executor.wire.messages import hello

pytestmark = pytest.mark.zmq

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

CLI = (sys.executable, "-m", "remote_executor.cli")
HEARTBEATS = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "2")
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0}
TAG_ENV = "CURVE_TEST_WORKER_TAG"
REFUSED = "refused this side's CURVE key"  # what a refused client or worker says


def worker_tag(_: object = None) -> str:
    """Which worker ran the call (runs in a worker process)."""
    return os.environ.get(TAG_ENV, "?")


# --- certificates ----------------------------------------------------------------------------------------


@dataclass
class Certs:
    """The server's pair, an allow-list directory, and secret certificates of listed and unlisted peers."""

    dir: Path
    server_public: Path
    server_secret: Path
    allow: Path

    def make(self, name: str, listed: bool) -> Path:
        """A new key pair; its public half goes on the allow-list if ``listed``. Returns the secret file."""
        public, secret = zmq.auth.create_certificates(self.dir, name)
        if listed:
            shutil.copy(public, self.allow)
        return Path(secret)

    @staticmethod
    def public(secret: Path) -> str:
        return zmq.auth.load_certificate(secret)[0].decode()


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    public, secret = zmq.auth.create_certificates(keys, "server")
    return Certs(keys, Path(public), Path(secret), allow)


# --- processes and their logs -------------------------------------------------------------------------------


class LogTail:
    """Reads a process's stderr on a thread, so a test can wait for a line (an event) rather than sleep."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        except ValueError:  # closed by ``close`` after its grace period: the test is over
            pass
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first line containing ``text``, once it has been written."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    raise AssertionError(f"no line with {text!r} in:\n{''.join(self.lines)}")
                self._changed.wait(remaining)

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def close(self, stream: IO[str]) -> None:
        """Lets the reader see the end of the stream (the process is dead) before the stream is closed.

        Closing it first made the reader thread fail mid-iteration, an unhandled thread exception that
        pytest then pinned on whichever test ran next."""
        self._thread.join(timeout=10)  # bounded: a surviving grandchild may still hold the pipe open
        stream.close()
        self._thread.join(timeout=10)


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    log: LogTail


class Processes:
    """Starts ``remote-executor`` commands and stops every one of them at the end of the test."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        popen = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})})
        assert popen.stderr is not None
        proc = Proc(popen, LogTail(popen.stderr))
        self.started.append(proc)
        return proc

    def server(self, certs: Certs, *extra: str) -> tuple[Proc, str]:
        """``remote-executor server`` with CURVE and the allow-list on a free port, and its URL."""
        with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port, released for the server
            url = f"zmq://127.0.0.1:{probe.getsockname()[1]}"
        proc = self.start("server", url, "--curve-secret-key", str(certs.server_secret),
                          "--curve-allow", str(certs.allow), *HEARTBEATS, *extra)
        assert proc.popen.stdout is not None
        line = proc.popen.stdout.readline()  # "serving URL" once it listens, or EOF if it could not start
        assert line == f"serving {url}\n", proc.log.lines
        return proc, url

    def worker(self, url: str, certs: Certs, own_key: Path | None, tag: str, processes: int = 1) -> Proc:
        """``remote-executor worker`` with the CURVE flags (no client key: an ephemeral one)."""
        own = ("--curve-client-key", str(own_key)) if own_key is not None else ()
        return self.start("worker", url, "--processes", str(processes), "--curve-server-key",
                          str(certs.server_public), *own, *HEARTBEATS, env={TAG_ENV: tag})

    def stop(self) -> None:
        for proc in self.started:
            proc.popen.kill()
            proc.popen.wait()
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
            if proc.popen.stderr is not None:
                proc.log.close(proc.popen.stderr)


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    yield started
    started.stop()


def terminate(proc: Proc) -> int:
    """SIGTERM (drain a worker, stop a server) and its exit code."""
    proc.popen.send_signal(signal.SIGTERM)
    return proc.popen.wait(timeout=60)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def listed_client(url: str, certs: Certs, key: Path, **options: Any) -> RemoteExecutor:
    return RemoteExecutor(transport=url, curve_server_key=str(certs.server_public), curve_client_key=str(key),
                          **FAST, **options)


# --- a cluster with an allow-list ----------------------------------------------------------------------------


def test_cluster_with_an_allow_list_runs_listed_clients_and_cli_workers(certs: Certs, procs: Processes) -> None:
    client_key, worker_key = certs.make("client", listed=True), certs.make("worker", listed=True)
    server, url = procs.server(certs)
    worker = procs.worker(url, certs, worker_key, "listed", processes=2)
    with listed_client(url, certs, client_key) as ex:
        assert list(ex.map(pow, [3] * 20, range(20), timeout=60)) == [3**i for i in range(20)]
        assert set(ex.map(worker_tag, range(10), timeout=60)) == {"listed"}
    server.log.wait_for("allow-list")  # it says it runs with one (and how many keys)
    assert server.log.count("refused a CURVE handshake") == 0
    assert terminate(worker) == 0
    assert terminate(server) == 0


def test_unlisted_client_fails_at_construction_while_a_listed_client_runs_on(certs: Certs,
                                                                             procs: Processes) -> None:
    client_key, worker_key = certs.make("client", listed=True), certs.make("worker", listed=True)
    stranger = certs.make("stranger", listed=False)
    server, url = procs.server(certs)
    procs.worker(url, certs, worker_key, "listed", processes=2)
    failures: list[BaseException] = []
    wrong: list[int] = []
    calls = 0
    running, refusals_done = threading.Event(), threading.Event()

    def legitimate() -> None:
        nonlocal calls
        try:
            with listed_client(url, certs, client_key) as ex:
                after = 0
                while after < 20:  # keeps calling until well after the refusals
                    if ex.submit(pow, 2, calls % 30).result(timeout=60) != 2 ** (calls % 30):
                        wrong.append(calls)
                    calls += 1
                    running.set()
                    after += refusals_done.is_set()
        except BaseException as exc:
            failures.append(exc)
            running.set()

    thread = threading.Thread(target=legitimate)
    thread.start()
    try:
        assert running.wait(60)
        for options in ({"curve_client_key": str(stranger)}, {}):  # a certificate not listed; an ephemeral key
            with pytest.raises(HandshakeClosedError) as refused:  # the documented type: a refusal, not a stranger
                RemoteExecutor(transport=url, curve_server_key=str(certs.server_public), connect_timeout=20,
                               **options)
            assert url in str(refused.value) and REFUSED in str(refused.value)
            assert "allow-list" in str(refused.value)
            assert "without saying why" not in str(refused.value)  # (it was wrapped in a message that said so)
            assert "no job server of ours" not in str(refused.value)  # (and in one that blamed another service)
        assert "from " + str(stranger) not in str(refused.value) and "ephemeral" in str(refused.value)
    finally:
        refusals_done.set()
        thread.join(120)
    assert not thread.is_alive()
    assert failures == [] and wrong == [] and calls >= 21
    line = server.log.wait_for(Certs.public(stranger))  # the server logs the refused key
    assert "refused a CURVE handshake" in line


def test_unlisted_worker_never_gets_a_call_and_status_shows_only_listed_ones(certs: Certs,
                                                                             procs: Processes) -> None:
    client_key, worker_key = certs.make("client", listed=True), certs.make("worker", listed=True)
    rogue_key = certs.make("rogue", listed=False)
    server, url = procs.server(certs)
    listed = procs.worker(url, certs, worker_key, "listed")
    rogue = procs.worker(url, certs, rogue_key, "rogue")
    ephemeral = procs.worker(url, certs, None, "ephemeral")
    server.log.wait_for(Certs.public(rogue_key))  # it tried, and was refused
    for refused in (rogue, ephemeral):
        assert url in refused.log.wait_for(REFUSED)  # and each unlisted worker says why, in its own log
    assert server.log.count("refused a CURVE handshake") >= 2
    with listed_client(url, certs, client_key) as ex:
        assert list(ex.map(worker_tag, range(60), timeout=60)) == ["listed"] * 60
        status = cli("status", url, "--curve-server-key", str(certs.server_public),
                     "--curve-client-key", str(client_key))
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["workers"]
    assert [w["name"].split("#")[0] for w in workers] == [f"{os.uname().nodename}-{listed.popen.pid}-0"]
    for proc in (rogue, ephemeral, listed):  # draining works connected or not
        assert terminate(proc) == 0
    assert terminate(server) == 0


def test_status_and_ping_take_the_curve_flags(certs: Certs, procs: Processes) -> None:
    client_key, worker_key = certs.make("client", listed=True), certs.make("worker", listed=True)
    _, url = procs.server(certs)
    procs.worker(url, certs, worker_key, "listed")
    with listed_client(url, certs, client_key) as ex:
        assert ex.submit(worker_tag).result(timeout=60) == "listed"  # the worker is attached
    flags = ("--curve-server-key", str(certs.server_public), "--curve-client-key", str(client_key))
    status = cli("status", url, *flags)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["capacity"] == 1
    ping = cli("ping", url, *flags)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith(f"{url} answered in")
    # the server key from the environment (the fallback), the client key from its flag
    from_env = cli("ping", url, "--curve-client-key", str(client_key),
                   env={CURVE_SERVER_KEY_ENV: str(certs.server_public)})
    assert from_env.returncode == 0, from_env.stderr
    # no client key of its own: an ephemeral one, which the allow-list refuses
    for command in ("status", "ping"):
        refused = cli(command, url, "--curve-server-key", str(certs.server_public), "--timeout", "20")
        assert refused.returncode == 1
        assert url in refused.stderr and REFUSED in refused.stderr and "ephemeral" in refused.stderr
        assert "no job server of ours" not in refused.stderr


def test_each_refused_key_is_logged_once_not_per_attempt(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    stranger, other = certs.make("stranger", listed=False), certs.make("other", listed=False)
    certs.make("client", listed=True)
    srv = ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=certs.allow, **FAST)
    srv.start()
    try:
        for key in (stranger, stranger, stranger, stranger, other):
            # The server logs before it answers the handshake, so each line is in once the client fails.
            with pytest.raises(ConnectionFailedError, match="allow-list"):
                RemoteExecutor(transport=srv.url, curve_server_key=str(certs.server_public),
                               curve_client_key=str(key), connect_timeout=20)
    finally:
        srv.stop()
    assert caplog.text.count(Certs.public(stranger)) == 1
    assert caplog.text.count(Certs.public(other)) == 1
    assert "3 more refused CURVE handshake(s) were not logged" in caplog.text  # said when the server stops


def test_refusal_log_limits_per_key_and_in_all(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(interval=60.0, burst=3, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "remote_executor.jobserver.server")
    for key in (b"A", b"A", b"B", b"C", b"D", b"E"):  # A once; A, B, C fill the burst of 3; D, E not logged
        refusals.refused(key, "10.0.0.1", "allow")
    logged = [record.getMessage() for record in caplog.records]
    assert [message.split("public key ")[1][0] for message in logged] == ["A", "B", "C"]
    now[0] = 61.0  # a new interval: first how many were left out, then A is logged again
    refusals.refused(b"A", "10.0.0.1", "allow")
    logged = [record.getMessage() for record in caplog.records]
    assert "3 more refused" in logged[3] and "public key A" in logged[4]
    refusals.refused(b"A", "10.0.0.1", "allow")
    refusals.flush()
    assert "1 more refused" in caplog.records[-1].getMessage()
    refusals.flush()  # nothing left out since: nothing to say
    assert len(caplog.records) == 6


# --- the wire ------------------------------------------------------------------------------------------------


class Relay:
    """A TCP relay in front of the job server that keeps a copy of every byte passing either way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._captured = bytearray()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [conn, upstream]
                for source, sink in ((conn, upstream), (upstream, conn)):
                    pump = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                    self._threads.append(pump)
                    pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self._captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(30)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_curve_hides_the_calls_arguments_on_the_wire(certs: Certs, curve: bool) -> None:
    """Through a relay: without CURVE the marker is on the wire (so the check can fail), with CURVE not."""
    client_key, worker_key = certs.make("client", listed=True), certs.make("worker", listed=True)
    server_options: dict[str, Any] = {"curve_secret_key": certs.server_secret, "curve_allow": certs.allow}
    client_options = {"curve_server_key": str(certs.server_public), "curve_client_key": str(client_key)}
    worker_args = ("--curve-server-key", str(certs.server_public), "--curve-client-key", str(worker_key))
    srv = ZmqServer("127.0.0.1", 0, **(server_options if curve else {}), **FAST)
    srv.start()
    relay = Relay(("127.0.0.1", srv.port))
    workers = Supervisor(srv.url, 1, worker_args=(*HEARTBEATS, *(worker_args if curve else ())), name="relayed")
    workers.start()
    marker = b"MARKER-" + os.urandom(8).hex().encode()
    try:
        with RemoteExecutor(transport=f"zmq://127.0.0.1:{relay.port}", **(client_options if curve else {}),
                            **FAST) as ex:
            assert ex.submit(bytes, marker).result(timeout=60) == marker  # there (the call) and back (the result)
        wire = relay.captured()
    finally:
        workers.stop()
        relay.close()
        srv.stop()
    assert len(wire) > 2 * len(marker)
    assert (marker in wire) is not curve


# --- bad settings --------------------------------------------------------------------------------------------


def auth_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, AuthenticationThread)]


def test_the_authenticator_runs_with_the_server_and_stops_with_it(certs: Certs) -> None:
    certs.make("client", listed=True)
    before = auth_threads()
    srv = ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=certs.allow)
    assert len(auth_threads()) == len(before) + 1
    srv.start()
    srv.stop()
    assert auth_threads() == before
    # the bind fails after the authenticator started
    with socket.create_server(("127.0.0.1", 0)) as busy, pytest.raises(OSError, match="cannot listen"):
        ZmqServer("127.0.0.1", busy.getsockname()[1], curve_secret_key=certs.server_secret, curve_allow=certs.allow)
    assert auth_threads() == before


def test_bad_allow_lists_are_refused_clearly(certs: Certs, tmp_path: Path) -> None:
    certs.make("client", listed=True)
    with pytest.raises(TransportError, match="needs the server's CURVE secret key"):
        ZmqServer("127.0.0.1", 0, curve_allow=certs.allow)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TransportError, match="holds no public certificate"):
        ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=empty)
    with pytest.raises(TransportError, match="cannot read the CURVE allow-list"):
        ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.key").write_text("no key in here\n")
    with pytest.raises(TransportError, match="cannot read the CURVE allow-list"):
        ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=broken)
    assert auth_threads() == []


def test_cli_refuses_bad_curve_flags(certs: Certs, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key_secret")
    cases: list[tuple[tuple[str, ...], str]] = [
        (("server", "zmq://127.0.0.1:1", "--curve-allow", str(certs.allow)), "--curve-allow needs --curve-secret-key"),
        (("server", "tcp://127.0.0.1:1", "--curve-secret-key", str(certs.server_secret)), "zmq:// servers only"),
        (("worker", "tcp://127.0.0.1:1", "--curve-server-key", str(certs.server_public)), "zmq:// only"),
        (("worker", "zmq://127.0.0.1:1", "--curve-server-key", str(certs.server_public),
          "--curve-client-key", missing), f"cannot read the CURVE client key {missing}"),
        (("worker", "zmq://127.0.0.1:1", "--curve-server-key", str(certs.server_public),
          "--curve-client-key", str(certs.server_public)), "holds no secret key"),
        (("worker", "zmq://127.0.0.1:1", "--curve-client-key", str(certs.server_secret)),
         "needs the server's public key"),
        (("status", "zmq://127.0.0.1:1", "--curve-server-key", missing), "cannot read the CURVE server key"),
    ]
    for args, message in cases:
        run = cli(*args)
        assert message in run.stderr, (args, run.stderr)
        # Flags the command line itself rules out are a usage error (2); what the transport finds wrong with
        # the files (unreadable, the wrong half, a pair incomplete), a failure (1).
        expected = 2 if args[0] == "server" or "zmq:// only" in message else 1
        assert run.returncode == expected, (args, run.returncode, run.stderr)


def test_client_key_without_a_server_key_is_an_error(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CURVE_SERVER_KEY_ENV, raising=False)
    client_key = certs.make("client", listed=True)
    with pytest.raises(TransportError, match="needs the server's public key"):
        RemoteExecutor(transport="zmq://127.0.0.1:1", curve_client_key=str(client_key))



def test_a_refusal_before_the_first_send_is_reported_too(certs: Certs) -> None:
    """libzmq may refuse the handshake before this side sends anything: the DEALER then takes no frame at
    all, and the error must still say why (not "took no data")."""
    certs.make("client", listed=True)
    srv = ZmqServer("127.0.0.1", 0, curve_secret_key=certs.server_secret, curve_allow=certs.allow, **FAST)
    srv.start()
    try:
        curve = Curve.from_files(certs.server_public)  # an ephemeral key
        channel = ZmqChannel.connect(("127.0.0.1", srv.port), None, Limits(), curve, srv.url)
        try:
            channel.wait(20)  # returns once the refusal is reported (nothing else can wake it)
            with pytest.raises(ConnectionFailedError, match="not on the server's allow-list"):
                handshake(channel, None, hello("client", {"name": "refused"}), 20)
        finally:
            channel.close()
    finally:
        srv.stop()
