"""The embedded executor's constructor returns once its workers are ready, or fails clearly."""

from __future__ import annotations

import time

import pytest

from remote_executor import RemoteExecutor, TransportError


@pytest.mark.parametrize("transport", [None, "zmq", "gearman"])
def test_submit_then_cancel_runs_some_calls_like_a_thread_pool(transport: str | None) -> None:
    executor = RemoteExecutor(transport=transport)
    futures = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(wait=True, cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert ran, "every call was cancelled: the workers were not ready when the constructor returned"
    assert all(f.result() is None for f in ran)
    assert len(ran) < 50  # and the rest were cancelled, as a thread pool would


def test_workers_that_cannot_start_are_a_clear_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker process that cannot import this package exits at once.
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    monkeypatch.setattr("remote_executor.supervisor._python_path", lambda: "/nonexistent")
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"worker processes did not start: 0 of 2 attached, local-worker-\d "
                                             r"exited with status 1"):
        RemoteExecutor(2)
    assert time.monotonic() - started < 10
