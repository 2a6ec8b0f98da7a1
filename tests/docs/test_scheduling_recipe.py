"""docs/scheduling.md's per-worker resource recipe, run as written: the module block becomes ``mydb.py`` next
to a script made of the usage block, which runs in a fresh interpreter against a real SQLite file."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "scheduling.md"
SRC = Path(__file__).resolve().parents[2] / "src"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_per_worker_connection_recipe_runs_as_documented(tmp_path: Path) -> None:
    module, usage = python_blocks(DOC.read_text())
    assert module.startswith("# mydb.py")
    (tmp_path / "mydb.py").write_text(module)
    # Each worker process records its connection's open and close, so the test sees "once per process".
    (tmp_path / "mydb.py").write_text(module + '''
import os as _os
_original_open = open_connection
def open_connection(path: str) -> None:
    _original_open(path)
    with open(path + ".log", "a") as log:
        log.write(f"open {_os.getpid()}\\n")
    atexit.register(lambda: open(path + ".log", "a").write(f"close {_os.getpid()}\\n"))
''')
    (tmp_path / "main.py").write_text(usage.replace("max_workers=4", "max_workers=2")
                                      .replace('["users", "orders"]', '["users", "orders"] * 10'))
    # closing(): a connection's own `with` only commits, and Python 3.13 warns about one left open.
    with contextlib.closing(sqlite3.connect(tmp_path / "data.db")) as db, db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("CREATE TABLE orders (item TEXT)")
        db.executemany("INSERT INTO users VALUES (?)", [("ann",), ("bob",), ("cy",)])
        db.executemany("INSERT INTO orders VALUES (?)", [("tea",)] * 5)
    done = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str([3, 5] * 10)
    events = (tmp_path / "data.db.log").read_text().split("\n")
    opened = {line.split()[1] for line in events if line.startswith("open")}
    closed = {line.split()[1] for line in events if line.startswith("close")}
    assert 1 <= len(opened) <= 2 and len([e for e in events if e.startswith("open")]) == len(opened)
    assert closed == opened  # every worker process closed its connection when it exited
