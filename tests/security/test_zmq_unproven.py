"""A zmq job server bounds the connections that have not proved the key, as the tcp server does.

libzmq keeps what a connection sends until a message is complete, out of our code's sight: a peer without
the key that never finishes a message (its last part never comes) or never sends one would hold the
server's memory and a descriptor for as long as it likes. The server watches every accepted connection
until a frame through it verifies, shuts down those past ``handshake_timeout``, and holds at most
``max_handshaking`` of them.

The attacker speaks ZMTP 3.0 by hand over a plain socket (a DEALER cannot send half a message); honest
peers are a real client; everything on loopback.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from remote_executor import RemoteExecutor

from ..conftest import wait_for

pytestmark = pytest.mark.zmq

KEY = b"the key of the zmq unproven-connection tests"


def zmtp_peer(port: int) -> socket.socket:
    """A connection that has done ZMTP 3.0's NULL handshake as a DEALER, ready to send message parts."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + bytes(31)
    sock.sendall(greeting)
    received = b""
    while len(received) < 64:  # the server's greeting
        chunk = sock.recv(64 - len(received))
        assert chunk, "the server closed during the greeting"
        received += chunk
    body = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(body)]) + body)
    return sock


def send_unfinished(sock: socket.socket, parts: int, size: int = 200) -> None:
    """``parts`` message parts, each flagged MORE: the message never ends."""
    sock.sendall((b"\x01" + bytes([size]) + bytes(size)) * parts)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server ends the connection within ``within`` seconds (what it sends meanwhile, its READY,
    is read and dropped)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


@pytest.fixture
def zmq_server() -> Iterator[Any]:
    from remote_executor.transports.zmq.server import ZmqServer

    made: list[Any] = []

    def make(**options: Any) -> Any:
        server = ZmqServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5, **options)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def test_a_message_that_never_ends_is_dropped_at_the_deadline_and_honest_sessions_stay(
        zmq_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="remote_executor")
    server = zmq_server(handshake_timeout=1.0)
    with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5) as honest:
        assert len(honest.status().clients) == 1
        attacker = zmtp_peer(server.port)
        started = time.monotonic()
        with attacker:
            send_unfinished(attacker, 500)
            assert closed_by_server(attacker, within=10.0), "the unfinished message was kept"
        assert time.monotonic() - started >= 0.9  # at its deadline, not before
        # The honest session, which was watched too until its first frame verified, outlived the deadline.
        time.sleep(1.2)  # (one more deadline: nothing else may be shut down)
        status = honest.status()
        assert len(status.clients) == 1
    cut = [r.getMessage() for r in caplog.records if "no verified frame within 1s" in r.getMessage()]
    assert len(cut) == 1, cut
    assert not [r for r in caplog.records if "reconnect" in r.getMessage()]


def test_a_connection_that_never_sends_is_dropped_at_the_deadline(zmq_server: Any) -> None:
    server = zmq_server(handshake_timeout=1.0)
    with zmtp_peer(server.port) as idle:
        assert closed_by_server(idle, within=10.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:  # not even a greeting
        assert closed_by_server(silent, within=10.0)


def test_connections_beyond_the_cap_are_refused_and_the_oldest_makes_room_for_a_client(
        zmq_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="remote_executor")
    server = zmq_server(max_handshaking=4, handshake_timeout=30.0)
    attackers = [zmtp_peer(server.port) for _ in range(4)]
    try:
        for sock in attackers:
            send_unfinished(sock, 10)
        wait_for(lambda: server.handshaking == 4, what="the four connections to be watched")
        # The places are taken, and none has waited for long: refused (before or during its greeting).
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            assert closed_by_server(extra, within=10.0)
        assert not any(closed_by_server(sock, within=0.05) for sock in attackers)
        time.sleep(1.1)  # (a place's fair chance: a quarter of the deadline, at most a second)
        with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5,
                            connect_timeout=20) as honest:
            assert len(honest.status().clients) == 1
        assert closed_by_server(attackers[0], within=10.0)  # the oldest made room
        assert not any(closed_by_server(sock, within=0.05) for sock in attackers[1:])
    finally:
        for sock in attackers:
            sock.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("at once: 4 connections have not proved the key" in m for m in messages), messages
    assert any("closing the one from 127.0.0.1:" in m for m in messages), messages


