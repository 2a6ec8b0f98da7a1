"""TLS for tcp://: a real job server, real worker processes and real clients over TLS on 127.0.0.1.

Certificates come from ``trustme`` (a throwaway CA per test module), except where the product's own
``remote-executor tls-keygen`` is under test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from remote_executor import RemoteExecutor
from remote_executor.errors import AuthenticationError, ConnectionFailedError, TransportError
from remote_executor.supervisor import Supervisor
from remote_executor.tls import TlsConfig, TlsError, make_cluster_material
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.tcp.tlsstream import TlsChannel
from remote_executor.wire.frames import Frame, FrameReader, Kind, Limits, encode_bytes
from remote_executor.wire.messages import hello

from ..conftest import FAST_HEARTBEAT, start_cli_server, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
CLI = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]


@dataclass(frozen=True)
class Pki:
    """Certificate files: one cluster CA with a server and a client certificate, and a stranger's CA."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA nobody in the cluster trusts
    other_client_cert: str  # a client certificate that CA signed
    other_client_key: str

    def server(self, mutual: bool = True) -> dict[str, str]:
        """TcpServer keyword arguments."""
        options = {"tls_cert": self.server_cert, "tls_key": self.server_key}
        return {**options, "tls_ca": self.ca} if mutual else options

    def client(self) -> dict[str, str]:
        """RemoteExecutor keyword arguments of a legitimate client."""
        return {"tls_ca": self.ca, "tls_cert": self.client_cert, "tls_key": self.client_key}

    def worker_args(self) -> tuple[str, ...]:
        return TlsConfig(self.ca, self.client_cert, self.client_key).to_args()


def write_pki(directory: Path, *server_names: str) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    files: dict[str, str] = {}

    def save(name: str, blob: Any) -> None:
        files[name] = str(directory / f"{name}.pem")
        blob.write_to_path(files[name])

    save("ca", ca.cert_pem)
    save("other_ca", other.cert_pem)
    server = ca.issue_cert(*(server_names or ("127.0.0.1", "localhost")))
    save("server_cert", server.cert_chain_pems[0])
    save("server_key", server.private_key_pem)
    client = ca.issue_cert("client.example")
    save("client_cert", client.cert_chain_pems[0])
    save("client_key", client.private_key_pem)
    stranger = other.issue_cert("client.example")
    save("other_client_cert", stranger.cert_chain_pems[0])
    save("other_client_key", stranger.private_key_pem)
    return Pki(**files)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1", 0, **pki.server(), **FAST)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_workers() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(url: str, count: int, tls_args: tuple[str, ...]) -> Supervisor:
        supervisor = Supervisor(url, count, worker_args=(*FAST_HEARTBEAT, *tls_args), name="tls-worker")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.stop()


def double(x: int) -> int:
    return 2 * x


# --- a cluster over TLS ---------------------------------------------------------------------------------


def test_cluster_over_mutual_tls_from_python(tls_server: TcpServer, pki: Pki,
                                             start_workers: Callable[..., Supervisor]) -> None:
    assert tls_server.tls
    start_workers(tls_server.url, 2, pki.worker_args())
    payload = os.urandom(3_000_000)  # many TLS records each way, through the loop's partial reads and writes
    with RemoteExecutor(transport=tls_server.url, **pki.client(), **FAST) as ex:
        assert list(ex.map(double, range(100), chunksize=3)) == [2 * i for i in range(100)]
        assert ex.submit(lambda: os.getpid()).result(timeout=30) != os.getpid()
        assert ex.submit(bytes, payload).result(timeout=60) == payload
        assert [f.result(timeout=60) for f in [ex.submit(double, i) for i in range(200)]] == [2 * i for i in range(200)]
    wait_for(lambda: tls_server.scheduler.capacity == 2, what="both TLS workers attached")


def test_tls_config_object_and_server_certificate_only(pki: Pki, start_workers: Callable[..., Supervisor]) -> None:
    """TLS without client certificates (the server authenticates itself only), configured with a TlsConfig."""
    server = TcpServer("127.0.0.1", 0, tls=TlsConfig(cert=pki.server_cert, key=pki.server_key), **FAST)
    server.start()
    try:
        start_workers(server.url, 1, TlsConfig(ca=pki.ca).to_args())
        with RemoteExecutor(transport=server.url, tls=TlsConfig(ca=pki.ca), **FAST) as ex:
            assert ex.submit(double, 21).result(timeout=60) == 42
    finally:
        server.stop()


