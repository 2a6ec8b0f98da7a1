"""``prefetch=N``: calls handed out ahead wait at the job server, RUNNING, and still go to whichever worker
frees first (the conformance suite runs on prefetch=2 with its one declared difference)."""

from __future__ import annotations

import functools

import pytest

from remote_executor import RemoteExecutor
from remote_executor.conformance import tasks
from remote_executor.conformance.gate import Gate

TIMEOUT = 30.0


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("1", TypeError)])
def test_a_bad_prefetch_is_an_error_at_construction(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="prefetch"):
        RemoteExecutor(1, transport="memory", prefetch=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", [None, "zmq", "gearman"])
def test_calls_handed_out_ahead_run_on_the_worker_that_frees_first(transport: str | None) -> None:
    # Worker A holds a long call; worker B runs quick ones. The calls queued ahead must not wait behind A's
    # call: each goes to B as soon as B is free, so all of them finish while A's call is still held.
    with Gate() as gate, RemoteExecutor(2, transport=transport, prefetch=2) as executor:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "long")
        gate.wait_started(1)
        quick = [executor.submit(tasks.square, i) for i in range(12)]
        # 2 workers x (1 + 2) places, one of them held: five quick calls were handed out at once.
        assert all(f.running() or f.done() for f in quick[:5])
        assert [f.result(timeout=TIMEOUT) for f in quick] == [i * i for i in range(12)]
        assert not held.done()
        gate.release()
        assert held.result(timeout=TIMEOUT) == "long"


def test_repr_names_prefetch() -> None:
    with RemoteExecutor(1, prefetch=3) as executor:
        assert "prefetch=3" in repr(executor)
        assert executor.submit(functools.partial(tasks.square, 5)).result(timeout=TIMEOUT) == 25
