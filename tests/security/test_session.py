"""Sessions: nothing a peer says is parsed before it proves it holds the key, and recorded frames are worthless.

Each attack runs against a real job server (tcp and zmq) with a legitimate client submitting calls at the
same time; the legitimate client must see no failure, and the attack must run no call.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import AuthenticationError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer
from remote_executor.wire.frames import HEADER, KEY_REJECTED, VERSION, Frame, Kind, decode_whole, encode_bytes
from remote_executor.wire.messages import RejectCode
from remote_executor.wire.session import new_nonce, session_macs

from ..conftest import FAST_HEARTBEAT, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = b"the cluster key of this test"
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


def touch(path: str, line: str) -> str:
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


class RecordingRelay:
    """A TCP relay on 127.0.0.1 that records what the client side sends (for tcp: the whole byte stream)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        self._sockets += [client, upstream]
        for src, dst, record in ((client, upstream, True), (upstream, client, False)):
            thread = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.sent.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def keyed_tcp() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1", 0, key=KEY, **FAST)
    server.start()
    workers = Supervisor(server.url, 2, env={"REMOTE_EXECUTOR_KEY_HEX": KEY.hex()}, worker_args=FAST_HEARTBEAT,
                         name="session-worker")
    workers.start()
    try:
        yield server
    finally:
        workers.stop()
        server.stop()


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_recorded_session_replayed_runs_nothing(keyed_tcp: TcpServer, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    relay = RecordingRelay(("127.0.0.1", keyed_tcp.port))
    with RemoteExecutor(transport=f"tcp://127.0.0.1:{relay.port}", key=KEY, **FAST) as ex:
        assert ex.submit(touch, str(log), "recorded").result(timeout=60) == "recorded"
    relay.close()
    assert runs(log) == ["recorded"] and len(relay.sent) > 0
    with RemoteExecutor(transport=keyed_tcp.url, key=KEY, **FAST) as legit:
        with socket.create_connection(("127.0.0.1", keyed_tcp.port), timeout=10) as attacker:
            attacker.sendall(relay.sent)  # OPEN, HELLO, SUBMIT ... exactly as recorded
            attacker.settimeout(10)
            try:  # the server answers the OPEN, then closes on the stale HELLO
                while attacker.recv(65536):
                    pass
            except ConnectionResetError:  # closed with the recorded SUBMIT still unread: the kernel resets
                pass
        assert [legit.submit(touch, str(log), f"legit-{i}").result(timeout=60) for i in range(5)]
    assert sorted(runs(log)) == sorted(["recorded", *(f"legit-{i}" for i in range(5))])
    # The replayed client never got in: once the legitimate ones have gone, no client is left.
    wait_for(lambda: keyed_tcp.scheduler.status()["clients"] == [], what="the legitimate clients to leave")
    assert all(worker["name"].startswith("session-worker") for worker in keyed_tcp.scheduler.status()["workers"])


def test_a_frame_is_bound_to_its_session_and_its_position() -> None:
    key = KEY
    nonce_c, nonce_s = new_nonce(), new_nonce()
    client_send, _ = session_macs(key, nonce_c, nonce_s, server=False)
    _, server_receive = session_macs(key, nonce_c, nonce_s, server=True)
    frames = [encode_bytes(Frame(Kind.SUBMIT, a=i, parts=[b"call"]), client_send) for i in range(3)]
    from remote_executor.wire.frames import FrameReader

    in_order = FrameReader(server_receive)
    assert [f.a for f in _feed(in_order, b"".join(frames))] == [0, 1, 2]
    _, other_session = session_macs(key, new_nonce(), nonce_s, server=True)
    with pytest.raises(AuthenticationError):
        _feed(FrameReader(other_session), frames[0])  # another connection's keys
    _, fresh = session_macs(key, nonce_c, nonce_s, server=True)
    _feed(FrameReader(fresh), frames[0])
    with pytest.raises(AuthenticationError):
        _feed(FrameReader(fresh), frames[0])  # the same frame again: a new reader, but see below
    replayed = FrameReader(session_macs(key, nonce_c, nonce_s, server=True)[1])
    _feed(replayed, frames[0])
    with pytest.raises(AuthenticationError):
        _feed(replayed, frames[0])  # the same frame twice in one connection: its sequence number is used up


def _feed(reader: Any, data: bytes) -> list[Frame]:
    buf = reader.buffer()
    out: list[Frame] = []
    view = memoryview(data)
    while view:
        buf = reader.buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        out.extend(reader.feed(n))
    return out


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_nothing_is_parsed_before_the_key_is_proved(scheme: str, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A deeply nested JSON HELLO and a frame announcing a gigabyte, from a peer without the key: refused at
    the door, the server and a legitimate client carry on."""
    server: Any = (TcpServer if scheme == "tcp" else ZmqServer)("127.0.0.1", 0, key=KEY, **FAST)
    server.start()
    workers = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": KEY.hex()}, worker_args=FAST_HEARTBEAT,
                         name="door-worker")
    workers.start()
    nested = b'{"role": "client", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    attacks = [
        encode_bytes(Frame(Kind.HELLO, parts=[nested])),  # unsigned
        encode_bytes(Frame(Kind.HELLO, parts=[nested]), b"a guessed key"),  # signed with the wrong key
        HEADER.pack(b"RE", VERSION, Kind.OPEN, 1, 0x8000, 0, 0) + (1 << 30).to_bytes(8, "big") + bytes(32),
    ]
    try:
        with RemoteExecutor(transport=server.url, key=KEY, **FAST) as legit:
            for attack in attacks:
                _send_raw(scheme, server.port, attack)
                assert legit.submit(pow, 3, 4).result(timeout=60) == 81
            assert len(server.scheduler.status()["clients"]) == 1
    finally:
        workers.stop()
        server.stop()


def _send_raw(scheme: str, port: int, data: bytes) -> None:
    if scheme == "tcp":
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(data)
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        return
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        prefix_size = HEADER.size + 8 * int.from_bytes(data[4:6], "big") + (32 if data[6:8] != b"\0\0" else 0)
        sock.send_multipart([data[:prefix_size], data[prefix_size:]] if len(data) > prefix_size else [data])
        if sock.poll(500):  # the one answer a peer that cannot open a session may get: "wrong key", unsigned
            answer = decode_whole(b"".join(sock.recv_multipart()))
            assert (answer.kind, answer.a) == (Kind.REJECT, RejectCode.AUTHENTICATION)
            assert bytes(answer.parts[0]).decode() == KEY_REJECTED
    finally:
        sock.close(linger=0)
        ctx.term()


def test_the_embedded_cluster_is_keyed(tmp_path: Path) -> None:
    """RemoteExecutor() with no key: another local user who finds its port cannot open a session."""
    with RemoteExecutor(max_workers=1) as ex:
        url = ex.transport.cluster.url  # type: ignore[attr-defined]
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(encode_bytes(Frame(Kind.OPEN, parts=[os.urandom(32)])))  # no key: refused
            sock.settimeout(10)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
        refusal = decode_whole(answer)  # no CHALLENGE: only the unsigned "wrong key" REJECT
        assert (refusal.kind, refusal.a) == (Kind.REJECT, RejectCode.AUTHENTICATION)
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
