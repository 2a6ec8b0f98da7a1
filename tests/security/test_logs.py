"""Log lines that peers cannot forge or flood: peer text is escaped and bounded, repeated warnings about
the same kind of bad input are rate-limited.

The helpers are tested on their own, then at the places that log peer text: our job servers (tcp, zmq) with
real sockets, a real worker process with a hostile name, and the gearman worker and client with a real
gearmand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq

from remote_executor import RemoteExecutor
from remote_executor.errors import VersionMismatchError, WorkerLostError
from remote_executor.jobserver.client import handshake
from remote_executor.logsafe import LogLimiter, owner, printable
from remote_executor.security import resolve_key
from remote_executor.transports import get_backend
from remote_executor.transports.base import WorkerCore, WorkerSettings
from remote_executor.transports.gearman.connection import ClientCallbacks, GearmanClientConnection
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.worker import GearmanWorker
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer
from remote_executor.wire.frames import DEFAULT_LIMITS, Frame, Kind, encode, encode_bytes
from remote_executor.wire.messages import hello
from remote_executor.wire.session import new_nonce

from ..conftest import FAST_HEARTBEAT, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
FORGED = "CRITICAL remote_executor forged: the job server was compromised"
HOSTILE_NAME = f"evil\n{FORGED}\r\x1b[2J\u2028{FORGED}"
FLOOD = 300


# --- the helpers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["line\nbreak", "carriage\rreturn", "escape\x1b[31mred", "nul\x00", "unicode\u2028line separator",
     "paragraph\u2029separator", "next\x85line", "bidi\u202eoverride", b"bytes\n\xff\xfe", "tab\there"],
)
def test_printable_leaves_no_line_break_or_control_character(text: str | bytes) -> None:
    shown = printable(text)
    assert shown.isprintable() and "\n" not in shown and "\r" not in shown
    assert shown.startswith(text[:3] if isinstance(text, str) else text[:3].decode())


def test_printable_escapes_readably_and_bounds_the_length() -> None:
    assert printable("a\nb\tc\x00d") == "a\\nb\\tc\\x00d"
    assert printable(b"\xff") == "\\xff"
    assert printable("plain name#3") == "plain name#3"
    long = printable("x" * 100_000)
    assert len(long) < 250 and long.endswith("(99800 more characters)")
    assert printable(ValueError("bad\nthing")) == "bad\\nthing"


class Lines(logging.Handler):
    """Every formatted line a logger writes, as a real log file would hold them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(self.format(record).split("\n"))

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@contextlib.contextmanager
def captured(name: str = "remote_executor", level: int = logging.INFO) -> Iterator[Lines]:
    logger, lines = logging.getLogger(name), Lines()
    previous = logger.level
    logger.setLevel(level)
    logger.addHandler(lines)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(previous)


def test_the_limiter_allows_a_burst_per_key_then_says_how_many_it_suppressed() -> None:
    limiter = LogLimiter(burst=3, period=60.0)
    logger = logging.getLogger("remote_executor.test_limiter")
    with captured(logger.name) as lines:
        logged = [limiter.log(logger, logging.WARNING, "bad", "bad frame %d", i, now=i / 10) for i in range(100)]
        assert limiter.log(logger, logging.WARNING, "other", "another kind", now=50.0)  # keys are independent
        assert lines.lines == ["WARNING remote_executor.test_limiter: bad frame 0",
                               "WARNING remote_executor.test_limiter: bad frame 1",
                               "WARNING remote_executor.test_limiter: bad frame 2 (more like this suppressed for 60s)",
                               "WARNING remote_executor.test_limiter: another kind"]
        assert logged == [True] * 3 + [False] * 97
        assert limiter.log(logger, logging.WARNING, "bad", "bad frame %d", 100, now=100.0)  # a new period
    assert lines.lines[-2:] == ["WARNING remote_executor.test_limiter: suppressed 97 more like: bad frame %d",
                                "WARNING remote_executor.test_limiter: bad frame 100"]


def test_the_limiter_remembers_a_bounded_number_of_keys() -> None:
    limiter = LogLimiter(burst=1, period=60.0, max_keys=10)
    logger = logging.getLogger("remote_executor.test_limiter")
    with captured(logger.name, logging.CRITICAL):  # nothing is written; the keys are what is measured
        for i in range(10_000):
            limiter.log(logger, logging.CRITICAL, ("peer", i), "hello", now=0.0)
    assert len(limiter._windows) == 10


