"""System calls per call on the hot path, counted in-process by wrapping the sockets (strace is not
everywhere): a tcp worker takes a call with one ``recv`` and answers it with one ``sendmsg``, the client's
I/O thread reads only what a wait reported, a waker nobody armed costs nothing to drain, and a caller
writes its call itself instead of waking the I/O thread to do it."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import remote_executor.jobserver.client as jobserver_client
from remote_executor import RemoteExecutor
from remote_executor.jobserver.client import POLL_SLICE
from remote_executor.netio import Waker
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.tcp.stream import TcpChannel
from remote_executor.wire.frames import DEFAULT_LIMITS, Frame, FrameReader, Kind, encode_bytes

CALLS = 200


class CountingSocket:
    """A socket whose I/O methods count their calls; everything else goes to the real one."""

    IO = ("recv", "recv_into", "recvfrom", "send", "sendall", "sendmsg", "sendto")

    def __init__(self, sock: socket.socket, counts: Counter[str]) -> None:
        self._sock = sock
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._sock, name)
        if name not in self.IO:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            # A wait whose kernel timeout (one poll slice) ran out is counted apart: it is a slice of idle
            # waiting, not a cost of the call, and a loaded machine makes some waits outlast a slice.
            try:
                result = attr(*args, **kwargs)
            except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO ran out (EAGAIN); other errors are not counted
                self._counts[f"{name} (timed out)"] += 1
                raise
            self._counts[name] += 1
            return result

        return counted


class CountingSelector:
    def __init__(self, selector: Any, counts: Counter[str]) -> None:
        self._selector = selector
        self._counts = counts

    def select(self, timeout: float | None = None) -> Any:
        self._counts["select"] += 1
        return self._selector.select(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


@pytest.fixture
def pair() -> Iterator[tuple[TcpChannel, socket.socket, Counter[str]]]:
    """A TcpChannel (the worker's or client's side, its socket and selector counted) and its peer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    counts: Counter[str] = Counter()
    channel = TcpChannel(ours, None, DEFAULT_LIMITS, "test peer")
    channel._conn.sock = CountingSocket(ours, counts)  # type: ignore[assignment]
    channel._selector = CountingSelector(channel._selector, counts)  # type: ignore[assignment]
    try:
        yield channel, peer, counts
    finally:
        channel.close()
        peer.close()


def _read_frame(sock: socket.socket, reader: FrameReader) -> Frame:
    while True:
        n = sock.recv_into(reader.buffer())
        assert n, "the channel closed the connection"
        frames = reader.feed(n)
        if frames:
            assert len(frames) == 1
            return frames[0]


def test_a_worker_takes_a_call_with_one_recv_and_answers_with_one_send(
        pair: tuple[TcpChannel, socket.socket, Counter[str]]) -> None:
    """Ping-pong with a peer thread, as a job server does: each call arrives while the worker waits."""
    channel, peer, counts = pair
    failures: list[BaseException] = []

    def server() -> None:
        reader = FrameReader(None, DEFAULT_LIMITS)
        try:
            for i in range(CALLS):
                peer.sendall(encode_bytes(Frame(Kind.TASK, a=i, parts=[b"call"])))
                answer = _read_frame(peer, reader)
                assert answer.kind == Kind.RESULT and answer.a == i
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=server)
    thread.start()
    try:
        for i in range(CALLS):
            frame = channel.next_frame(POLL_SLICE * 100)  # as the worker waits: the frame arrives within it
            assert frame is not None and frame.kind == Kind.TASK and frame.a == i
            channel.send(Frame(Kind.RESULT, a=i, parts=[b"result"]), 5.0)
    finally:
        thread.join(30.0)
    assert not thread.is_alive() and not failures, failures
    counts.pop("recv_into (timed out)", None)  # the peer thread was late past a poll slice: a wait, not a cost
    assert counts == Counter(recv_into=CALLS, sendmsg=CALLS), counts  # no poll, no empty read


def test_a_worker_waiting_for_a_call_still_looks_up_every_poll_slice(
        pair: tuple[TcpChannel, socket.socket, Counter[str]]) -> None:
    """Heartbeats, drains and time limits depend on the wait ending: it does, on time, and in slices."""
    channel, _, counts = pair
    t0 = time.monotonic()
    assert channel.next_frame(4 * POLL_SLICE) is None
    elapsed = time.monotonic() - t0
    assert 4 * POLL_SLICE <= elapsed < 4 * POLL_SLICE + 1.0
    # one read per slice: four, or fewer where the kernel rounds a slice up or a loaded machine runs late
    assert 2 <= counts["recv_into"] + counts["recv_into (timed out)"] <= 4, counts
    assert counts["select"] == 0


def test_the_io_thread_reads_only_what_its_wait_reported(
        pair: tuple[TcpChannel, socket.socket, Counter[str]]) -> None:
    channel, peer, counts = pair
    waker = Waker()
    try:
        waker.wake()
        channel.wait(5.0, waker)  # woken by the waker: nothing from the peer
        waker.drain()
        assert channel.frames() == []
        assert counts["recv_into"] == 0, counts
        peer.sendall(encode_bytes(Frame(Kind.RESULT, a=7, parts=[b"r"])))
        deadline = time.monotonic() + 10.0
        got: list[Frame] = []
        while not got and time.monotonic() < deadline:
            channel.wait(1.0, waker)
            got = channel.frames()
        assert [f.a for f in got] == [7]
        assert counts["recv_into"] == 1, counts
    finally:
        waker.close()


def test_a_waker_drains_with_one_read_and_none_when_not_woken() -> None:
    counts: Counter[str] = Counter()
    waker = Waker()
    real = waker.reader
    waker.reader = CountingSocket(real, counts)  # type: ignore[assignment]
    try:
        waker.drain()
        assert counts["recv"] == 0
        for _ in range(3):  # a burst of wake-ups: one byte
            waker.wake()
        waker.drain()
        assert counts["recv"] == 1
        with pytest.raises(BlockingIOError):
            real.recv(1)  # the byte was read: nothing stays behind to wake the loop for no reason
        waker.drain()
        assert counts["recv"] == 1
    finally:
        waker.reader = real
        waker.close()


def test_a_caller_sends_its_call_itself_without_waking_the_io_thread(
        tcp_server: TcpServer, start_workers: Callable[..., Supervisor], monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a standalone tcp server: each call is written by the thread that submits it, so the
    client's I/O thread wakes for results only (one wake-up per call where there were two)."""
    wakes: Counter[str] = Counter()

    class CountingWaker(Waker):
        def wake(self) -> None:
            wakes["wake"] += 1
            super().wake()

    monkeypatch.setattr(jobserver_client, "Waker", CountingWaker)
    start_workers(2)
    with RemoteExecutor(2, tcp_server.url, heartbeat_interval=0.2, heartbeat_timeout=1.5) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        before = wakes["wake"]
        for i in range(CALLS):
            assert ex.submit(abs, -i).result(timeout=30) == i
        assert [f.result(timeout=30) for f in [ex.submit(abs, -i) for i in range(CALLS)]] == list(range(CALLS))
        woken = wakes["wake"] - before
    assert woken < CALLS // 10, woken  # the odd one: the I/O thread was writing (a heartbeat) just then
