"""The tcp job server against peers that connect and never complete the handshake, and against running out
of file descriptors: legitimate clients and workers keep being served, and the server survives.

Floods come from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to the loopback device), legitimate peers from
127.0.0.1, except where one address does both.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer

from ..conftest import FAST_HEARTBEAT, wait_for
from .test_tls import Pki, Steady, double, write_pki

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
FLOOD_FROM = "127.0.0.2"
CAP = 8
# The server's side: heartbeats as fast as the clients expect, but no deadline that would end the flood's
# connections before the test is over (what frees places here is the cap's eviction, nothing else).
SERVER = {"heartbeat_interval": 0.2, "heartbeat_timeout": 60.0, "handshake_timeout": 60.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop()


def start_worker(started: list[Supervisor], url: str, tls_args: tuple[str, ...] = ()) -> None:
    supervisor = Supervisor(url, 1, worker_args=(*FAST_HEARTBEAT, *tls_args), name="legit-worker")
    supervisor.start()
    started.append(supervisor)


def idle_connection(port: int, source: str = FLOOD_FROM) -> socket.socket:
    """A connection that says nothing: no TLS ClientHello, no HELLO."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset on close: no TIME_WAIT
    sock.settimeout(None)
    return sock


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_idle_connections_beyond_the_cap_do_not_stop_a_client(
        pki: Pki, tls: bool, supervisors: list[Supervisor]) -> None:
    server = TcpServer("127.0.0.1", 0, max_handshaking=CAP, **(pki.server() if tls else {}), **SERVER)
    server.start()
    flood: list[socket.socket] = []
    try:
        flood.extend(idle_connection(server.port) for _ in range(10 * CAP))
        wait_for(lambda: server.handshaking == CAP, what="the cap to be reached")
        client_tls = pki.client() if tls else {}
        start_worker(supervisors, server.url, pki.worker_args() if tls else ())
        with RemoteExecutor(transport=server.url, **client_tls, **FAST) as ex:
            assert list(ex.map(double, range(20))) == [2 * i for i in range(20)]
        assert server.handshaking <= CAP
        # The flood beyond the cap was closed, not left holding the server's descriptors.
        wait_for(lambda: sum(map(closed_now, flood)) >= 9 * CAP, what="the connections beyond the cap to be closed")
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def closed_now(sock: socket.socket) -> bool:
    """True if the server has closed this connection (without waiting)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the server closes this connection within 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


FLOOD_SCRIPT = textwrap.dedent(
    """
    import socket, struct, sys, time
    port, source, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    pool, made = [], 0
    print("flooding", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.5, source_address=(source, 0))
        except OSError:
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pool.append(sock)
        made += 1
        if len(pool) > 200:
            pool.pop(0).close()
    print(made, flush=True)
    """
)


def test_a_continuous_flood_from_one_address_does_not_starve_another(pki: Pki, supervisors: list[Supervisor]) -> None:
    """A peer that opens connections without pause (and never says a word on them) from one address: clients
    and workers from another address still connect, and a running client keeps its calls going."""
    server = TcpServer("127.0.0.1", 0, max_handshaking=CAP, **pki.server(), **SERVER)
    server.start()
    start_worker(supervisors, server.url, pki.worker_args())
    flood = None
    try:
        with Steady(server.url, pki.client()) as steady:
            flood = subprocess.Popen([sys.executable, "-c", FLOOD_SCRIPT, str(server.port), FLOOD_FROM, "6"],
                                     stdout=subprocess.PIPE, text=True)
            assert flood.stdout is not None and flood.stdout.readline() == "flooding\n"
            wait_for(lambda: server.handshaking == CAP, what="the flood to fill the places in handshake")
            for _ in range(3):  # new clients, each a TLS handshake and a HELLO through the flood
                with RemoteExecutor(transport=server.url, **pki.client(), **FAST) as ex:
                    assert ex.submit(double, 21).result(timeout=60) == 42
                assert server.handshaking <= CAP
            start_worker(supervisors, server.url, pki.worker_args())
            wait_for(lambda: server.scheduler.capacity == 2, what="a second worker to attach through the flood")
            before = steady.calls
            wait_for(lambda: steady.calls > before + 10, what="the steady client to go on")
            made = int(flood.communicate(timeout=60)[0])
            assert made > 10 * CAP  # it really flooded: many more connections than places
        assert steady.failures == []
    finally:
        if flood is not None:
            flood.kill()
            flood.communicate()
        server.stop()


SERVER_SCRIPT = textwrap.dedent(
    """
    import logging, resource, signal, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from remote_executor.transports.tcp.server import TcpServer
    server = TcpServer("127.0.0.1", 0, heartbeat_interval=0.2, heartbeat_timeout=60, handshake_timeout=60)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.url, flush=True)
    server.serve_forever()
    """
)


class Lines:
    """A child's stderr, read on a thread, with an event per awaited substring."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.text += line
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: needle in self.text, timeout), f"no {needle!r} in:\n{self.text}"

    def join(self) -> None:
        self._thread.join(30)


