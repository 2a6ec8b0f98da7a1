"""A job server whose process stalls (SIGSTOP, a long pause of the VM, swapping) keeps its workers.

While the server does not run, its workers keep sending heartbeats, which wait in the socket buffers. When it
runs again it must read them before it judges anyone silent: otherwise every worker looks silent for as long
as the stall lasted and is dropped, and every running call is requeued, though nobody failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_executor import cluster_status

from .conftest import start_cli_server, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEY = b"stalled-server-key-" + b"k" * 13
ENV = {**os.environ, "PYTHONPATH": SRC, "REMOTE_EXECUTOR_KEY": KEY.decode()}
SERVER_TIMEOUT = 1.0  # how long the server waits for a worker's heartbeat
STALL = 3 * SERVER_TIMEOUT
WORKER_TIMEOUT = 60.0  # the workers wait out the stall: only the server's judgement is under test


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "remote_executor.cli", *args]


def stall(pid: int) -> None:
    """Stop the process for STALL seconds: the stall itself is under test (heartbeats pile up meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(STALL)
    finally:
        os.kill(pid, signal.SIGCONT)


def stop(*processes: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        for stream in (process.stdout, process.stderr, process.stdin):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_a_server_that_stalled_reads_the_heartbeats_it_missed_before_judging_its_workers(scheme: str) -> None:
    port, server = start_cli_server(lambda port: cli(
        "server", f"{scheme}://127.0.0.1:{port}", "--heartbeat-interval", "0.2",
        "--heartbeat-timeout", str(SERVER_TIMEOUT)), ENV)
    url = f"{scheme}://127.0.0.1:{port}"
    workers = subprocess.Popen(cli("worker", url, "--processes", "2", "--heartbeat-interval", "0.2",
                                   "--heartbeat-timeout", str(WORKER_TIMEOUT)),
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(cluster_status(url, key=KEY).workers) == 2, what="two workers attached")
        before = {w.name for w in cluster_status(url, key=KEY).workers}
        stall(server.pid)
        after = cluster_status(url, key=KEY, timeout=30).workers
        assert {w.name for w in after} == before
        # Attached before the stall, not again after it (a dropped worker reconnects under a new name or
        # with a fresh uptime).
        assert all(w.uptime is not None and w.uptime >= STALL for w in after), after
    finally:
        stop(workers, server)


CLIENT = """
import logging, sys
from remote_executor import RemoteExecutor
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
with RemoteExecutor(transport=sys.argv[1], heartbeat_interval=0.2, heartbeat_timeout=1.0) as ex:
    print(ex.submit(pow, 2, 5).result(timeout=60), flush=True)
    sys.stdin.readline()  # stopped and continued meanwhile
    print(ex.submit(pow, 2, 6).result(timeout=60), flush=True)
"""


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_a_client_that_stalled_keeps_its_connection(scheme: str) -> None:
    """The same from the executor's side: its server stays patient (60 s), its own timeout is 1 s."""
    port, server = start_cli_server(lambda port: cli(
        "server", f"{scheme}://127.0.0.1:{port}", "--heartbeat-interval", "0.2",
        "--heartbeat-timeout", str(WORKER_TIMEOUT)), ENV)
    url = f"{scheme}://127.0.0.1:{port}"
    workers = subprocess.Popen(cli("worker", url, "--processes", "1"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, url], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline() == "32\n"
        stall(client.pid)  # the server's heartbeats pile up meanwhile
        out, err = client.communicate("go\n", timeout=60)
        assert out == "64\n"
        assert "reconnecting" not in err, err
    finally:
        stop(client, workers, server)