def test_an_owner_number_is_never_reused_as_id_is() -> None:
    class Server:
        pass

    seen = set()
    for _ in range(100):
        server = Server()
        seen.add((id(server), owner(server)))
        assert owner(server) == owner(server)
        del server
    assert len({number for _, number in seen}) == 100 > len({ident for ident, _ in seen})


# --- names from HELLO cannot forge a line -------------------------------------------------------------------------


@contextlib.contextmanager
def job_server(scheme: str) -> Iterator[Any]:
    server = (TcpServer if scheme == "tcp" else ZmqServer)("127.0.0.1", 0, **FAST)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_not_forged(lines: Lines) -> None:
    assert lines.lines, "nothing was logged"
    assert not [line for line in lines.lines if line.startswith("CRITICAL")], lines.lines
    assert all(line.isprintable() for line in lines.lines), [line for line in lines.lines if not line.isprintable()]


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_a_worker_name_with_a_newline_does_not_forge_a_log_line(scheme: str) -> None:
    with captured() as lines, job_server(scheme) as server:
        worker = subprocess.Popen([sys.executable, "-m", "remote_executor.worker", server.url, "--name", HOSTILE_NAME,
                                   *FAST_HEARTBEAT], stderr=subprocess.DEVNULL)
        try:
            with RemoteExecutor(transport=server.url, **FAST) as ex:  # the worker is past its handshake
                assert ex.submit(pow, 2, 2).result(timeout=60) == 4
            worker.send_signal(signal.SIGTERM)  # drains: "is draining" names it too
            assert worker.wait(timeout=30) == 0
        finally:
            worker.kill()
            worker.wait()
        wait_for(lambda: bool(lines.matching("draining")), what="the drain to be logged")
    assert_not_forged(lines)
    assert lines.matching("attached")[0].startswith("INFO remote_executor.jobserver.server: worker evil\\nCRITICAL")


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_a_rejected_peer_name_does_not_forge_a_log_line(scheme: str) -> None:
    info = {"name": HOSTILE_NAME, "executor_id": 1}
    bad_version = hello("client", info)
    bad_version.parts[0] = bytes(bad_version.parts[0]).replace(b'"python": "3.', b'"python": "2.')
    with captured() as lines, job_server(scheme) as server:
        send_bad_version_hello(server, bad_version)
        wait_for(lambda: bool(lines.matching("rejecting")), what="the rejection")
    assert_not_forged(lines)
    assert "rejecting evil\\nCRITICAL" in lines.matching("rejecting")[0]


def send_bad_version_hello(server: Any, frame: Frame, *, count: int = 1) -> None:
    """``count`` sessions, each opened with the server's key (OPEN/CHALLENGE, as a real peer does) and then
    sending ``frame``, a HELLO with a Python version the server refuses; returns once the server has
    answered each with its REJECT. Over tcp each session is a connection, over zmq a fresh DEALER (peer)."""
    key = resolve_key()
    connect = get_backend(server.scheme).connector(server.url, key, {}, DEFAULT_LIMITS)
    for _ in range(count):
        channel = connect(30.0)
        try:
            with pytest.raises(VersionMismatchError):
                handshake(channel, key, frame, 30.0)
        finally:
            channel.close()


