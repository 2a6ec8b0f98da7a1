"""A process forked while an executor runs (``os.fork()``, multiprocessing's "fork") gets a clear error if it
uses that executor, exits normally without waiting for it, and leaves the parent's workers alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fork_child_script.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("transport", ["tcp", "zmq", "gearman"])
def test_a_forked_child_leaves_the_parents_executor_alone(transport: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), transport], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("child: this RemoteExecutor belongs to the process that created it"), lines
    assert lines[1:] == ["parent: child exited 7", "parent: [1, 3, 9, 27]"], done.stdout
    assert "killing" not in done.stderr and "lost" not in done.stderr, done.stderr
