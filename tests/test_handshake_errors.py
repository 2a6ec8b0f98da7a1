"""What the client's handshake says when the job server's side of the connection takes nothing at all."""

from __future__ import annotations

import threading

import pytest

from remote_executor.errors import ConnectionFailedError, HandshakeClosedError
from remote_executor.jobserver.client import Channel, Waker, handshake
from remote_executor.wire.frames import Frame
from remote_executor.wire.messages import hello
from remote_executor.wire.session import Mac


class TakesNothing(Channel):
    """A connection whose peer never takes a byte: a zmq peer whose CURVE handshake never completes (the
    wrong server key, or none), or a listener that accepted and reads nothing."""

    def __init__(self) -> None:
        super().__init__("zmq://127.0.0.1:1")
        self.woken = threading.Event()

    def queue(self, frame: Frame) -> None:
        pass

    def flush(self) -> bool:
        return False

    def receive(self) -> list[Frame]:
        return []

    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        self.woken.wait(timeout)

    def close(self) -> None:
        pass

    def authenticate(self, send: Mac | None, receive: Mac | None, *, proven: bool = False) -> None:
        pass


def test_a_peer_that_takes_nothing_is_silence_with_the_hint_to_check_the_keys() -> None:
    """It said "closed the connection during the handshake without saying why", as for a peer that hung
    up, depending on whether the machine was fast enough for the OPEN to be queued before the deadline."""
    with pytest.raises(ConnectionFailedError) as caught:
        handshake(TakesNothing(), b"k" * 32, hello("client", {"name": "t", "executor_id": 1}), 0.2)
    assert not isinstance(caught.value, HandshakeClosedError)
    assert str(caught.value).startswith("no answer from the job server zmq://127.0.0.1:1 within 0.2s")
    assert "CURVE server key" in str(caught.value)
