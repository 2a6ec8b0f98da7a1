"""Every ```python block of README.md and docs/*.md runs, as written, in a fresh interpreter (or says in the
document why it cannot: see tests/docs/blocks.py). A block that talks to a cluster on other machines runs
against a real one started here on loopback with the command line the docs describe (``remote-executor
server``, ``gearmand``, ``worker``)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.blocks import DOCUMENTS, ROOT, Block, all_blocks, python_blocks

SRC = ROOT / "src"
KEY = "doc-blocks-cluster-key"
BLOCKS = all_blocks()
TLS_FLAGS = ("--tls-ca", "tls/ca.pem")
TLS_CLIENT = ("--tls-cert", "tls/client.pem", "--tls-key", "tls/client.key")


def test_every_python_block_was_found() -> None:
    for document in DOCUMENTS:
        assert len(python_blocks(document)) == document.read_text().count("```python"), document
    assert len(BLOCKS) >= 15


def test_the_blocks_that_are_not_run_are_few_and_say_why() -> None:
    skipped = [block for block in BLOCKS if block.not_run is not None]
    assert all(len(block.not_run or "") > 10 for block in skipped), [block.name for block in skipped]
    assert len(skipped) <= len(BLOCKS) // 3


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_the_block_runs(block: Block, tmp_path: Path) -> None:
    code = compile(block.setup + block.source, block.name, "exec")  # every block, run or not, is Python
    if block.not_run is not None:
        assert code is not None
        return
    for name in ("cluster.key", "k"):  # the key files the docs name, private as key files must be
        (tmp_path / name).write_text(KEY + "\n")
        (tmp_path / name).chmod(0o600)
    for earlier in python_blocks(block.document):  # the modules the document's blocks import
        if earlier.file_name is not None and earlier.line <= block.line:
            (tmp_path / earlier.file_name).write_text(earlier.source)
    with contextlib.ExitStack() as stack:
        source = block.setup + block.source
        tls = "tls_ca=" in source
        if tls:
            from remote_executor.tls import make_cluster_material

            make_cluster_material(str(tmp_path / "tls"), ["127.0.0.1"])
        for scheme, addresses, pool in block.remote_urls():
            local = [stack.enter_context(_server(scheme, tmp_path, tls)) for _ in addresses]
            url = f"{scheme}://{','.join(local)}{pool}"
            stack.enter_context(_workers(url, tmp_path, tls))
            source = source.replace(f"{scheme}://{','.join(addresses)}", f"{scheme}://{','.join(local)}")
        if block.file_name is not None:
            source = f"import {Path(block.file_name).stem}\n"
        (tmp_path / "block.py").write_text(source)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SRC), "REMOTE_EXECUTOR_KEY": KEY,
               "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
        done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=100, env=env)
    assert done.returncode == 0, f"{block.name} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, f"{block.name} printed an error:\n{done.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _cli(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING", *args], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(SRC)})


@contextlib.contextmanager
def _running(proc: subprocess.Popen[bytes], ready: str) -> Iterator[str]:
    """Yield the line of ``proc``'s output that contains ``ready``; terminate ``proc`` afterwards."""
    try:
        yield _line_with(proc, ready, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _line_with(proc: subprocess.Popen[bytes], text: str, timeout: float) -> str:
    assert proc.stdout is not None
    fd, seen, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in seen.decode(errors="replace").splitlines():
            if text in line:
                return line
        readable, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        chunk = os.read(fd, 65536) if readable else b""
        if readable and not chunk:
            break  # it exited
        seen += chunk
    raise AssertionError(f"no {text!r} from {proc.args}:\n{seen.decode(errors='replace')[-3000:]}")


@contextlib.contextmanager
def _server(scheme: str, cwd: Path, tls: bool) -> Iterator[str]:
    """A job server (or gearmand) on loopback, started as the docs say; yields its host:port."""
    port = _free_port()
    if scheme == "gearman":
        proc = _cli("gearmand", "--port", str(port), "--threads", "1", cwd=cwd)
    else:
        extra = (*TLS_FLAGS, "--tls-cert", "tls/server.pem", "--tls-key", "tls/server.key") if tls else ()
        proc = _cli("server", f"{scheme}://127.0.0.1:{port}", "--key-file", "cluster.key", *extra, cwd=cwd)
    with _running(proc, "serving"):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def _workers(url: str, cwd: Path, tls: bool) -> Iterator[None]:
    extra = (*TLS_FLAGS, *TLS_CLIENT) if tls else ()
    proc = _cli("worker", url, "--key-file", "cluster.key", "--processes", "2", *extra, cwd=cwd)
    with _running(proc, "serving"):
        yield


def test_urls_of_running_clusters_are_recognised() -> None:
    block = Block(ROOT / "README.md", 1, 'RemoteExecutor(transport="gearman://gm1:4730,gm2:4730/ml")\n'
                                         'RemoteExecutor(transport="tcp://127.0.0.1:5555")\n')
    assert block.remote_urls() == [("gearman", ["gm1:4730", "gm2:4730"], "/ml"), ("tcp", ["127.0.0.1:5555"], "")]
