"""A project of its own runs the conformance suite against its own executor, with --strict-markers and no
configuration: the package's pytest plugin registers the suite's markers (its docs say nothing is needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROJECT_TEST = '''
from concurrent.futures import ThreadPoolExecutor

import pytest

from remote_executor.conformance import LoadTests


class TestMyExecutor(LoadTests):
    remote = False

    @pytest.fixture
    def make_executor(self):
        def make(max_workers=2, **kwargs):
            return ThreadPoolExecutor(max_workers=max_workers, **kwargs)
        return make
'''


def test_a_user_project_runs_the_suite_with_strict_markers(tmp_path: Path) -> None:
    (tmp_path / "test_my_executor.py").write_text(PROJECT_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")  # and no markers section
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                           "-k", "test_many_small_calls and not map"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout
    assert "not found in `markers`" not in done.stdout + done.stderr
