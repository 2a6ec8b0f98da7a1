"""Smoke test of benchmarks/gearman_crypto_cost.py: a tiny run finishes and prints a table of numbers (no timing
assertions: the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gearman_crypto_cost.py"
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?x?$")

pytestmark = [pytest.mark.gearman, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_the_cost_table_is_printed_with_numbers() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "2", "--calls", "30", "--mb", "2"],
                          capture_output=True, text=True, timeout=240, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("|")]
    assert rows[0][2:] == ["key (encrypted)", "no key (plaintext)", "key vs no key"]
    body = {row[0] + " " + row[1]: row[2:] for row in rows[2:]}
    for label in ("sequential round trip p50 µs", "sequential round trip p99 µs", "2 MB round trip MB/s",
                  "2 MB round trip s"):
        assert all(NUMBER.match(cell) for cell in body[label]), (label, body[label])
    assert NUMBER.match(body["seal + open one small job, in process µs"][0])
    assert "round 2/2 key (encrypted)" in proc.stderr
