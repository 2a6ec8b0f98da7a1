"""The start records sibling gearman workers share (so a job handed out again after its worker was killed
past the call's limit is not run again): the records themselves, and the directory a supervisor gives its
children for them."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import SIBLINGS_DIR_ENV
from remote_executor.transports.gearman.siblings import SiblingStarts
from remote_executor.transports.tcp.server import TcpServer

JOB = bytes(range(16))


def test_a_record_is_read_replaced_and_forgotten(tmp_path: Path) -> None:
    starts = SiblingStarts(str(tmp_path))
    assert starts.earlier(JOB) is None
    before = time.monotonic()
    starts.record(JOB, "worker-0")
    when, worker = starts.earlier(JOB) or (0.0, "")
    assert before <= when <= time.monotonic() and worker == "worker-0"
    assert stat.S_IMODE(os.stat(tmp_path / JOB.hex()).st_mode) == 0o600
    starts.record(JOB, "worker 1 with spaces")  # a retry: the limit runs anew
    again = starts.earlier(JOB)
    assert again is not None and again[0] >= when and again[1] == "worker 1 with spaces"
    starts.forget(JOB)
    assert starts.earlier(JOB) is None and not any(tmp_path.iterdir())
    starts.forget(JOB)  # twice: nothing to say


def test_failures_cost_the_record_never_the_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / JOB.hex()).write_text("not a time")
    starts = SiblingStarts(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="remote_executor.gearman"):
        assert starts.earlier(JOB) is None
        gone = SiblingStarts(str(tmp_path / "removed"))
        gone.record(JOB, "worker-0")
        assert gone.earlier(JOB) is None
    assert "cannot read the start record" in caplog.text and "cannot record the start" in caplog.text


def test_from_env_needs_an_existing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIBLINGS_DIR_ENV, raising=False)
    assert SiblingStarts.from_env() is None
    monkeypatch.setenv(SIBLINGS_DIR_ENV, str(tmp_path / "missing"))
    assert SiblingStarts.from_env() is None
    monkeypatch.setenv(SIBLINGS_DIR_ENV, str(tmp_path))
    found = SiblingStarts.from_env()
    assert found is not None and found.directory == str(tmp_path)


def test_a_supervisor_gives_its_children_a_private_directory_and_removes_it(
        tcp_server: TcpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(SIBLINGS_DIR_ENV, "/an/outer/supervisors/directory")  # never inherited
    abandoned = tmp_path / "remote-executor-siblings-999999999-0123456789abcdef"  # no such pid
    abandoned.mkdir()
    (abandoned / "record").write_text("a record a killed supervisor's worker left")
    live = tmp_path / f"remote-executor-siblings-{os.getppid()}-0123456789abcdef"  # a running process's
    live.mkdir()
    supervisor = Supervisor(tcp_server.url, 1, name="test-worker", sibling_records=True)
    supervisor.start()
    try:
        assert not abandoned.exists() and live.exists()
        [directory] = [d for d in tmp_path.glob(f"remote-executor-siblings-{os.getpid()}-*")]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        [pid] = supervisor.pids()  # spawned: its environment is the one it was started with
        assert f"{SIBLINGS_DIR_ENV}={directory}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        (directory / "leftover").write_text("a record a killed worker left")
    finally:
        supervisor.stop()
    assert not directory.exists()


def test_only_a_backend_that_keeps_records_gets_a_directory(
        tcp_server: TcpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(SIBLINGS_DIR_ENV, "/an/outer/supervisors/directory")
    supervisor = Supervisor(tcp_server.url, 1, name="test-worker")  # tcp: no records
    supervisor.start()
    try:
        [pid] = supervisor.pids()
        assert SIBLINGS_DIR_ENV.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        assert not list(tmp_path.iterdir())
    finally:
        supervisor.stop()
