"""``shutdown``, the context manager, ``max_workers`` validation and interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import Executor
from pathlib import Path

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from .gate import Gate

__all__ = ["ShutdownTests"]

_AFTER_SHUTDOWN = r"^cannot schedule new futures after shutdown$"


def _in_thread(target: object) -> threading.Thread:
    assert callable(target)
    thread = threading.Thread(target=target, name="conformance-shutdown")
    thread.start()
    return thread


class ShutdownTests(ConformanceBase):
    def test_shutdown_wait_waits_for_running_work(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "done")
        gate.wait_started(1)
        shutting_down = _in_thread(lambda: executor.shutdown(wait=True))
        shutting_down.join(timeout=0.5)
        assert shutting_down.is_alive(), "shutdown(wait=True) returned while a call was still running"
        assert not held.done()
        gate.release()
        shutting_down.join(timeout=TIMEOUT)
        assert not shutting_down.is_alive()
        assert held.done()
        assert held.result() == "done"

    def test_shutdown_without_wait_returns_and_work_completes(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "done")
        queued = [executor.submit(tasks.square, i) for i in range(4)]
        gate.wait_started(1)
        shutting_down = _in_thread(lambda: executor.shutdown(wait=False))
        shutting_down.join(timeout=TIMEOUT)
        assert not shutting_down.is_alive(), "shutdown(wait=False) blocked on running work"
        assert not held.done()
        gate.release()
        assert held.result(timeout=TIMEOUT) == "done"
        assert [f.result(timeout=TIMEOUT) for f in queued] == [0, 1, 4, 9]

    def test_shutdown_cancel_futures_cancels_pending(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor(max_workers=2)
        held = [executor.submit(tasks.wait_at_gate, gate.address, f"held-{i}", i) for i in range(2)]
        gate.wait_started(2)
        ahead = self.fill_prefetch(executor, 2)
        pending = [executor.submit(tasks.wait_at_gate, gate.address, f"pending-{i}", i) for i in range(3)]
        executor.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in pending)
        assert not any(f.cancelled() for f in held + ahead)
        gate.release()
        assert [f.result(timeout=TIMEOUT) for f in held] == [0, 1]
        assert [f.result(timeout=TIMEOUT) for f in ahead] == [i * i for i in range(len(ahead))]
        executor.shutdown(wait=True)
        assert sorted(gate.started) == ["held-0", "held-1"]

    def test_shutdown_is_idempotent(self, executor: Executor) -> None:
        future = executor.submit(tasks.square, 3)
        executor.shutdown(wait=False)
        executor.shutdown(wait=True)
        executor.shutdown(wait=True, cancel_futures=True)
        executor.shutdown()
        assert future.result(timeout=TIMEOUT) == 9

    def test_submit_after_shutdown_raises(self, executor: Executor) -> None:
        executor.shutdown(wait=True)
        with pytest.raises(RuntimeError, match=_AFTER_SHUTDOWN):
            executor.submit(tasks.square, 2)
        with pytest.raises(RuntimeError, match=_AFTER_SHUTDOWN):
            executor.map(tasks.square, [1, 2])

    def test_submit_after_shutdown_without_wait_raises(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        gate.wait_started(1)
        executor.shutdown(wait=False)
        with pytest.raises(RuntimeError, match=_AFTER_SHUTDOWN):
            executor.submit(tasks.square, 2)
        gate.release()
        assert held.result(timeout=TIMEOUT) is None

    def test_context_manager_returns_the_executor_and_waits(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor()
        gate.release()
        with executor as entered:
            assert entered is executor
            fs = [executor.submit(tasks.wait_at_gate, gate.address, f"t{i}", i) for i in range(4)]
        assert all(f.done() for f in fs)
        assert [f.result() for f in fs] == [0, 1, 2, 3]
        with pytest.raises(RuntimeError, match=_AFTER_SHUTDOWN):
            executor.submit(tasks.square, 2)

    def test_context_manager_exit_on_error_still_waits(self, new_executor: ExecutorFactory) -> None:
        executor = new_executor()
        future = None
        try:
            with executor:
                future = executor.submit(tasks.square, 6)
                raise KeyError("inside the block")
        except KeyError:
            pass
        assert future is not None
        assert future.done()
        assert future.result() == 36

    @pytest.mark.parametrize("max_workers", [0, -1])
    def test_max_workers_must_be_positive(self, make_executor: ExecutorFactory, max_workers: int) -> None:
        with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
            make_executor(max_workers=max_workers).shutdown()

    def test_interpreter_exit_finishes_outstanding_work(self, gate: Gate, tmp_path: Path) -> None:
        assert self.executor_source, "set executor_source: an expression building the candidate"
        outputs = [tmp_path / f"out-{i}.txt" for i in range(4)]
        late = tmp_path / "late-submit.txt"
        script = _EXIT_SCRIPT.format(
            setup=self.executor_setup,
            source=self.executor_source,
            address=gate.address,
            outputs=[str(p) for p in outputs],
            late=str(late),
        )
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            gate.wait_started(2, timeout=TIMEOUT)  # two calls held, two pending, the script about to end
            gate.release()
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, stderr
        assert "submitted" in stdout
        assert [p.read_text() if p.exists() else None for p in outputs] == [f"out-{i}" for i in range(4)]
        assert late.read_text().startswith("RuntimeError: cannot schedule new futures after")


# Exits without shutdown while two calls are held at the gate and two wait behind them. The atexit hook runs
# after the executor's own exit handling, when a new submit must fail with the stdlib's RuntimeError.
_EXIT_SCRIPT = """
import atexit
{setup}
from remote_executor.conformance import tasks

executor = {source}
outputs = {outputs!r}
futures = [
    executor.submit(tasks.gated_write_file, {address!r}, f"exit-{{i}}", path, f"out-{{i}}")
    for i, path in enumerate(outputs)
]

def submit_late():
    try:
        executor.submit(tasks.square, 2)
    except Exception as exc:
        outcome = f"{{type(exc).__name__}}: {{exc}}"
    else:
        outcome = "accepted"
    with open({late!r}, "w") as file:
        file.write(outcome)

atexit.register(submit_late)
print("submitted", flush=True)
"""
