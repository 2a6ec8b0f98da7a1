"""get_reusable_executor(): the same warm workers across calls, a new executor when max_workers changes,
released after an idle timeout and at interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import remote_executor
from remote_executor import RemoteExecutor, get_reusable_executor
from tests.conftest import pid_alive, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


def worker_pids(executor: RemoteExecutor) -> set[int]:
    supervisor = executor.transport.cluster.supervisor  # type: ignore[attr-defined]
    return set(supervisor.pids())


@pytest.fixture(autouse=True)
def no_shared_executor() -> Iterator[None]:
    yield
    from remote_executor import reusable

    current = reusable._current
    if current is not None:
        current.retire()
        current.shutdown()  # every worker process this test started is gone
    reusable._current = None


def test_the_same_warm_workers_serve_later_calls() -> None:
    first = get_reusable_executor(max_workers=2)
    pids = worker_pids(first)
    assert len(pids) == 2
    assert set(first.map(_pid, range(20))) <= pids
    second = get_reusable_executor(max_workers=2)
    assert second is first
    assert worker_pids(second) == pids
    assert {second.submit(_pid, 0).result(timeout=30) for _ in range(5)} <= pids


def test_another_max_workers_starts_a_new_executor_and_shuts_the_old_one_down() -> None:
    small = get_reusable_executor(max_workers=1)
    old_pids = worker_pids(small)
    future = small.submit(_pid, 0)
    bigger = get_reusable_executor(max_workers=2)
    assert bigger is not small
    assert future.result(timeout=30) in old_pids  # the old one's calls still finish, on its own workers
    assert not worker_pids(bigger) & old_pids
    assert repr(small).endswith(" shutdown>")
    assert repr(bigger).endswith("workers=2 max_workers=2 running>")
    assert get_reusable_executor(max_workers=2) is bigger


def test_an_executor_shut_down_by_its_user_is_replaced() -> None:
    first = get_reusable_executor(max_workers=1)
    first.shutdown()
    second = get_reusable_executor(max_workers=1)
    assert second is not first
    assert second.submit(pow, 2, 5).result(timeout=30) == 32


def test_idle_for_the_timeout_it_shuts_down_and_its_workers_exit() -> None:
    executor = get_reusable_executor(max_workers=1, timeout=0.5)
    assert executor.submit(pow, 3, 2).result(timeout=30) == 9
    pids = worker_pids(executor)
    wait_for(lambda: repr(executor).endswith(" shutdown>"), timeout=20, what="the idle executor to shut down")
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=20, what="its workers to exit")
    replacement = get_reusable_executor(max_workers=1, timeout=0.5)
    assert replacement is not executor
    assert replacement.submit(pow, 2, 2).result(timeout=30) == 4


def test_a_call_longer_than_the_timeout_keeps_it_up() -> None:
    executor = get_reusable_executor(max_workers=1, timeout=1.0)
    started = time.monotonic()
    assert executor.submit(time.sleep, 2.5).result(timeout=30) is None
    assert time.monotonic() - started >= 2.5
    assert repr(executor).endswith(" running>")  # idle time counts from the end of the call
    assert get_reusable_executor(max_workers=1, timeout=1.0) is executor


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        get_reusable_executor(timeout=0)
    assert remote_executor.get_reusable_executor is get_reusable_executor


def test_at_interpreter_exit_its_calls_finish_and_its_workers_exit(tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text(
        "from remote_executor import get_reusable_executor\n"
        "ex = get_reusable_executor(max_workers=2)\n"
        "print(*ex.transport.cluster.supervisor.pids(), flush=True)\n"
        "future = ex.submit(pow, 2, 10)\n"
        "future.add_done_callback(lambda f: print('result', f.result(), flush=True))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert second == "result 1024"
    pids = [int(pid) for pid in first.split()]
    assert len(pids) == 2
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=20, what="the workers to exit")


def _pid(_: object) -> int:
    return os.getpid()
