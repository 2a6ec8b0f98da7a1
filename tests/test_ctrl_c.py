"""Ctrl-C while ``with RemoteExecutor() as ex:`` waits for a long call: the first interrupts the wait for the
result, the second the wait of ``shutdown`` in ``__exit__``; then the program ends, its workers with it,
without a third Ctrl-C for the exit hook's wait (it waited for the same calls again), and the calls
abandoned then fail (a thread waiting for one would hold up the exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import pid_alive, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


def test_two_ctrl_c_leave_a_with_block_and_the_program(tmp_path: Path) -> None:
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys, threading, time
        from remote_executor import RemoteExecutor

        with RemoteExecutor(1) as ex:
            worker = ex.submit(os.getpid).result(timeout=60)
            running = ex.submit(time.sleep, 600)
            while not running.running():
                time.sleep(0.01)

            def waiter() -> None:  # a non-daemon thread the exit waits for: its future must resolve
                try:
                    running.result()
                except Exception as exc:
                    print("the waiter got", type(exc).__name__, flush=True)

            threading.Thread(target=waiter).start()
            core = ex._core

            def second() -> None:  # the second Ctrl-C, once __exit__'s shutdown(wait=True) waits
                while not core.waiters:
                    time.sleep(0.01)
                os.kill(os.getpid(), 2)

            threading.Thread(target=second, daemon=True).start()
            print(worker, flush=True)  # the test's first Ctrl-C may come now
            running.result()
        """))
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    worker = 0
    try:
        assert caller.stdout is not None
        worker = int(caller.stdout.readline())
        caller.send_signal(signal.SIGINT)
        out, err = caller.communicate(timeout=60)  # not the 600 s call
        assert caller.returncode == -signal.SIGINT, err  # an uncaught KeyboardInterrupt: ended "by" SIGINT
        assert err.count("KeyboardInterrupt") == 2 and "self.drain_and_close()" in err, err
        assert "the waiter got BrokenRemoteExecutor" in out
        wait_for(lambda: not pid_alive(worker), what="the worker to be stopped")
    finally:
        caller.kill()
        caller.communicate()  # reaps it and closes its pipes
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
