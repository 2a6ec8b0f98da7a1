"""A Ctrl-C that interrupts ``submit()`` never strands a call.

Python raises a signal handler's ``KeyboardInterrupt`` on the main thread at whatever point it had reached,
which may be the middle of handing a call to the transport. Whatever the point, every call runs once (or is
reported), and ``shutdown(wait=True)`` returns. Each test interrupts the hand-over at one point, as a real
Ctrl-C can, with an exception raised from a wrapped internal: a timed signal would hit it only by luck.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor, interrupts
from remote_executor.errors import BrokenRemoteExecutor
from remote_executor.transports.gearman.client import GearmanClientTransport
from remote_executor.transports.gearman.codec import _SEPARATE_PAYLOAD_SIZE


def record(path: str, text: str, padding: bytes = b"") -> str:
    with open(path, "a", encoding="utf-8") as file:
        file.write(text + "\n")
    return text


class InterruptOnce:
    """``target`` with a ``KeyboardInterrupt`` on its first call: raised before calling through, or after."""

    def __init__(self, target: Callable[..., Any], when: str) -> None:
        self.target, self.when, self.fired = target, when, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fired:
            return self.target(*args, **kwargs)
        self.fired = True
        if self.when == "after":
            self.target(*args, **kwargs)
        raise KeyboardInterrupt


def shut_down(executor: RemoteExecutor) -> None:
    """``shutdown(wait=True)``, failing the test (and stopping the cluster) if it does not return."""
    thread = threading.Thread(target=executor.shutdown, daemon=True)
    thread.start()
    thread.join(20)  # (well within the per-test timeout; it takes well under a second)
    if thread.is_alive():
        executor._core.on_broken(BrokenRemoteExecutor("the test gave up waiting"))  # fails the calls: closes
        thread.join(20)
        pytest.fail("shutdown(wait=True) did not return: a call is stranded")


def runs(path: Path) -> list[str]:
    return sorted(path.read_text(encoding="utf-8").split())


def interrupted(executor: RemoteExecutor, path: Path, arm: Callable[[], object], action: Callable[[], object]
                ) -> list[str]:
    """After a first call: ``arm()`` the interruption, check that ``action()`` raises ``KeyboardInterrupt``
    and that a next call runs, then shut down; the runs recorded in ``path`` (sorted)."""
    try:
        assert executor.submit(record, str(path), "first").result(timeout=60) == "first"
        arm()
        with pytest.raises(KeyboardInterrupt):
            action()
        assert executor.submit(record, str(path), "next").result(timeout=60) == "next"
    finally:
        shut_down(executor)
    return runs(path)


@pytest.mark.parametrize("transport", ["memory", "tcp", "zmq", "gearman"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_submit_interrupted_at_the_hand_over_runs_its_call_once(transport: str, when: str,
                                                                   tmp_path: Path) -> None:
    """Interrupted just before the transport took the call (it never reached it), or just after (it did):
    either way it runs, and only once."""
    path = tmp_path / "runs"
    executor = RemoteExecutor(max_workers=1, transport=transport)
    core = executor._core
    assert interrupted(executor, path, lambda: setattr(core, "submit_calls", InterruptOnce(core.submit_calls, when)),
                       lambda: executor.submit(record, str(path), "interrupted")) == ["first", "interrupted", "next"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_broadcast_interrupted_at_the_hand_over_runs_once_on_each_worker(when: str, tmp_path: Path) -> None:
    path = tmp_path / "runs"
    executor = RemoteExecutor(max_workers=2, transport="tcp")
    transport = executor._core.transport
    assert interrupted(executor, path, lambda: setattr(transport, "submit", InterruptOnce(transport.submit, when)),
                       lambda: executor.broadcast(record, str(path), "everywhere")
                       ) == ["everywhere", "everywhere", "first", "next"]


def gearman_client(executor: RemoteExecutor) -> GearmanClientTransport:
    client = executor._core.transport._client  # type: ignore[attr-defined]
    assert isinstance(client, GearmanClientTransport)
    return client


def test_a_gearman_call_recorded_but_not_yet_written_is_written_once(tmp_path: Path) -> None:
    """Interrupted inside the gearman client, after it recorded the job and before it wrote its SUBMIT."""
    path = tmp_path / "runs"
    executor = RemoteExecutor(max_workers=1, transport="gearman")

    def arm() -> None:
        client = gearman_client(executor)
        client._send = InterruptOnce(client._send, "before")  # type: ignore[method-assign]

    assert interrupted(executor, path, arm, lambda: executor.submit(record, str(path), "interrupted")
                       ) == ["first", "interrupted", "next"]


class HalfWrites:
    """A socket whose next packet is cut after its first part by a ``KeyboardInterrupt``."""

    def __init__(self, sock: Any) -> None:  # (a socket, or a TLS one)
        self._sock, self.armed = sock, True

    def sendall(self, data: Any) -> None:
        self._sock.sendall(data)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_gearman_packet_cut_in_half_ends_its_connection_and_the_call_still_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Interrupted between the writes of one SUBMIT packet: gearmand has half a packet, which it would take
    the next bytes to complete. The connection is ended instead, and the call resubmitted on a new one; the
    log says the client ended it, not gearmand."""
    caplog.set_level(logging.WARNING, logger="remote_executor")
    path = tmp_path / "runs"
    executor = RemoteExecutor(max_workers=1, transport="gearman", max_retries=1)

    def arm() -> None:
        conn = gearman_client(executor)._servers[0].conn
        assert conn is not None
        conn._sock = HalfWrites(conn._sock)  # type: ignore[assignment]

    # (a payload this big is written apart from its header)
    assert interrupted(executor, path, arm,
                       lambda: executor.submit(record, str(path), "interrupted", bytes(_SEPARATE_PAYLOAD_SIZE))
                       ) == ["first", "interrupted", "next"]
    lost = [r.getMessage() for r in caplog.records if "lost gearmand" in r.getMessage()]
    assert len(lost) == 1 and "ended by this client: a packet's write was interrupted by KeyboardInterrupt" in lost[0]
    assert "closed the connection" not in lost[0]