@contextlib.contextmanager
def cli_server(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``remote-executor server tcp://127.0.0.1:PORT ARGS``: its URL, stopped with SIGTERM afterwards."""
    port, server = start_cli_server(lambda port: [*CLI, "server", f"tcp://127.0.0.1:{port}", *args])
    try:
        yield f"tcp://127.0.0.1:{port}", server
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


def test_cluster_over_tls_from_the_cli(pki: Pki) -> None:
    tls_server_args = ("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-ca", pki.ca)
    tls_client_args = ("--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key)
    with cli_server(*tls_server_args, *FAST_HEARTBEAT) as (url, server):
        worker = subprocess.Popen([*CLI, "worker", url, "--processes", "2", *tls_client_args, *FAST_HEARTBEAT],
                                  stdout=subprocess.DEVNULL)
        try:
            with RemoteExecutor(transport=url, **pki.client(), **FAST) as ex:
                assert list(ex.map(double, range(20))) == [2 * i for i in range(20)]

            def status_text() -> str:
                status = subprocess.run([*CLI, "status", url, *tls_client_args], capture_output=True, text=True,
                                        timeout=60)
                assert status.returncode == 0, status.stderr
                return status.stdout

            # (the calls may all have run before the second worker process attached)
            wait_for(lambda: '"capacity": 2' in status_text(), what="status over TLS to show both workers")
            ping = subprocess.run([*CLI, "ping", url, *tls_client_args], capture_output=True, text=True, timeout=60)
            assert ping.returncode == 0 and "answered in" in ping.stdout, ping.stderr
            plain = subprocess.run([*CLI, "ping", url], capture_output=True, text=True, timeout=60)
            assert plain.returncode == 1 and "requires TLS" in plain.stderr
            no_cert = subprocess.run([*CLI, "ping", url, "--tls-ca", pki.ca], capture_output=True, text=True,
                                     timeout=60)
            assert no_cert.returncode == 1 and "refused this side's TLS certificate" in no_cert.stderr
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        assert server.poll() is None  # every refusal above left it serving


def test_cli_tls_flags_are_for_tcp_and_gearman_only(pki: Pki, tmp_path: Path) -> None:
    for command in (["server", "zmq://127.0.0.1:5999", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key],
                    ["ping", "zmq://127.0.0.1:5999", "--tls-ca", pki.ca]):  # zmq has CURVE instead
        run = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "for tcp:// and gearman:// only" in run.stderr, run.stderr
    missing = subprocess.run([*CLI, "worker", "tcp://127.0.0.1:5999", "--tls-ca", str(tmp_path / "nope.pem")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nope.pem" in missing.stderr


# --- who is refused, and the server serves on -------------------------------------------------------------


class Steady:
    """A legitimate client calling without pause on a thread of its own, recording any failure."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.calls = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, options), daemon=True)

    def _run(self, url: str, options: dict[str, Any]) -> None:
        try:
            with RemoteExecutor(transport=url, **options, **FAST) as ex:
                while not self._stop.is_set():
                    assert ex.submit(double, self.calls).result(timeout=60) == 2 * self.calls
                    self.calls += 1
                    self._started.set()
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            self._started.set()

    def __enter__(self) -> Steady:
        self._thread.start()
        assert self._started.wait(60), "the steady client made no call"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_mutual_tls_refuses_peers_without_a_trusted_certificate_and_serves_on(
        tls_server: TcpServer, pki: Pki, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(tls_server.url, 1, pki.worker_args())
    with Steady(tls_server.url, pki.client()) as steady:
        before = steady.calls
        with pytest.raises(TlsError, match=r"refused this side's TLS certificate") as no_cert:
            RemoteExecutor(transport=tls_server.url, tls_ca=pki.ca, **FAST)
        assert tls_server.url in str(no_cert.value)
        with pytest.raises(TlsError, match=r"refused this side's TLS certificate"):
            RemoteExecutor(transport=tls_server.url, tls_ca=pki.ca, tls_cert=pki.other_client_cert,
                           tls_key=pki.other_client_key, **FAST)
        for args in (TlsConfig(ca=pki.ca).to_args(), TlsConfig(pki.ca, pki.other_client_cert,
                                                               pki.other_client_key).to_args()):
            worker = subprocess.run([sys.executable, "-m", "remote_executor.worker", tls_server.url,
                                     "--reconnect-timeout", "5", *args], capture_output=True, text=True, timeout=60)
            assert worker.returncode == 2, worker.stderr  # refused: restarting it would not help
            assert "refused this side's TLS certificate" in worker.stderr
        wait_for(lambda: steady.calls > before + 10, what="the steady client to go on")
    assert steady.failures == []
    assert tls_server.scheduler.capacity == 1  # no refused worker got in


def test_mutual_tls_with_no_key_given_uses_the_per_user_key_and_keyless_takes_insecure_everywhere(
        tls_server: TcpServer, keyless_tls_server: TcpServer, pki: Pki,
        start_workers: Callable[..., Supervisor]) -> None:
    """A client certificate does not replace the key: given none, every side brings the per-user key; a
    cluster without one takes insecure on the server, its workers and its clients alike."""
    start_workers(tls_server.url, 1, pki.worker_args())
    start_workers(keyless_tls_server.url, 1, (*pki.worker_args(), "--insecure"))
    with RemoteExecutor(transport=tls_server.url, **pki.client(), **FAST) as ex:
        assert ex.submit(double, 2).result(timeout=60) == 4
    with RemoteExecutor(transport=keyless_tls_server.url, insecure=True, **pki.client(), **FAST) as ex:
        assert ex.submit(double, 3).result(timeout=60) == 6
    with pytest.raises(AuthenticationError):  # a keyless client of a keyed server, certificate or not
        RemoteExecutor(transport=tls_server.url, insecure=True, **pki.client(), connect_timeout=5, **FAST)
    with pytest.raises(AuthenticationError):  # and the per-user key where the server has none
        RemoteExecutor(transport=keyless_tls_server.url, **pki.client(), connect_timeout=5, **FAST)


def test_a_client_that_does_not_trust_the_server_fails_at_construction(tls_server: TcpServer, pki: Pki) -> None:
    with pytest.raises(TlsError, match="cannot verify the TLS certificate") as untrusted:
        RemoteExecutor(transport=tls_server.url, tls_ca=pki.other_ca, tls_cert=pki.client_cert,
                       tls_key=pki.client_key, **FAST)
    assert isinstance(untrusted.value, TransportError) and tls_server.url in str(untrusted.value)
    with pytest.raises(TlsError, match="cannot verify the TLS certificate"):  # the system's CAs do not know it
        RemoteExecutor(transport=tls_server.url, tls=True, tls_cert=pki.client_cert, tls_key=pki.client_key, **FAST)


def test_the_certificate_must_name_the_host_or_ip_address_connected_to(
        tmp_path: Path, start_workers: Callable[..., Supervisor]) -> None:
    """A certificate for "localhost" only is good for tcp://localhost:P, not for tcp://127.0.0.1:P."""
    pki = write_pki(tmp_path, "localhost")
    server = TcpServer("127.0.0.1", 0, **pki.server(), **FAST)
    server.start()
    try:
        with pytest.raises(TlsError, match=r"'127\.0\.0\.1'") as wrong:
            RemoteExecutor(transport=server.url, **pki.client(), **FAST)
        assert "IP address mismatch" in str(wrong.value)
        by_name = f"tcp://localhost:{server.port}"
        start_workers(by_name, 1, pki.worker_args())
        with RemoteExecutor(transport=by_name, **pki.client(), **FAST) as ex:
            assert ex.submit(double, 4).result(timeout=60) == 8
    finally:
        server.stop()


def test_a_plaintext_peer_is_refused_clearly_and_the_server_serves_on(
        tls_server: TcpServer, pki: Pki, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(tls_server.url, 1, pki.worker_args())
    with Steady(tls_server.url, pki.client()) as steady:
        with pytest.raises(TransportError, match="requires TLS") as plain:
            RemoteExecutor(transport=tls_server.url, **FAST)
        assert not isinstance(plain.value, ConnectionFailedError)  # not retried: it would never work
        worker = subprocess.run([sys.executable, "-m", "remote_executor.worker", tls_server.url],
                                capture_output=True, text=True, timeout=60)
        assert worker.returncode == 2 and "requires TLS" in worker.stderr
        with socket.create_connection(("127.0.0.1", tls_server.port)) as garbage:  # neither TLS nor frames
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert receive_all(garbage) == b""  # closed without a word
        before = steady.calls
        wait_for(lambda: steady.calls > before + 10, what="the steady client to go on")
    assert steady.failures == []


def receive_all(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset, from unread input, counts as a close)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_a_tls_client_of_a_plaintext_server_fails_clearly(pki: Pki, caplog: pytest.LogCaptureFixture,
                                                          start_workers: Callable[..., Supervisor]) -> None:
    server = TcpServer("127.0.0.1", 0, **FAST)
    server.start()
    try:
        start_workers(server.url, 1, ())
        with caplog.at_level(logging.WARNING, "remote_executor.jobserver.server"), \
                pytest.raises(ConnectionFailedError, match="during the TLS handshake") as failed:
            RemoteExecutor(transport=server.url, **pki.client(), **FAST, connect_timeout=5)
        assert server.url in str(failed.value) and "TLS server" in str(failed.value)
        assert "a TLS client? this server has no TLS" in caplog.text
        with RemoteExecutor(transport=server.url, **FAST) as ex:
            assert ex.submit(double, 5).result(timeout=60) == 10
    finally:
        server.stop()


# --- bytes that wait inside the TLS layer ------------------------------------------------------------------


def frames_then_a_small_one(junk: int) -> bytes:
    """A HELLO with a part big enough to be read in place, and a STATUS request right behind it: sent in one
    TLS write, the STATUS shares a record with the HELLO's last bytes, so it waits, decrypted, inside the
    SSL object when the HELLO's part is full; select() does not see it."""
    return (encode_bytes(hello("admin", {"name": "probe"}, [os.urandom(junk)])) + encode_bytes(Frame(Kind.STATUS)))


@pytest.fixture
def keyless_tls_server(pki: Pki) -> Iterator[TcpServer]:
    """A mutual-TLS server without a key (insecure: TLS alone authenticates), so raw frames need no HMAC."""
    server = TcpServer("127.0.0.1", 0, insecure=True, **pki.server(), **FAST)
    server.start()
    yield server
    server.stop()


def test_the_server_reads_what_waits_inside_the_tls_layer(keyless_tls_server: TcpServer, pki: Pki) -> None:
    context = TlsConfig(pki.ca, pki.client_cert, pki.client_key).client_context()
    with socket.create_connection(("127.0.0.1", keyless_tls_server.port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        reader = FrameReader()
        sock.sendall(encode_bytes(Frame(Kind.OPEN, parts=[os.urandom(32)])))  # a keyless server: no signatures
        replies: list[Frame] = []
        while not replies:  # the CHALLENGE opens the session
            view = reader.buffer()
            n = sock.recv_into(view)
            assert n, "the server closed the connection"
            replies += reader.feed(n)
        assert [frame.kind for frame in replies] == [Kind.CHALLENGE]
        replies = []
        sock.sendall(frames_then_a_small_one(300_500))  # then silence: no later bytes wake the server up
        while not any(frame.kind == Kind.STATUS for frame in replies):
            view = reader.buffer()
            n = sock.recv_into(view)  # times out (30 s) if the server never saw the STATUS
            assert n, "the server closed the connection"
            replies += reader.feed(n)
    assert [frame.kind for frame in replies] == [Kind.WELCOME, Kind.STATUS]


def test_a_channel_reads_what_waits_inside_the_tls_layer(tmp_path: Path, pki: Pki) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    context = TlsConfig(cert=pki.server_cert, key=pki.server_key).server_context()

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(frames_then_a_small_one(300_500))
            tls.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    channel = TlsChannel.connect_tls(("127.0.0.1", listener.getsockname()[1]), None, Limits(), url, 30,
                                     TlsConfig(ca=pki.ca).client_context())
    try:
        frames: list[Frame] = []
        while not frames:  # as the client's loop does: wait, then take what arrived
            channel.wait(30)
            frames = channel.frames()
        assert [frame.kind for frame in frames] == [Kind.HELLO, Kind.STATUS]  # both at once: none stranded
    finally:
        channel.close()
        thread.join(30)
        listener.close()


# --- configuration errors -------------------------------------------------------------------------------


def test_bad_tls_settings_are_clear_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"nothere\.pem"):
        TcpServer("127.0.0.1", 0, tls_cert=str(tmp_path / "nothere.pem"), tls_key=pki.server_key)
    with pytest.raises(TlsError, match="cannot load the TLS certificate"):  # a key that is not the cert's
        TcpServer("127.0.0.1", 0, tls_cert=pki.server_cert, tls_key=pki.client_key)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(Path(pki.server_key).read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(TlsError, match="is encrypted"):  # never a passphrase prompt
        TcpServer("127.0.0.1", 0, tls_cert=pki.server_cert, tls_key=str(encrypted))
    with pytest.raises(TlsError, match="needs a certificate"):
        TcpServer("127.0.0.1", 0, tls_ca=pki.ca)
    with pytest.raises(TlsError, match="cannot load the TLS CA"):
        RemoteExecutor(transport="tcp://127.0.0.1:9", tls_ca=pki.client_key)
    with pytest.raises(TypeError, match=r"'tls_cafile' \(did you mean 'tls_ca'\?\)"):
        RemoteExecutor(transport="tcp://127.0.0.1:9", tls_cafile=pki.ca)
    with pytest.raises(TransportError, match="embedded cluster"):
        RemoteExecutor(max_workers=1, transport="tcp", tls_ca=pki.ca)


# --- what crosses the wire ------------------------------------------------------------------------------


class Relay:
    """A TCP relay that records every byte it forwards, in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target)
                self._sockets += [client, server]
                for src, dst in ((client, server), (server, client)):
                    thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close() alone would not)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext (the control)", "tls"])
def test_a_capture_of_the_connection_shows_no_argument_bytes_under_tls(
        pki: Pki, tls: bool, start_workers: Callable[..., Supervisor]) -> None:
    marker = b"MARKER-" + os.urandom(8).hex().encode()
    server = TcpServer("127.0.0.1", 0, **(pki.server() if tls else {}), **FAST)
    server.start()
    relay = Relay(("127.0.0.1", server.port))
    try:
        start_workers(server.url, 1, pki.worker_args() if tls else ())
        with RemoteExecutor(transport=relay.url, **(pki.client() if tls else {}), **FAST) as ex:
            assert ex.submit(bytes.upper, marker).result(timeout=60) == marker.upper()
    finally:
        relay.close()
        server.stop()
    assert len(relay.captured) > 500  # the call went through the relay
    assert (marker in relay.captured) is not tls
    assert (marker.upper() in relay.captured) is not tls


# --- a private CA in one command --------------------------------------------------------------------------


def test_tls_keygen_material_runs_a_cluster(tmp_path: Path, start_workers: Callable[..., Supervisor]) -> None:
    out = tmp_path / "tls"
    made = subprocess.run([*CLI, "tls-keygen", str(out), "--host", "127.0.0.1", "--host", "localhost"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    for key in ("server.key", "client.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    again = subprocess.run([*CLI, "tls-keygen", str(out), "--host", "127.0.0.1"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr

    server_tls = TlsConfig(str(out / "ca.pem"), str(out / "server.pem"), str(out / "server.key"))
    client_tls = TlsConfig(str(out / "ca.pem"), str(out / "client.pem"), str(out / "client.key"))
    strict = client_tls.client_context()  # what Python 3.13 checks by default: the certificates pass it
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    server = TcpServer("127.0.0.1", 0, tls=server_tls, **FAST)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                strict.wrap_socket(raw, server_hostname="127.0.0.1") as checked:
            assert checked.version() in ("TLSv1.2", "TLSv1.3")
        start_workers(f"tcp://localhost:{server.port}", 1, client_tls.to_args())
        with RemoteExecutor(transport=server.url, tls=client_tls, **FAST) as ex:
            assert ex.submit(double, 8).result(timeout=60) == 16
        with pytest.raises(TlsError, match="refused this side's TLS certificate"):  # the server cert is no client's
            RemoteExecutor(transport=server.url, tls=server_tls, **FAST)
    finally:
        server.stop()


def test_make_cluster_material_rejects_bad_hosts_and_needs_cryptography(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        make_cluster_material(tmp_path / "a", ["bad host"])
    with pytest.raises(ValueError, match="at least one host"):
        make_cluster_material(tmp_path / "b", [])
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if it were not installed
    with pytest.raises(TlsError, match=r"pip install 'remote-executor\[crypto\]'"):
        make_cluster_material(tmp_path / "c", ["127.0.0.1"])


@pytest.mark.slow
def test_the_tls_cost_benchmark_prints_a_table_of_numbers() -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tls_cost.py"
    run = subprocess.run([sys.executable, str(script), "--calls", "50", "--payload-mb", "2", "--runs", "1",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row[0].split(" (")[0].strip() for row in rows] == [
        "sequential round trip p50", "sequential round trip p99", "2 MB round trip"]
    for row in rows:
        assert all(cell.strip().replace(",", "").isdigit() for cell in row[2:4]), row
