"""Our gearman connections over TLS, against a real gearmand behind a TLS terminator.

Debian's gearmand accepts ``--ssl`` but is built without TLS (its binary has no ``SSL_accept``), so the TLS
end here is a small terminator of our own in front of a real, plain gearmand, as stunnel or HAProxy would be
in production; a gearmand built with TLS speaks the same to our connections. A tap in front of the
terminator keeps what clients and workers send, so the test can check that no gearman packet and no argument
crosses the wire in clear.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor, TransportError
from remote_executor.supervisor import Supervisor
from remote_executor.tls import TlsMaterial, make_cluster_material
from remote_executor.transports.gearman.gearmand import GearmandProcess

from ..conftest import FAST_HEARTBEAT

pytestmark = pytest.mark.gearman

KEY = b"gearman-tls-test-key-0123456789abcdef"
SECRET = "a-secret-argument-nobody-may-read"
SRC = str(Path(__file__).resolve().parents[2] / "src")


class Relay:
    """Accepts connections on a loopback port and relays each to ``backend``: decrypting TLS first when
    given a server context (the terminator), else byte for byte, keeping a copy of what the clients sent
    (the tap: what an eavesdropper on the wire sees)."""

    def __init__(self, backend: tuple[str, int], context: ssl.SSLContext | None = None) -> None:
        self.backend = backend
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.context is not None:
            try:
                client = self.context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()
                return
        try:
            upstream = socket.create_connection(self.backend)
        except OSError:
            client.close()
            return
        with self._lock:
            self.connections += 1
            self._sockets += [client, upstream]
            stopped = self._stopped
        if stopped:
            client.close()
            upstream.close()
            return
        threading.Thread(target=_pipe, args=(client, upstream, self), daemon=True).start()
        _pipe(upstream, client, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the other thread (close() does not)
        self.listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(10)


def _pipe(source: socket.socket, sink: socket.socket, recorder: Relay | None) -> None:
    try:
        while data := source.recv(65536):
            if recorder is not None:
                recorder.seen += data
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tls_gearmand(tmp_path: Path) -> Iterator[tuple[str, TlsMaterial, Relay]]:
    """gearmand, a TLS terminator in front of it, and a tap in front of that: (the tap's URL, the cluster's
    TLS material, the tap)."""
    material = make_cluster_material(tmp_path / "tls", ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(material.server_cert), str(material.server_key))
    with GearmandProcess(threads=2) as gearmand:
        terminator = Relay(gearmand.address, context)
        tap = Relay(("127.0.0.1", terminator.port))
        try:
            yield f"gearman://127.0.0.1:{tap.port}", material, tap
        finally:
            tap.stop()
            terminator.stop()


def echo_secret(text: str) -> str:
    return text.upper()


def test_calls_run_over_tls_and_nothing_crosses_the_wire_in_clear(
        tls_gearmand: tuple[str, TlsMaterial, Relay]) -> None:
    url, material, tap = tls_gearmand
    supervisor = Supervisor(f"{url}/tls", 2, env={"REMOTE_EXECUTOR_KEY": KEY.decode()},
                            worker_args=(*FAST_HEARTBEAT, "--tls-ca", str(material.ca)), name="tls-worker")
    supervisor.start()
    try:
        with RemoteExecutor(transport=f"{url}/tls", key=KEY, tls_ca=str(material.ca),
                            heartbeat_interval=0.2, heartbeat_timeout=1.5) as ex:
            assert list(ex.map(echo_secret, [SECRET] * 20, timeout=60)) == [SECRET.upper()] * 20
            assert ex.submit(os.getpid).result(timeout=60) in supervisor.pids()
    finally:
        supervisor.stop()
    assert tap.connections >= 3  # the client, two workers (and the client's admin polls)
    wire = bytes(tap.seen)
    assert len(wire) > 1000
    assert b"\0REQ" not in wire and SECRET.encode() not in wire and b"remote_executor." not in wire


def test_a_client_without_the_ca_is_refused_clearly(tls_gearmand: tuple[str, TlsMaterial, Relay],
                                                     tmp_path: Path) -> None:
    url, _, _ = tls_gearmand
    other = make_cluster_material(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(TransportError, match=r"TLS with gearmand at 127\.0\.0\.1:\d+ failed"):
        RemoteExecutor(transport=url, key=KEY, tls_ca=str(other.ca), connect_timeout=5).submit(abs, 1).result(30)


def test_status_over_tls_from_the_command_line(tls_gearmand: tuple[str, TlsMaterial, Relay]) -> None:
    url, material, _ = tls_gearmand
    done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "status", url, "--tls-ca", str(material.ca)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["servers"][0]["version"]


def tls_listener(tmp_path: Path) -> tuple[TlsMaterial, ssl.SSLContext, socket.socket]:
    """A cluster's TLS material, a server context with its certificate, and a loopback listener for it."""
    material = make_cluster_material(tmp_path / "tls", ["127.0.0.1"])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(material.server_cert), str(material.server_key))
    return material, server_context, socket.create_server(("127.0.0.1", 0))


def test_a_tls_connection_on_a_descriptor_above_1023_waits_with_poll(tmp_path: Path) -> None:
    # A busy process (many connections, files) hands out descriptors past 1023, where select() fails with
    # "filedescriptor out of range": a shared TLS socket must still wait for its peer there.
    from remote_executor.transports.gearman.tlssocket import SharedTlsSocket

    material, server_context, listener = tls_listener(tmp_path)
    go = threading.Event()

    def echo_later() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            data = tls.recv(100)
            go.wait(30)  # the client is waiting in recv by now (or soon): it must wait, not fail
            tls.sendall(data.upper())

    thread = threading.Thread(target=echo_later, daemon=True)
    thread.start()
    raw = socket.create_connection(listener.getsockname(), timeout=10)
    high = socket.socket(fileno=os.dup2(raw.fileno(), 1500))
    raw.close()
    client_context = ssl.create_default_context(cafile=str(material.ca))
    shared = SharedTlsSocket.connect(high, client_context, "127.0.0.1", timeout=10)
    try:
        assert shared.fileno() >= 1024
        shared.sendall(b"ping")
        threading.Timer(0.2, go.set).start()
        assert shared.recv(100) == b"PING"
    finally:
        go.set()
        shared.close()
        thread.join(10)
        listener.close()


def test_a_tls_peer_that_sends_half_a_record_does_not_hold_the_connect_past_its_timeout(tmp_path: Path) -> None:
    """The first echo waits for whole TLS records: a peer that completes the handshake, then sends the start
    of a record and no more, held a worker's (or client's) connect for ever, and with it the worker's drain."""
    from remote_executor.transports.gearman.connection import GearmanConnectionError, GearmanWorkerConnection

    material, server_context, listener = tls_listener(tmp_path)
    done = threading.Event()

    def half_a_record() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(100)  # the echo request
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:  # under TLS: an application-data record
                raw.sendall(b"\x17\x03\x03\x00\x40" + b"x" * 10)  # of 64 bytes, 10 of them sent
            done.wait(60)

    server = threading.Thread(target=half_a_record, daemon=True)
    server.start()
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            GearmanWorkerConnection("127.0.0.1", listener.getsockname()[1], [b"f"], connect_timeout=1.0,
                                    tls=ssl.create_default_context(cafile=str(material.ca))).close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    connecting = threading.Thread(target=connect, daemon=True)
    connecting.start()
    try:
        connecting.join(15)
        assert not connecting.is_alive(), "the connect waited past its timeout for the rest of a record"
        assert isinstance(outcome[0], GearmanConnectionError), outcome
    finally:
        done.set()
        server.join(10)
        listener.close()
