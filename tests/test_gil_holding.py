"""The per-frame crypto of the hot path keeps the GIL, and pooled random bytes are never handed out twice.

A C call that releases the GIL for a microsecond of work (``hmac.digest``, ``os.urandom``) lets any busy
Python thread in, and taking the GIL back then costs up to the switch interval (5 ms): once per frame, on
the I/O thread of a client whose caller is submitting. These tests count, not time: a helper thread that
only runs when the main thread lets go of the GIL counts its turns while the main thread signs and verifies
small frames, and the calls to ``os.urandom`` are counted while it seals small messages.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from remote_executor.wire.entropy import BLOCK_SIZE, random_bytes
from remote_executor.wire.frames import Frame, FrameReader, Kind, encode
from remote_executor.wire.session import Mac, session_macs

KEY = b"k" * 32
ROUNDS = 300


class TurnCounter:
    """A thread that counts its turns with the GIL and gives it back at once (``time.sleep(0)``)."""

    def __init__(self) -> None:
        self.turns = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turn-counter", daemon=True)

    def _run(self) -> None:
        self._running.set()
        while not self._stop.is_set():
            self.turns += 1
            time.sleep(0)  # releases the GIL: a main thread waiting for it gets it back at once

    def __enter__(self) -> TurnCounter:
        self._thread.start()
        assert self._running.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def counter() -> Iterator[TurnCounter]:
    # A long switch interval: the main thread is never made to drop the GIL on a timer while it measures,
    # so the helper only gets a turn when a call lets go of it.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        with TurnCounter() as turns:
            yield turns
    finally:
        sys.setswitchinterval(interval)


def turns_during(counter: TurnCounter, work: Callable[[], object], rounds: int = ROUNDS) -> int:
    before = counter.turns
    for _ in range(rounds):
        work()
    return counter.turns - before


def test_the_counter_sees_a_call_that_releases_the_gil(counter: TurnCounter) -> None:
    # The method's own check: os.urandom lets go of the GIL for its system call, so the helper gets turns.
    # Only when the helper is on a processor at that instant: on a machine busy with other processes it may
    # miss many releases in a row, so this keeps calling (bounded) until it sees one.
    deadline = time.monotonic() + 60.0
    seen = 0
    while not seen and time.monotonic() < deadline:
        seen = turns_during(counter, lambda: os.urandom(12))
    assert seen > 0


def test_signing_and_verifying_a_small_frame_keep_the_gil(counter: TurnCounter) -> None:
    client_send, _ = session_macs(KEY, b"n" * 32, b"s" * 32, server=False)
    _, server_receive = session_macs(KEY, b"n" * 32, b"s" * 32, server=True)
    long_term = Mac(KEY)
    prefix, parts = b"p" * 24, [b"x" * 300, b"y" * 40]

    def sign_and_verify() -> None:
        server_receive.verify(prefix, parts, client_send.sign(prefix, parts, 340), 340)
        long_term.verify(prefix, parts, long_term.sign(prefix, parts), None)  # the piece-by-piece path

    assert turns_during(counter, sign_and_verify) == 0


def test_framing_with_a_session_mac_keeps_the_gil(counter: TurnCounter) -> None:
    client_send, _ = session_macs(KEY, b"n" * 32, b"s" * 32, server=False)
    _, server_receive = session_macs(KEY, b"n" * 32, b"s" * 32, server=True)
    reader = FrameReader(server_receive)
    frame = Frame(Kind.TASK, a=7, b=9, parts=[b"call" * 50, b"args" * 10])

    def one_frame() -> None:
        data = b"".join(bytes(buf) for buf in encode(frame, client_send))
        view = reader.buffer()
        view[: len(data)] = data
        (received,) = reader.feed(len(data))
        assert received.a == 7

    assert turns_during(counter, one_frame) == 0


def test_sealing_a_small_message_asks_the_os_for_randomness_once_per_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted, not seen by the helper thread: os.urandom's release of the GIL is too short to be caught
    # between the AES calls around it, though a thread already running Python takes it every time.
    pytest.importorskip("cryptography")
    from remote_executor.wire.aead import Sealer

    sealer = Sealer(KEY, b"test purpose")
    sealer.seal([b"warm-up"], b"ad")  # the first seal starts a session (a salt from the OS, once)
    draws = 0
    urandom = os.urandom

    def counting_urandom(n: int) -> bytes:
        nonlocal draws
        draws += 1
        return urandom(n)

    monkeypatch.setattr(os, "urandom", counting_urandom)
    messages = 10 * ROUNDS
    for _ in range(messages):
        assert sealer.open(sealer.seal([b"x" * 300], b"ad"), b"ad") == b"x" * 300
    assert draws <= messages * 12 // BLOCK_SIZE + 1


def test_pooled_random_bytes_are_never_repeated() -> None:
    seen = {random_bytes(12) for _ in range(3 * BLOCK_SIZE // 12)}
    assert len(seen) == 3 * BLOCK_SIZE // 12


def test_a_forked_child_does_not_reuse_the_parents_pool() -> None:
    random_bytes(12)  # the parent now holds the rest of a block
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write_end, random_bytes(12))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child = os.read(read_end, 12)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    mine = random_bytes(12)
    assert len(child) == 12 and child != mine
