"""A worker with the wrong key stops at once with a clear message; "serving" means the job server let it in.

Real job servers in this process, and the real ``remote-executor worker`` command (and the worker process
it supervises) as subprocesses, on loopback.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_executor.transports.tcp.server import TcpServer

from .conftest import FAST_HEARTBEAT, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEY = b"the cluster key"


def _env(**extra: str) -> dict[str, str]:
    """This environment without a key (the per-user key file stays the test session's, never ~/.config)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REMOTE_EXECUTOR_KEY", "REMOTE_EXECUTOR_KEY_HEX")}
    return {**env, "PYTHONPATH": SRC, **extra}


@pytest.fixture(params=["tcp", "zmq"])
def make_server(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Any] = []

    def make(key: bytes | None) -> Any:
        fast = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
        if request.param == "tcp":
            server: Any = TcpServer("127.0.0.1", 0, key=key, **fast)
        else:
            from remote_executor.transports.zmq.server import ZmqServer

            server = ZmqServer("127.0.0.1", 0, key=key, **fast)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _worker_command(url: str, key_file: Path | None) -> list[str]:
    key = ["--key-file", str(key_file)] if key_file is not None else []
    return [sys.executable, "-m", "remote_executor.cli", "worker", url, "--processes", "1", *key, *FAST_HEARTBEAT]


@pytest.mark.parametrize(("server_key", "worker_key"), [(KEY, b"another key"), (KEY, None), (None, KEY)])
def test_the_worker_command_with_the_wrong_key_exits_with_a_clear_message(
        make_server: Any, tmp_path: Path, server_key: bytes | None, worker_key: bytes | None) -> None:
    server = make_server(server_key)
    key_file = None
    if worker_key is not None:
        key_file = tmp_path / "cluster.key"
        key_file.write_bytes(worker_key + b"\n")
        key_file.chmod(0o600)
    done = subprocess.run(_worker_command(server.url, key_file), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "the job server rejected our key" in done.stderr
    assert "Traceback" not in done.stderr
    assert "serving" not in done.stdout  # it never got in, so it never said it serves
    assert done.stderr.rstrip().splitlines()[-1].startswith("remote-executor: the job server ")


def test_a_worker_process_with_the_wrong_key_exits_2(make_server: Any) -> None:
    server = make_server(KEY)
    done = subprocess.run([sys.executable, "-m", "remote_executor.worker", server.url],
                          env=_env(REMOTE_EXECUTOR_KEY="not the key"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "the job server rejected our key" in done.stderr


def test_the_worker_command_says_serving_once_attached(make_server: Any, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="remote_executor")
    server = make_server(KEY)
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o600)
    proc = subprocess.Popen(_worker_command(server.url, key_file), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the command says it serves (or exits)
        assert line.startswith(f"1 worker process(es) serving {server.url}"), line
        wait_for(lambda: server.scheduler.capacity == 1, what="the worker to attach")
        assert any("attached" in r.getMessage() for r in caplog.records)  # the job server logs it
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
