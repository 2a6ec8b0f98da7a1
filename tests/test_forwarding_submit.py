"""How the executor reaches a transport that forwards its calls: straight to the inner transport's submit
once started (one layer less per call), unless the forwarding transport does something in submit itself."""

from __future__ import annotations

from collections.abc import Sequence

from remote_executor import RemoteExecutor
from remote_executor.transports.base import Call, ForwardingTransport, Listener, Session
from remote_executor.transports.memory import MemoryTransport


class Forwarding(ForwardingTransport):
    url = "forwarding"

    def start(self, session: Session, listener: Listener) -> None:
        self._client = MemoryTransport(2)
        self._client.start(session, listener)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class CountingForwarding(Forwarding):
    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, calls: Sequence[Call]) -> None:
        self.submitted += len(calls)
        super().submit(calls)


def test_a_plain_forwarding_transport_hands_the_executor_its_inner_submit() -> None:
    transport = Forwarding()
    with RemoteExecutor(transport=transport) as executor:
        assert executor.submit(pow, 2, 5).result(timeout=30) == 32
        inner = transport.submitter()
        assert isinstance(inner.__self__, MemoryTransport)  # type: ignore[attr-defined]


def test_a_forwarding_transport_that_overrides_submit_still_sees_every_call() -> None:
    transport = CountingForwarding()
    with RemoteExecutor(transport=transport) as executor:
        assert [f.result(timeout=30) for f in [executor.submit(pow, 2, i) for i in range(20)]] == [
            2**i for i in range(20)]
    assert transport.submitted == 20
