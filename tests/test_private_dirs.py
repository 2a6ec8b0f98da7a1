"""Private temporary directories: made private, removed by their owner, and those a killed owner left are
removed by the next process that makes one of the same kind, never one still in use."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from remote_executor import privatedirs
from tests.conftest import pid_alive, wait_for

DEAD_PID = 999_999_999  # above any pid_max: no process has it


def _abandoned(base: Path, kind: str, pid: int = DEAD_PID) -> Path:
    path = base / f"remote-executor-{kind}-{pid}-0123456789abcdef"
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "file").write_text("left by a killed process")
    (path / "link").symlink_to(base)  # removed, not followed
    return path


def test_a_directory_is_private_named_for_its_owner_and_removed_with_its_contents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    made = privatedirs.make("thing")
    path = Path(made.path)
    assert path.parent == tmp_path and path.name.startswith(f"remote-executor-thing-{os.getpid()}-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    (path / "log").write_text("x")
    made.remove()
    made.remove()  # idempotent
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_making_one_removes_only_abandoned_directories_of_its_kind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    abandoned = _abandoned(tmp_path, "thing")
    other_kind = _abandoned(tmp_path, "other")
    live_owner = _abandoned(tmp_path, "thing", os.getppid())  # its pid runs
    not_ours = tmp_path / f"gearmand-{DEAD_PID}"
    not_ours.mkdir()
    made = privatedirs.make("thing")
    try:
        assert not abandoned.exists()
        assert other_kind.exists() and live_owner.exists() and not_ours.exists()
        assert (other_kind / "sub" / "file").exists()  # the abandoned one's link to tmp_path was not followed
    finally:
        made.remove()


def test_a_directory_locked_by_a_live_process_is_kept_whatever_its_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory whose owner runs in another pid namespace (a container sharing $TMPDIR): its pid says
    nothing here, but its lock does."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    in_use = _abandoned(tmp_path, "thing")
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(in_use)!r}, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            print("locked", flush=True)
            sys.stdin.read()
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == "locked\n"
            privatedirs.make("thing").remove()
            assert in_use.exists()
        finally:
            holder.stdin.close()  # it exits: the lock goes with it
    privatedirs.make("thing").remove()  # its holder is gone now
    assert list(tmp_path.iterdir()) == []


KILLED_CLIENT = """\
from remote_executor import RemoteExecutor
ex = RemoteExecutor(max_workers=1, transport="gearman")
assert ex.submit(abs, -1).result(timeout=60) == 1
print("ready", flush=True)
input()
"""


@pytest.mark.slow
def test_a_killed_executors_directories_are_removed_by_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program killed with SIGKILL cannot remove its private gearmand's directory nor its workers' start
    records; the next embedded gearman cluster on the machine does."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with subprocess.Popen([sys.executable, "-c", KILLED_CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            left = sorted(p.name for p in tmp_path.iterdir())
            gearmand_pid = int(next(tmp_path.glob("remote-executor-gearmand-*/gearmand.pid")).read_text())
        finally:
            child.kill()  # SIGKILL: no chance to clean up
    assert [name.split("-")[2] for name in left] == ["gearmand", "siblings"], left
    wait_for(lambda: not pid_alive(gearmand_pid), 30, "gearmand to die with its parent")
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # nobody removed them

    from remote_executor import RemoteExecutor

    with RemoteExecutor(max_workers=1, transport="gearman") as ex:
        assert ex.submit(abs, -2).result(timeout=60) == 2
        now = sorted(p.name for p in tmp_path.iterdir())
        assert not set(now) & set(left) and len(now) == 2, now
    assert list(tmp_path.iterdir()) == []
