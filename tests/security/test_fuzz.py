"""Bounded fuzzing (hypothesis) of what a peer can send first: raw bytes and well-formed but hostile frames
at a live job server's door, and any frame at the scheduler once a peer is in. Nothing may escape a loop;
a legitimate client keeps being served throughout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_executor import RemoteExecutor
from remote_executor.jobserver.scheduler import Scheduler
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import Frame, Kind, encode_bytes
from remote_executor.wire.messages import hello

from ..conftest import FAST_HEARTBEAT

KEY = b"fuzzing key"
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}

frames = st.builds(
    Frame,
    st.sampled_from(Kind),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.binary(max_size=64), max_size=4),
    st.integers(0, 0x7FFF),
)


@pytest.fixture(scope="module")
def door() -> Iterator[tuple[TcpServer, RemoteExecutor]]:
    server = TcpServer("127.0.0.1", 0, key=KEY, **FAST)
    server.start()
    workers = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": KEY.hex()}, worker_args=FAST_HEARTBEAT,
                         name="fuzz-worker")
    workers.start()
    legit = RemoteExecutor(transport=server.url, key=KEY, **FAST)
    try:
        yield server, legit
    finally:
        legit.shutdown()
        workers.stop()
        server.stop()


def knock(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(65536):
                pass
        except OSError:
            pass  # the server may cut us off mid-send: that is its right


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=512),
    frames.map(encode_bytes),
    frames.map(lambda f: encode_bytes(f, b"not the key")),
    st.lists(frames, min_size=1, max_size=3).map(lambda fs: b"".join(encode_bytes(f, KEY) for f in fs)),
))
def test_anything_at_the_door_is_refused_and_the_server_serves_on(door: tuple[TcpServer, Any], data: bytes) -> None:
    server, legit = door
    knock(server.port, data)
    assert legit.submit(pow, 2, 7).result(timeout=60) == 128
    assert len(server.scheduler.status()["clients"]) == 1  # only the legitimate client ever got in


@settings(max_examples=300, deadline=None)
@given(role=st.sampled_from(["client", "worker", "admin"]), later=st.lists(frames, max_size=8))
def test_the_scheduler_survives_any_frame_from_an_admitted_peer(role: str, later: list[Frame]) -> None:
    scheduler = Scheduler(name="fuzz", heartbeat_interval=1.0, heartbeat_timeout=5.0)
    scheduler.connected(1, 0.0)
    info: dict[str, Any] = {"name": "peer", "executor_id": 1, "max_retries": 1, "slots": 1}
    scheduler.received(1, hello(role, info), 0.0)
    for step, frame in enumerate(later, start=1):
        scheduler.received(1, frame, float(step))  # never raises: a bad frame closes that peer
        scheduler.take_actions()
    scheduler.tick(100.0)
    assert isinstance(scheduler.status(), dict)