class SignalOnce:
    """``target``, with a real SIGINT raised on the main thread as it is first called there."""

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target, self.fired = target, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fired and threading.current_thread() is threading.main_thread():
            self.fired = True
            signal.raise_signal(signal.SIGINT)  # the handler runs at the next function call, inside target
        return self.target(*args, **kwargs)


@pytest.mark.parametrize("where", ["_apply", "_transmit"])
def test_ctrl_c_while_the_caller_drives_the_embedded_server_comes_once_the_call_is_sent(where: str,
                                                                                       tmp_path: Path) -> None:
    """The submitting thread runs the embedded tcp server's scheduler and writes the call to its worker
    itself. A Ctrl-C in there is held off until that is done: raised in between, it left the call taken
    from its queue and never sent."""
    path = tmp_path / "runs"
    executor = RemoteExecutor(max_workers=1, transport="tcp")
    wrapped: list[SignalOnce] = []

    def arm() -> None:
        server = executor._core.transport.cluster.server.server  # type: ignore[attr-defined]
        wrapped.append(SignalOnce(getattr(server, where)))
        setattr(server, where, wrapped[0])

    assert interrupted(executor, path, arm, lambda: executor.submit(record, str(path), "interrupted")
                       ) == ["first", "interrupted", "next"]
    assert wrapped[0].fired
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_hold_notes_ctrl_c_and_delivers_it_after() -> None:
    held = interrupts.hold()
    assert held is not None
    try:
        signal.raise_signal(signal.SIGINT)
        noted = True  # (a KeyboardInterrupt here would skip this)
    finally:
        held.restore()
    assert noted and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        held.deliver()
    held.deliver()  # once only


def test_hold_does_nothing_off_the_main_thread_or_without_a_python_handler() -> None:
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(interrupts.hold()))
    thread.start()
    thread.join(10)
    assert found == [None]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert interrupts.hold() is None
    finally:
        signal.signal(signal.SIGINT, previous)