# --- floods are bounded ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_a_flood_of_bad_frames_produces_a_bounded_number_of_log_lines(scheme: str) -> None:
    with captured() as lines, job_server(scheme) as server:
        if scheme == "tcp":
            for _ in range(FLOOD):
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as peer:
                    peer.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
                    while peer.recv(65536):  # closed by the server once it has logged the bad frame
                        pass
        else:
            context = zmq.Context()
            peer = context.socket(zmq.DEALER)
            try:
                peer.connect(server.url.replace("zmq://", "tcp://"))
                for _ in range(FLOOD):
                    peer.send_multipart([b"garbage", b"more garbage"])
                # A session opened after the flood: the server answers it (CHALLENGE) once it has read the garbage.
                peer.send_multipart([bytes(b) for b in encode(Frame(Kind.OPEN, parts=[new_nonce()]), resolve_key())])
                assert peer.poll(30_000), "no CHALLENGE for the probe: the server did not read up to it"
            finally:
                peer.close(linger=0)
                context.term()
        with RemoteExecutor(transport=server.url, max_workers=1, **FAST) as ex:  # the server still serves
            assert ex.transport is not None
    bad = lines.matching("bad frame magic" if scheme == "tcp" else "dropping zmq peer")
    assert 1 <= len(bad) <= 5, bad
    assert "more like this suppressed" in bad[-1]


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_a_flood_of_rejected_hellos_produces_a_bounded_number_of_log_lines(scheme: str) -> None:
    bad_version = hello("client", {"name": "flood", "executor_id": 1})
    bad_version.parts[0] = bytes(bad_version.parts[0]).replace(b'"python": "3.', b'"python": "2.')
    with captured() as lines, job_server(scheme) as server:
        # Each from a fresh session; zmq peers (a socket and context each) are slower to make: fewer of them.
        send_bad_version_hello(server, bad_version, count=FLOOD if scheme == "tcp" else FLOOD // 10)
    rejected = lines.matching("rejecting")
    assert 1 <= len(rejected) <= 5, rejected


def test_zmq_peers_that_open_a_session_then_vanish_produce_a_bounded_number_of_log_lines() -> None:
    """Each peer sends an OPEN and closes its connection at once, as a replay of a recorded OPEN from fresh
    connections does: the server finds each gone when it answers, and says so within the limiter's burst, not
    once per peer."""
    peers = 60
    opening = [bytes(b) for b in encode(Frame(Kind.OPEN, parts=[new_nonce()]), resolve_key())]
    with captured() as lines, job_server("zmq") as server:
        context = zmq.Context()
        try:
            for _ in range(peers):
                peer = context.socket(zmq.DEALER)
                try:
                    peer.connect(server.url.replace("zmq://", "tcp://"))
                    peer.send_multipart(opening)
                finally:
                    peer.close(linger=5_000)  # the OPEN goes out, then the connection closes
        finally:
            context.term()
        # Every session ends, found gone or timed out silent; the server still serves.
        wait_for(lambda: not server._routes, timeout=60, what="the server to drop every vanished peer")
        with RemoteExecutor(transport=server.url, max_workers=1, **FAST) as ex:
            assert ex.transport is not None
    gone = lines.matching("is gone")
    assert 1 <= len(gone) <= 5, gone


class _Refusals(ClientCallbacks[int]):
    def __init__(self, expected: int) -> None:
        self.failed = 0
        self.expected = expected
        self.done = threading.Event()

    def on_fail(self, token: int) -> None:
        self.failed += 1
        if self.failed == self.expected:
            self.done.set()

    def on_complete(self, token: int, payload: bytes) -> None:
        raise AssertionError("a forged job ran")

    def on_disconnect(self, exc: Exception, in_flight: list[int]) -> None:
        self.done.set()


def test_a_flood_of_forged_gearman_jobs_produces_a_bounded_number_of_log_lines() -> None:
    with GearmandProcess() as gearmand, captured() as lines:
        settings = WorkerSettings(url=gearmand.url, key=os.urandom(32), name="keyed-worker")
        worker = threading.Thread(target=GearmanWorker(settings, WorkerCore()).run, name="test-gearman-worker")
        worker.start()
        try:
            (host, port) = gearmand.url.removeprefix("gearman://").split(":")
            refusals = _Refusals(FLOOD // 3)
            with GearmanClientConnection(host, int(port), refusals) as rogue:
                for i in range(refusals.expected):
                    rogue.submit(i, b"remote_executor.default", encode_bytes(Frame(Kind.TASK, a=i), b"forger"))
                assert refusals.done.wait(120), f"only {refusals.failed} refusals"
        finally:
            settings.drain.set()
            worker.join(30)
    refused = lines.matching("refused a job it cannot authenticate")
    assert 1 <= len(refused) <= 5, refused


# --- gearman: a worker's name from WORK_DATA ----------------------------------------------------------------------


def announce_then_sleep(path: str) -> None:
    Path(path).write_text("started")
    time.sleep(60)


def test_a_gearman_worker_name_with_a_newline_does_not_forge_a_client_log_line(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with GearmandProcess() as gearmand, captured() as lines:
        worker = subprocess.Popen([sys.executable, "-m", "remote_executor.worker", gearmand.url, "--name", HOSTILE_NAME,
                                   "--heartbeat-interval", "0.2"], stderr=subprocess.DEVNULL)
        ex = RemoteExecutor(transport=gearmand.url, max_retries=0, heartbeat_interval=0.2, heartbeat_timeout=1.0)
        try:
            future = ex.submit(announce_then_sleep, str(started))
            wait_for(started.exists, what="the call to start")
            os.kill(worker.pid, signal.SIGSTOP)  # silent, connection up: the client names the worker
            with pytest.raises(WorkerLostError):
                future.result(timeout=60)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
            worker.kill()
            worker.wait()
            ex.shutdown()  # after the worker is gone: a call still running there is settled as lost
    assert_not_forged(lines)
    silent = lines.matching("has been silent")
    assert silent[0].startswith("WARNING remote_executor.gearman: the worker evil\\nCRITICAL"), silent
