"""The zmq transport on real sockets (127.0.0.1) and real worker processes: the ZeroMQ-specific parts.

A long call kept alive by heartbeats, malformed multipart messages, HMAC and CURVE, and the bound on what
waits in the server. The fault scenarios every remote transport shares (SIGKILL and SIGSTOP mid-call, poison
call, server restart, giving up on reconnection, drain on SIGTERM) run from ``conformance/test_faults_zmq.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
import zmq
import zmq.auth

from remote_executor import RemoteExecutor
from remote_executor.conformance.gate import Gate, wait_at_gate
from remote_executor.errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    ConnectionFailedError,
    TransportError,
)
from remote_executor.security import normalize_key, resolve_key
from remote_executor.supervisor import Supervisor
from remote_executor.transports import get_backend
from remote_executor.transports.base import Call, Options, Session, Status, decode_result
from remote_executor.transports.zmq.server import ZmqServer
from remote_executor.transports.zmq.sockets import CURVE_SERVER_KEY_ENV
from remote_executor.wire.frames import HEADER, MAGIC, VERSION, Frame, Kind, Limits, decode_parts, encode
from remote_executor.wire.messages import hello
from remote_executor.wire.serialization import Parts, encode_call
from remote_executor.wire.session import Mac, new_nonce, session_macs

from .conftest import random_key

pytestmark = pytest.mark.zmq

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

# Ten missed beats before a peer is declared dead: a worker or client starved for a second on a loaded CI
# machine is not what these tests are about (the liveness test still waits three of these timeouts).
HEARTBEAT_TIMEOUT = 2.0
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": HEARTBEAT_TIMEOUT}
WORKER_ARGS = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT))


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a condition that no event announces (a server's view), with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Recorder:
    """A Listener that queues what the transport reports."""

    def __init__(self) -> None:
        self.results: queue.Queue[tuple[int, Status, Parts]] = queue.Queue()
        self.capacity: list[int] = []
        self.broken: queue.Queue[BrokenRemoteExecutor] = queue.Queue()

    def on_result(self, task_id: int, status: Status, parts: Parts) -> None:
        self.results.put((task_id, status, parts))

    def on_capacity(self, slots: int) -> None:
        self.capacity.append(slots)

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        self.broken.put(error)


class ProbedServer(ZmqServer):
    """Records, on the loop thread, the most calls the server ever held (queued or running)."""

    most_held = 0

    def pump(self, on_loop: bool = True) -> None:
        super().pump(on_loop)
        held = sum(c["queued"] + c["running"] for c in self.scheduler.status()["clients"])
        self.most_held = max(self.most_held, held)


@pytest.fixture
def server() -> Iterator[ZmqServer]:
    srv = ZmqServer("127.0.0.1", 0, **FAST)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def start_workers() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(url: str, count: int = 2, env: dict[str, str] | None = None) -> Supervisor:
        supervisor = Supervisor(url, count, env=env, worker_args=WORKER_ARGS, name="zmq-worker")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        for pid in supervisor.pids():  # a test may have left one stopped
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        supervisor.stop()


# --- round trips -----------------------------------------------------------------------------------------


def test_transport_round_trip_through_the_client_interface(
    server: ZmqServer, start_workers: Callable[..., Supervisor]
) -> None:
    start_workers(server.url, 1)
    options = Options(key=resolve_key(), heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT)  # this user's
    transport = get_backend("zmq").client(server.url, options)
    listener = Recorder()
    transport.start(Session(executor_id=7, initializer=None, max_retries=1), listener)
    try:
        big = os.urandom(3 << 20)  # crosses as an out-of-band buffer, sent and received uncopied
        transport.submit([Call(1, encode_call(pow, (2, 10), {})), Call(2, encode_call(bytes, (big,), {}))])
        results = {}
        for _ in range(2):
            task_id, status, parts = listener.results.get(timeout=30)
            results[task_id] = decode_result(status, parts)
        assert results[1] == (True, 1024)
        assert results[2] == (True, big)
        assert listener.capacity[-1] == 1
    finally:
        transport.close()
    assert listener.broken.empty()


def test_embedded_cluster() -> None:
    with RemoteExecutor(max_workers=2, transport="zmq") as ex:
        assert list(ex.map(pow, range(30), [2] * 30, chunksize=4)) == [i * i for i in range(30)]
        pids = {f.result() for f in [ex.submit(os.getpid) for _ in range(20)]}
        assert os.getpid() not in pids
        payload = bytearray(os.urandom(8 << 20))
        assert ex.submit(len, payload).result() == len(payload)
        assert ex.submit(lambda b: b[::-1], bytes(payload)).result() == bytes(payload)[::-1]


def test_remote_server_and_standalone_workers(server: ZmqServer, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(server.url, 2)
    with RemoteExecutor(transport=server.url, **FAST) as ex:
        assert sum(ex.map(abs, range(-500, 500), chunksize=10)) == 250000
        with pytest.raises(ZeroDivisionError):
            ex.submit(divmod, 1, 0).result(timeout=30)
    wait_for(lambda: server.scheduler.capacity == 2, what="both workers attached")


# --- liveness: heartbeats decide ---------------------------------------------------------------------------


def test_long_call_is_kept_alive_by_worker_heartbeats(
    server: ZmqServer, start_workers: Callable[..., Supervisor]
) -> None:
    start_workers(server.url, 1)
    with Gate() as gate, RemoteExecutor(transport=server.url, max_retries=0, **FAST) as ex:
        held = ex.submit(wait_at_gate, gate.address, "long", "survived")
        gate.wait_started(1)
        deadline = time.monotonic() + 3 * HEARTBEAT_TIMEOUT
        wait_for(lambda: time.monotonic() > deadline, what="three heartbeat timeouts")  # nothing to wait on
        gate.release()
        assert held.result(timeout=30) == "survived"


def test_no_server_is_a_clear_error_at_start() -> None:
    with pytest.raises(ConnectionFailedError, match="no answer from the job server"):
        RemoteExecutor(transport="zmq://127.0.0.1:9", connect_timeout=0.3)


# --- bounded memory ------------------------------------------------------------------------------------


@pytest.mark.slow  # a minute or more: on the main Python only
def test_window_bounds_what_the_server_holds(start_workers: Callable[..., Supervisor]) -> None:
    """100,000 calls through the transport with a window of 64: the server never holds more than 64."""
    total, window = 100_000, 64
    srv = ProbedServer("127.0.0.1", 0, **FAST)
    srv.start()
    start_workers(srv.url, 2)
    options = Options(key=resolve_key(), heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT)  # this user's
    transport = get_backend("zmq").client(srv.url, options)
    listener = Recorder()
    # Retries on: a worker starved past its heartbeat on a loaded machine is not what this test is about.
    transport.start(Session(executor_id=3, initializer=None, max_retries=2), listener)
    try:
        parts = encode_call(abs, (-1,), {})
        submitted = done = 0
        while done < total:
            batch = [Call(submitted + i, parts) for i in range(min(window - (submitted - done), total - submitted))]
            if batch:
                transport.submit(batch)
                submitted += len(batch)
            _, status, result = listener.results.get(timeout=30)
            assert decode_result(status, result) == (True, 1)
            done += 1
        assert 0 < srv.most_held <= window
    finally:
        transport.close()
        srv.stop()


def test_executor_window_keeps_pending_calls_in_the_client(start_workers: Callable[..., Supervisor]) -> None:
    probe = ProbedServer("127.0.0.1", 0, **FAST)
    probe.start()
    start_workers(probe.url, 2)
    try:
        with RemoteExecutor(max_workers=8, transport=probe.url, **FAST) as ex:
            futures = [ex.submit(abs, -i) for i in range(5_000)]
            assert sum(f.result(timeout=60) for f in futures) == sum(range(5_000))
        assert 0 < probe.most_held <= 8
    finally:
        probe.stop()


# --- malformed input and security ------------------------------------------------------------------------


def _rogue_messages(key: bytes | None) -> dict[str, list[bytes]]:
    good = [bytes(b) for b in encode(hello("client", {"executor_id": 9}), key)]
    prefix = good[0]
    return {
        "bad magic": [b"XX" + prefix[2:], *good[1:]],
        "missing part": good[:-1],
        "extra part": [*good, b"surplus"],
        "truncated prefix": [prefix[:10]],
        "wrong part length": [prefix, good[1] + b"x"],
        "unknown type": [HEADER.pack(MAGIC, VERSION, 200, 0, 0, 0, 0)],
    }


_EXPECTED_LOG = {
    "bad magic": "bad frame magic",
    "missing part": "parts but",
    "extra part": "parts but",
    "truncated prefix": "truncated frame header",
    "wrong part length": "differ from the announced",
    "unknown type": "unknown frame type",
}


@pytest.mark.parametrize("case", sorted(_EXPECTED_LOG))
def test_malformed_multipart_message_drops_the_peer_and_others_are_served(
    case: str, server: ZmqServer, start_workers: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    start_workers(server.url, 1)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    try:
        with RemoteExecutor(transport=server.url, **FAST) as ex, caplog.at_level(logging.INFO):
            assert ex.submit(pow, 2, 5).result(timeout=30) == 32
            rogue.connect(server.url.replace("zmq://", "tcp://"))
            rogue.send_multipart(_rogue_messages(resolve_key())[case])  # signed with the server's key
            wait_for(lambda: _EXPECTED_LOG[case] in caplog.text, what=f"the log line for {case}")
            assert "dropping zmq peer" in caplog.text
            assert rogue.poll(200) == 0  # no WELCOME for the rogue
            assert ex.submit(pow, 2, 6).result(timeout=30) == 64
    finally:
        rogue.close(linger=0)
        ctx.term()


def test_malformed_message_mid_session_drops_that_session(caplog: pytest.LogCaptureFixture) -> None:
    # This hand-built session sends no heartbeats: a server with a long heartbeat timeout, so that only the
    # garbage can be what drops it, however long the machine stalls between the steps.
    server = ZmqServer("127.0.0.1", 0, heartbeat_interval=0.2, heartbeat_timeout=60.0)
    server.start()
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    try:
        peer.connect(server.url.replace("zmq://", "tcp://"))
        key = resolve_key()  # the server's: this user's key file
        nonce = os.urandom(32)
        peer.send_multipart([bytes(b) for b in encode(Frame(Kind.OPEN, parts=[nonce]), key)])
        assert peer.poll(10_000)
        prefix, *parts = peer.recv_multipart()
        challenge = decode_parts(prefix, parts, Mac(key, bind=nonce))
        send, _ = session_macs(key, nonce, bytes(challenge.parts[0]), server=False)
        peer.send_multipart([bytes(b) for b in encode(hello("client", {"executor_id": 5}), send)])
        assert peer.poll(10_000)
        wait_for(lambda: len(server.scheduler.status()["clients"]) == 1, what="the client to register")
        with caplog.at_level(logging.INFO):
            peer.send_multipart([b"garbage"])
            wait_for(lambda: not server.scheduler.status()["clients"], what="the session to be dropped")
        assert "dropping zmq peer #" in caplog.text
    finally:
        peer.close(linger=0)
        ctx.term()
        server.stop()


def test_oversized_message_is_refused() -> None:
    srv = ZmqServer("127.0.0.1", 0, limits=Limits(max_frame=1 << 16), **FAST)
    srv.start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    try:
        rogue.connect(srv.url.replace("zmq://", "tcp://"))
        rogue.send_multipart([bytes(b) for b in encode(hello("client", {"executor_id": 1}, [bytes(1 << 17)]))])
        # libzmq cuts the connection at MAXMSGSIZE: the server never sees the message, nor answers
        assert rogue.poll(500) == 0
        assert not srv.scheduler.status()["clients"]
    finally:
        rogue.close(linger=0)
        ctx.term()
        srv.stop()


def test_bad_hmac_drops_the_peer_and_others_are_served(
    start_workers: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    key = random_key()
    srv = ZmqServer("127.0.0.1", 0, key=key, **FAST)
    srv.start()
    start_workers(srv.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": key.hex()})
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    try:
        with RemoteExecutor(transport=srv.url, key=key, **FAST) as ex, caplog.at_level(logging.INFO):
            rogue.connect(srv.url.replace("zmq://", "tcp://"))
            rogue.send_multipart([bytes(b) for b in encode(hello("client", {"executor_id": 9}), os.urandom(32))])
            wait_for(lambda: "HMAC does not verify" in caplog.text, what="the HMAC rejection")
            assert ex.submit(pow, 2, 7).result(timeout=30) == 128
        with pytest.raises(AuthenticationError, match="the job server rejected our key"):
            RemoteExecutor(transport=srv.url, key=os.urandom(32), connect_timeout=10)
    finally:
        rogue.close(linger=0)
        ctx.term()
        srv.stop()


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    public, secret = zmq.auth.create_certificates(tmp_path, "server")
    other, _ = zmq.auth.create_certificates(tmp_path, "impostor")
    return {"public": Path(public), "secret": Path(secret), "wrong": Path(other)}


def test_curve_round_trip(curve_keys: dict[str, Path], start_workers: Callable[..., Supervisor]) -> None:
    srv = ZmqServer("127.0.0.1", 0, curve_secret_key=curve_keys["secret"], **FAST)
    srv.start()
    start_workers(srv.url, 1, env={CURVE_SERVER_KEY_ENV: str(curve_keys["public"])})
    try:
        with RemoteExecutor(transport=srv.url, curve_server_key=str(curve_keys["public"]), **FAST) as ex:
            assert ex.submit(pow, 2, 8).result(timeout=30) == 256
            blob = os.urandom(1 << 20)
            assert ex.submit(bytes, blob).result(timeout=30) == blob
    finally:
        srv.stop()


def test_curve_client_with_the_wrong_server_key_fails_clearly(curve_keys: dict[str, Path]) -> None:
    srv = ZmqServer("127.0.0.1", 0, curve_secret_key=curve_keys["secret"], **FAST)
    srv.start()
    try:
        with pytest.raises(ConnectionFailedError, match="CURVE server key"):
            RemoteExecutor(transport=srv.url, curve_server_key=str(curve_keys["wrong"]), connect_timeout=0.5)
        with pytest.raises(ConnectionFailedError, match="CURVE server key"):  # and without CURVE at all
            RemoteExecutor(transport=srv.url, connect_timeout=0.5)
    finally:
        srv.stop()


def test_curve_key_file_without_a_secret_is_refused(curve_keys: dict[str, Path]) -> None:
    with pytest.raises(TransportError, match="no secret key"):
        ZmqServer("127.0.0.1", 0, curve_secret_key=curve_keys["public"])



def test_cli_status_and_ping(server: ZmqServer, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(server.url, 2)
    wait_for(lambda: server.scheduler.capacity == 2, what="workers to attach")
    run = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
    status = subprocess.run([*run, "status", server.url], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"capacity": 2' in status.stdout
    ping = subprocess.run([*run, "ping", server.url], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "answered in" in ping.stdout


@pytest.mark.parametrize("curve", [False, True], ids=["hmac", "hmac+curve"])
def test_cli_server_and_worker_commands(tmp_path: Path, curve: bool) -> None:
    """``remote-executor server zmq://...`` and ``remote-executor worker zmq://...`` end to end."""
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(16).hex())
    key_file.chmod(0o600)
    public, secret = zmq.auth.create_certificates(tmp_path, "server")
    server_args = ["--curve-secret-key", str(secret)] if curve else []
    worker_env = {**os.environ, CURVE_SERVER_KEY_ENV: str(public)} if curve else None
    client_options = {"curve_server_key": str(public)} if curve else {}
    with socket_port() as port:
        url = f"zmq://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
    server = subprocess.Popen([*cli, "server", url, "--key-file", str(key_file), *server_args, *WORKER_ARGS],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker = subprocess.Popen([*cli, "worker", url, "--key-file", str(key_file), "--processes", "2", *WORKER_ARGS],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=worker_env)
    try:
        assert server.stdout is not None and "serving" in server.stdout.readline()
        with RemoteExecutor(transport=url, key=key_file.read_text().strip(), **FAST, **client_options) as ex:
            assert list(ex.map(pow, [2] * 10, range(10))) == [2**i for i in range(10)]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        for proc in (worker, server):
            proc.kill()
            proc.wait()
        assert server.stdout is not None
        server.stdout.close()


def test_cli_curve_flag_is_for_zmq_only(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "remote_executor.cli", "server", "tcp://127.0.0.1:5555",
                          "--curve-secret-key", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "zmq:// servers only" in run.stderr


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A free loopback port (released on exit, for a server that must be given a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


def test_a_session_the_server_dropped_gets_no_wrong_key_answer() -> None:
    """A peer whose session the server dropped (it was silent too long before its HELLO, as on a loaded
    machine) is not told "wrong key": only an OPEN signed with another key is. It reconnects instead."""
    # Frames built by hand sign with the key as every entry point keeps it (surrounding whitespace, which a
    # random key has about 1 time in 21, is never part of it); the server normalizes the one it is given.
    key = normalize_key(random_key())
    srv = ZmqServer("127.0.0.1", 0, key=key, heartbeat_interval=0.1, heartbeat_timeout=0.3)
    srv.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(srv.url.replace("zmq://", "tcp://"))
        nonce = new_nonce()
        sock.send_multipart([bytes(b) for b in encode(Frame(Kind.OPEN, parts=[nonce]), Mac(key))])
        assert sock.poll(10_000), "no CHALLENGE"
        prefix, *rest = sock.recv_multipart()
        challenge = decode_parts(prefix, rest, Mac(key, bind=nonce))
        assert challenge.kind == Kind.CHALLENGE
        send, _ = session_macs(key, nonce, bytes(challenge.parts[0]), server=False)
        wait_for(lambda: not srv._ids, 10.0, "the server to drop the silent session")
        sock.send_multipart([bytes(b) for b in encode(hello("client", {"executor_id": 1}), send)])
        assert not sock.poll(1_000)  # no REJECT: it would read as "the job server rejected our key"
        sock.send_multipart([bytes(b) for b in encode(Frame(Kind.OPEN, parts=[nonce]), Mac(os.urandom(32)))])
        assert sock.poll(10_000)  # an OPEN under another key is told so
        prefix, *rest = sock.recv_multipart()
        assert decode_parts(prefix, rest).kind == Kind.REJECT
    finally:
        sock.close(linger=0)
        ctx.term()
        srv.stop()
