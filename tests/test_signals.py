"""SIGTERM and Ctrl-C stop a command or drain a worker even when they arrive at the worst moment.

Each scenario runs in a fresh interpreter (signal handlers are per process). The worst moment is the main
thread holding the lock of the event the handler sets, as it does for a few microseconds inside every
``Event.wait``: a handler that called ``Event.set`` there would wait on its own thread for ever. The scripts
take that lock themselves, then raise the signal, so the moment is certain rather than lucky.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HOLDING_THE_LOCK = """
import os, signal, threading
from remote_executor.signals import SignalEvent, set_on_signals
from remote_executor.worker import install_drain_handler
"""


def run_script(body: str) -> str:
    """Run ``body`` after :data:`HOLDING_THE_LOCK`'s imports; its standard output (it must exit 0)."""
    proc = subprocess.run([sys.executable, "-c", HOLDING_THE_LOCK + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_main_thread_holds_the_events_lock_stops(signum: str) -> None:
    out = run_script(f"""
        stop, stopped = SignalEvent(), threading.Event()
        set_on_signals(stop, then=stopped.set)
        with stop._cond:  # where Event.wait holds it
            signal.raise_signal(signal.{signum})
            print("seen in the handler:", stop.is_set(), stop.wait(0))
        print("then ran:", stopped.wait(30), "set for every thread:", threading.Event.is_set(stop))
    """)
    assert out.splitlines() == ["seen in the handler: True True", "then ran: True set for every thread: True"]


def test_a_worker_sigterm_while_it_waits_on_drain_drains_it() -> None:
    """The worker's backoff between reconnections waits on the drain event itself."""
    out = run_script("""
        from remote_executor.transports.base import WorkerSettings
        settings = WorkerSettings(url="tcp://127.0.0.1:9")
        install_drain_handler(settings.drain)
        with settings.drain._cond:
            signal.raise_signal(signal.SIGTERM)
            print("draining at once:", settings.drain.is_set())
        waiter = threading.Thread(target=settings.drain.wait)  # a thread already waiting is woken too
        waiter.start()
        waiter.join(30)
        print("waiter woken:", not waiter.is_alive())
    """)
    assert out.splitlines() == ["draining at once: True", "waiter woken: True"]


def test_a_second_signal_calls_again_and_runs_then_once() -> None:
    out = run_script("""
        stop, runs = SignalEvent(), []
        def again():
            raise KeyboardInterrupt
        set_on_signals(stop, then=lambda: runs.append(1), again=again)
        signal.raise_signal(signal.SIGTERM)
        stop.wait(30)
        try:
            signal.raise_signal(signal.SIGTERM)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        threading.Event().wait(0.2)  # (then would have run twice by now if it could)
        print("then ran", len(runs), "time(s)")
    """)
    assert out.splitlines() == ["interrupted", "then ran 1 time(s)"]


def test_a_child_forked_before_its_own_handlers_gets_the_default_action() -> None:
    """The pipe is the parent's: a child's SIGTERM must neither stop the parent nor be swallowed."""
    out = run_script("""
        stop = SignalEvent()
        set_on_signals(stop)
        pid = os.fork()
        if pid == 0:
            signal.raise_signal(signal.SIGTERM)
            os._exit(0)  # not reached: the default action ends the child
        _, status = os.waitpid(pid, 0)
        print("child killed by", signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None)
        print("parent stopped:", stop.wait(0.5))
    """)
    assert out.splitlines() == ["child killed by SIGTERM", "parent stopped: False"]
