"""docs/broadcast.md's first example, run as written in a fresh interpreter (an embedded cluster of two worker
processes): it must print each worker's logging level, set by a broadcast."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "broadcast.md"
SRC = Path(__file__).resolve().parents[2] / "src"


def test_the_broadcast_example_runs_as_documented(tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    levels = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert len(levels) == 2 and set(levels.values()) == {10}
    assert all("#" in name for name in levels)