def test_the_server_survives_running_out_of_file_descriptors(supervisors: list[Supervisor], tmp_path: Path) -> None:
    """``accept()`` failing with EMFILE pauses accepting and makes room; it does not end the server, and
    clients connected before, and new ones, are served."""
    limit = 48
    server = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(limit)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    flood: list[socket.socket] = []
    try:
        assert server.stdout is not None and server.stderr is not None
        url = server.stdout.readline().strip()
        assert url.startswith("tcp://127.0.0.1:"), server.stderr.read()
        port = int(url.rsplit(":", 1)[1])
        log = Lines(server.stderr)
        start_worker(supervisors, url)
        with Steady(url, {}) as steady:
            flood.extend(idle_connection(port, "127.0.0.1") for _ in range(2 * limit))
            log.wait_for("Too many open files")
            with RemoteExecutor(transport=url, **FAST) as ex:  # a new client, through the backlog
                assert ex.submit(double, 3).result(timeout=60) == 6
            before = steady.calls
            wait_for(lambda: steady.calls > before + 10, what="the steady client to go on")
        assert steady.failures == []
        assert server.poll() is None
        log.wait_for("has waited longest")  # it made room by closing idle connections
        for sock in flood:
            sock.close()
        flood.clear()
        status = subprocess.run([sys.executable, "-m", "remote_executor.cli", "status", url], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and '"capacity": 1' in status.stdout, status.stderr
    finally:
        for sock in flood:
            sock.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        with contextlib.suppress(Exception):
            log.join()
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()
    assert server.returncode == 0


def test_a_connection_that_never_completes_its_handshake_is_closed_at_the_deadline() -> None:
    server = TcpServer("127.0.0.1", 0, heartbeat_interval=0.2, heartbeat_timeout=60, handshake_timeout=0.5)
    server.start()
    try:
        with idle_connection(server.port) as silent:
            wait_for(lambda: server.handshaking == 1, what="the connection to be taken")
            assert closed_by_peer(silent)  # within the 5 s this waits at most, well after the 0.5 s deadline
        assert server.handshaking == 0
        with RemoteExecutor(transport=server.url, **FAST, max_workers=1) as ex:  # the server serves on
            assert ex.transport.url == server.url
    finally:
        server.stop()


def test_a_client_refused_for_want_of_a_place_is_told_so_not_only_that_its_key_may_be_wrong() -> None:
    """The cap's newcomer is closed without a word (it has proved nothing): the client's error names both
    causes it can have."""
    from remote_executor.errors import HandshakeClosedError

    server = TcpServer("127.0.0.1", 0, max_handshaking=1, **SERVER)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as _idle:  # the one place, fresh
            wait_for(lambda: server.handshaking == 1, what="the idle connection to be taken")
            with pytest.raises(HandshakeClosedError, match="refusing new connections for a while"):
                RemoteExecutor(transport=server.url, connect_timeout=10, heartbeat_interval=0.2)
    finally:
        server.stop()
