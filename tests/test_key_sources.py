"""A key read from a file works the same whichever way it is given; a file's name is never taken as the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer

from .conftest import FAST_HEARTBEAT

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_key_bytes_from_a_file_work_like_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(b"s3cret-cluster-key\n")  # as `... | base64 > cluster.key` writes it
    key_file.chmod(0o600)  # a key file others may read is refused
    server = TcpServer("127.0.0.1", 0, key=b"s3cret-cluster-key", **FAST)
    server.start()
    workers = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": b"s3cret-cluster-key".hex()},
                         worker_args=FAST_HEARTBEAT, name="key-worker")
    workers.start()
    try:
        with open(key_file, "rb") as f, RemoteExecutor(transport=server.url, key=f.read(), **FAST) as ex:
            assert ex.submit(pow, 2, 5).result(timeout=60) == 32
        with RemoteExecutor(transport=server.url, key_file=key_file, **FAST) as ex:
            assert ex.submit(pow, 2, 6).result(timeout=60) == 64
        ping = subprocess.run([sys.executable, "-m", "remote_executor.cli", "ping", server.url, "--key-file",
                               str(key_file)], env={"PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stderr
    finally:
        workers.stop()
        server.stop()


def test_a_key_that_names_a_file_is_an_error_that_says_key_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cluster.key").write_bytes(b"s3cret\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"key='cluster.key' names a file: pass key_file='cluster.key'"):
        RemoteExecutor(transport="tcp://127.0.0.1:1", key="cluster.key")


def test_a_key_file_that_cannot_be_read_says_it_is_the_key_file(tmp_path: Path) -> None:
    """(It said only "[Errno 2] No such file or directory: 'k'", naming no key.)"""
    missing = tmp_path / "cluster.key"
    with pytest.raises(FileNotFoundError, match="cannot read the key file: No such file or directory") as caught:
        RemoteExecutor(transport="tcp://127.0.0.1:1", key_file=missing)
    assert caught.value.filename == str(missing)
    done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "ping", "tcp://127.0.0.1:1", "--key-file",
                           str(missing)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("remote-executor: [Errno 2] cannot read the key file") and str(missing) in done.stderr
