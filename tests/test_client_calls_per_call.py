"""The executor's process makes a bounded number of function calls per call (load-independent, unlike time).

benchmarks/client_calls.py counts, with ``sys.setprofile`` on every thread of a fresh interpreter, the
Python-level function calls the caller's thread, the I/O thread and the embedded job server make per tiny
call. A change that adds layers to the hot path fails here even on a machine too noisy to time it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "client_calls.py"

# Measured on Pythons 3.10 to 3.13: tcp 100, zmq 104, gearman 124-129 (they were 170, 178, 148 before the
# hot path was trimmed). The bound leaves room for timing (how many calls one wake-up handles).
BOUNDS = {"tcp": 115, "zmq": 120, "gearman": 145}


@pytest.mark.timeout(240)
def test_python_calls_per_call_in_the_executors_process_are_bounded() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--transports", ",".join(BOUNDS), "--calls", "1000"],
                          capture_output=True, text=True, timeout=220, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in
            ([c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| transport"))}
    assert set(rows) == set(BOUNDS), proc.stdout
    for transport, bound in BOUNDS.items():
        python_calls = float(rows[transport][1])
        assert 20 < python_calls <= bound, f"{transport}: {python_calls} Python calls per call (bound {bound})"
