"""``remote-executor gearmand`` ends when its gearmand does, so a service manager sees it and restarts it:
status 0 after `remote-executor stop`, 1 (with gearmand's log) after a crash or a kill. A real gearmand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("how", ["killed", "remote-executor stop"])
def test_the_gearmand_command_ends_with_its_gearmand(how: str) -> None:
    with subprocess.Popen([sys.executable, "-m", "remote_executor.cli", "gearmand", "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": SRC}) as command:
        try:
            assert command.stdout is not None and command.stderr is not None
            line = command.stdout.readline()  # gearmand serving gearman://127.0.0.1:PORT (pid N)
            assert line.startswith("gearmand serving gearman://127.0.0.1:"), line
            port = int(line.split("gearman://127.0.0.1:")[1].split()[0])
            pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
            if how == "killed":
                os.kill(pid, signal.SIGKILL)
            else:  # what an operator runs
                stopped = subprocess.run([sys.executable, "-m", "remote_executor.cli", "stop",
                                          f"gearman://127.0.0.1:{port}"], capture_output=True, text=True,
                                         timeout=60, env={**os.environ, "PYTHONPATH": SRC})
                assert stopped.returncode == 0, stopped.stderr
            code = command.wait(timeout=60)
            err = command.stderr.read()
        finally:
            if command.poll() is None:
                command.kill()
    if how == "killed":
        assert code == 1, err
        assert "gearmand exited with status -9" in err
    else:
        assert code == 0, err
