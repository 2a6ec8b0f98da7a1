"""remote_executor.progress: a tqdm bar when tqdm can be imported, plain lines when it cannot; over a map
iterator and over futures, on real worker processes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor, progress

ROOT = Path(__file__).resolve().parents[1]


def square(n: int) -> int:
    return n * n


@pytest.fixture
def no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tqdm`` fail, as where it is not installed."""
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import tqdm.auto  # noqa: F401


def test_with_tqdm_a_bar_counts_a_map_iterator_on_real_workers() -> None:
    out = io.StringIO()
    with RemoteExecutor(2) as executor:
        values = list(progress(executor.map(square, range(5)), total=5, desc="squares", file=out))
    assert values == [0, 1, 4, 9, 16]
    bar = out.getvalue()
    assert "squares" in bar and "5/5" in bar and "100%" in bar


def test_with_tqdm_futures_come_as_they_complete() -> None:
    out = io.StringIO()
    with RemoteExecutor(2) as executor:
        futures = [executor.submit(square, n) for n in range(4)]
        seen = list(progress(futures, file=out))
    assert sorted(seen, key=id) == sorted(futures, key=id) and all(f.done() for f in seen)
    assert "4/4" in out.getvalue()


@pytest.mark.usefixtures("no_tqdm")
def test_without_tqdm_a_line_per_interval_and_one_at_the_end() -> None:
    out = io.StringIO()
    with RemoteExecutor(2) as executor:
        values = list(progress(executor.map(square, range(3)), total=3, desc="squares", interval=0, file=out))
    assert values == [0, 1, 4]
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["squares: 1/3 (33%)", "squares: 2/3 (67%)",
                                                      "squares: 3/3 (100%)", "squares: 3/3 (100%)"]
    assert lines[-1].endswith("(done)")

    out = io.StringIO()
    assert list(progress(iter(range(100)), desc="quiet", interval=3600, file=out)) == list(range(100))
    [line] = out.getvalue().splitlines()  # nothing until the interval passed, then the last line
    assert line.startswith("quiet: 100, ") and line.endswith("(done)")


@pytest.mark.usefixtures("no_tqdm")
def test_without_tqdm_stopping_early_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    done: list[Future[int]] = []
    for n in range(3):
        future: Future[int] = Future()
        future.set_result(n)
        done.append(future)
    items = progress(done, interval=3600)
    next(items)
    items.close()  # the loop over it ended early (a break)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("progress: 1/3 (33%)") and line.endswith("(stopped early)")


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        progress([], interval=-1)


def test_the_documented_example_runs() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "progress.py")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True)
    assert "sum of squares: 20540" in done.stdout and "largest: 1521" in done.stdout
    assert "squares" in done.stderr and "40/40" in done.stderr