@pytest.mark.parametrize("bound", ["allowance", "budget"])
def test_a_connection_that_sends_more_than_an_unproven_peer_may_is_dropped_before_its_deadline(
        zmq_server: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """The deadline bounds how long; the allowance (one frame of the server's limit, and the handshake)
    and the budget of all such connections together bound how much: a peer cannot fill the server's memory
    at line speed meanwhile."""
    from remote_executor.transports.zmq import unproven
    from remote_executor.wire.frames import Limits

    caplog.set_level(logging.WARNING, logger="remote_executor")
    if bound == "allowance":
        server = zmq_server(handshake_timeout=60.0, limits=Limits(max_frame=1 << 20))  # allowance: 2 MiB
    else:
        monkeypatch.setattr(unproven, "BUDGET", 2 << 20)  # (read at every look: this server is in-process)
        server = zmq_server(handshake_timeout=60.0)
    with zmtp_peer(server.port) as attacker:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # (reset while it still sends, if the server is that quick)
            for _ in range(80):  # 80 x 50 KB = 4 MB; the message never ends
                send_unfinished(attacker, 250)
        assert closed_by_server(attacker, within=20.0)
        assert time.monotonic() - started < 30  # well before the 60 s deadline
    assert any("bytes received and no verified frame" in r.getMessage() for r in caplog.records)


def test_an_honest_client_whose_first_call_is_large_is_not_taken_for_an_attacker(
        zmq_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Its connection is proved by its HELLO, before the call's megabytes come."""
    from remote_executor.supervisor import Supervisor

    caplog.set_level(logging.WARNING, logger="remote_executor")
    server = zmq_server()
    workers = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": KEY.hex()},
                         worker_args=("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5"))
    workers.start()
    try:
        with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5) as ex:
            assert ex.submit(len, bytes(8 << 20)).result(timeout=60) == 8 << 20
    finally:
        workers.stop()
    assert not [r for r in caplog.records if "no verified frame" in r.getMessage()]


def test_a_peer_that_does_not_speak_zmtp3_is_refused_at_its_first_bytes(
        zmq_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """libzmq takes a peer whose first byte is not ZMTP 3's 0xFF for a ZMTP 1.0 one: no greeting, no
    mechanism, every byte after it a message for the server, and the messages of many such connections held
    libzmq's memory (hundreds of MB under a flood of random bytes, never given back). The server refuses those
    old protocols outright, at once; a ZMTP 3 peer gets as far as before."""
    caplog.set_level(logging.INFO, logger="remote_executor")
    server = zmq_server(handshake_timeout=30.0)
    with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5) as honest:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as old:
                # ZMTP 1.0: an empty identity message, then messages of 5 bytes ("length, flags, body").
                old.sendall(b"\x01\x00" + b"\x06\x00hello" * 1000)
                assert closed_by_server(old, within=5.0), "a ZMTP 1.0 peer was served"
        assert len(honest.status().clients) == 1  # the honest session stayed
        with zmtp_peer(server.port) as new:  # ZMTP 3.0: its handshake done, it waits for its deadline
            assert not closed_by_server(new, within=1.0)
    assert not [r for r in caplog.records if "malformed" in r.getMessage() or "dropping" in r.getMessage()]


def test_a_peer_that_connects_and_leaves_at_once_is_not_reported_as_a_lack_of_descriptors(
        zmq_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A connection libzmq had closed before the server looked at it was reported as "no descriptor left
    to watch it with": a warning about running out of descriptors, on a server that had thousands left."""
    caplog.set_level(logging.INFO, logger="remote_executor")
    server = zmq_server(handshake_timeout=5.0)
    with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5) as honest:
        for _ in range(50):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
        wait_for(lambda: server.handshaking == 0, what="the connections to be forgotten")
        assert len(honest.status().clients) == 1
    assert not [r for r in caplog.records if "descriptor" in r.getMessage()]
