"""Smoke test of benchmarks/bench.py: the quick run finishes and writes a table of numbers (no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?$")


def _row_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_a_table_of_numbers(tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--transports", "tcp,tcp-server", "--output", str(output)],
        capture_output=True, text=True, timeout=240, cwd=BENCH.parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = output.read_text(encoding="utf-8")
    assert table.strip() in proc.stdout  # the same table is printed

    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = _row_cells(lines[0])
    executors = [name for name in header[2:] if name != "loky"]  # loky's column: only where it is installed
    assert header[:2] == ["metric", "unit"]
    assert executors[:3] == ["PPE", "tcp", "tcp-server"]
    assert "tcp x PPE" in header
    ppe, tcp, ratio = header.index("PPE"), header.index("tcp"), header.index("tcp x PPE")
    server, server_ratio = header.index("tcp-server"), header.index("tcp-server x PPE")

    rows = {_row_cells(line)[0]: _row_cells(line) for line in lines[2:]}
    assert len(rows) == 16
    for label, cells in rows.items():
        assert NUMBER.match(cells[ppe]), (label, cells[ppe])
        if "prefetch=1" in label and cells[tcp] == "n/a (no prefetch= keyword)":  # a version without it
            assert cells[server] == cells[tcp], (label, cells[server])
            continue
        assert NUMBER.match(cells[tcp]), (label, cells[tcp])
        assert re.fullmatch(r"\d+\.\d\dx", cells[ratio]), (label, cells[ratio])
        if label.startswith("start-up to first result, cold"):  # not measured for a standalone server
            assert cells[server] == cells[server_ratio] == "—", (label, cells[server])
        else:
            assert NUMBER.match(cells[server]), (label, cells[server])
            assert re.fullmatch(r"\d+\.\d\dx", cells[server_ratio]), (label, cells[server_ratio])
    for start in ("100 MB round trip", "submit-all, a function defined in `__main__`", "import time, what a user",
                  "import time of the executor class",
                  "submit-all with prefetch=1", "sequential round trip p50 with prefetch=1"):
        assert any(label.startswith(start) for label in rows), start
    assert "tcp-server ≥1x: **" in table  # the targets column marks the standalone targets
    assert "> 1 means better than ProcessPoolExecutor" in table
    assert "nproc=" in table
    assert "Command:" in table
