"""Surrounding whitespace is never part of a key, wherever the key is given; generated keys have none.

A binary key that starts or ends with a whitespace byte (``os.urandom(32)`` does about 1 time in 21) must
be the same key for a job server or gearman worker built in Python, a worker process handed the key in
hex, and a client given the bytes (or the stripped bytes). Everything runs for real on 127.0.0.1: our job
servers in this process, gearmand, workers in a thread of this process and as worker processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.jobserver.embedded import EmbeddedJobServer
from remote_executor.security import (
    KEY_ENV,
    KEY_HEX_ENV,
    generate_key,
    key_from_env,
    key_to_env,
    normalize_key,
    resolve_key,
)
from remote_executor.ssh import SSHJobServer
from remote_executor.supervisor import Supervisor
from remote_executor.transports import get_backend
from remote_executor.transports.base import Call, Options, ServerSettings, Session, WorkerCore, WorkerSettings
from remote_executor.transports.gearman.embedded import EmbeddedGearmand
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.jobs import JobCodec
from remote_executor.transports.tcp.server import TcpServer

from .conftest import FAST_HEARTBEAT, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
# Whitespace inside a key is part of it; only the surrounding whitespace is not.
CORE = b"k\x00\x85 inner\twhitespace\nstays\xa0k"
PADDED = {"space": b" " + CORE + b" ", "newline": CORE + b"\n", "tab": b"\t" + CORE + b"\r\n\x0b\x0c"}
SCHEMES = ["tcp", pytest.param("zmq", marks=pytest.mark.zmq), pytest.param("gearman", marks=pytest.mark.gearman)]


@contextlib.contextmanager
def job_server(scheme: str, make: Callable[[], Any]) -> Iterator[str]:
    """A job server for ``scheme`` on loopback (``make()`` builds ours; gearman is a real gearmand);
    yields its URL."""
    if scheme == "gearman":
        with GearmandProcess(threads=2) as gearmand:
            yield f"{gearmand.url}/keys-{os.getpid()}"
        return
    server = make()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def worker_thread(settings: WorkerSettings) -> Iterator[None]:
    """The scheme's worker loop in a thread of this process, drained and joined at exit."""
    scheme = settings.url.split(":", 1)[0]
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(get_backend(scheme).run_worker(settings, WorkerCore())),
                              name="test-keys-worker")
    thread.start()
    try:
        # Serving: attached, and done with its lazy imports. Python 3.11 can fail an import that pytest
        # rewrites while another thread imports too ("AST constructor recursion depth mismatch").
        wait_for(lambda: settings.serving.is_set() or not thread.is_alive(), what="the worker to serve")
        assert settings.serving.is_set(), f"the worker loop ended with {done} before serving"
        yield
    finally:
        settings.drain.set()
        thread.join(60)
    assert not thread.is_alive()
    assert done == [0], f"the worker loop ended with {done} (2: the job server refused its key)"


def server_class(scheme: str) -> Any:
    if scheme == "zmq":
        from remote_executor.transports.zmq.server import ZmqServer  # pyzmq only for zmq

        return ZmqServer
    return TcpServer


def run_call(url: str, key: bytes, base: int) -> int:
    with RemoteExecutor(transport=url, key=key, **FAST) as ex:
        result: int = ex.submit(pow, base, 2).result(timeout=60)
        return result


# --- a key with surrounding whitespace is one key everywhere -------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("pad", list(PADDED))
def test_a_server_and_worker_built_in_python_accept_the_padded_and_the_stripped_key(scheme: str, pad: str) -> None:
    key = PADDED[pad]
    settings = ServerSettings(key=key, **FAST)
    with job_server(scheme, lambda: server_class(scheme).from_settings("127.0.0.1", 0, settings)) as url, \
            worker_thread(WorkerSettings(url=url, key=key, name=f"keys-{pad}", **FAST)):
        assert run_call(url, key, 3) == 9  # the same bytes as the server and the worker were given
        assert run_call(url, CORE, 4) == 16  # the bytes a key file of it would give


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_padded_key_handed_down_in_hex_matches_a_server_constructed_directly(scheme: str) -> None:
    key = PADDED["tab"]

    construct = lambda: server_class(scheme)("127.0.0.1", 0, key=key, **FAST)  # noqa: E731  # as embedded
    with job_server(scheme, construct) as url:
        workers = Supervisor(url, 1, env={KEY_HEX_ENV: key.hex()}, worker_args=FAST_HEARTBEAT, name="hex-worker")
        workers.start()
        try:
            assert run_call(url, CORE, 5) == 25
        finally:
            workers.stop()


def test_every_entry_point_keeps_the_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in PADDED.values():
        monkeypatch.setenv(KEY_HEX_ENV, key.hex())
        assert key_from_env() == CORE
        assert resolve_key(key) == CORE
        assert normalize_key(key) == CORE
        assert Options(key=key).key == CORE
        assert ServerSettings(key=key).key == CORE
        assert WorkerSettings(url="tcp://127.0.0.1:1", key=key).key == CORE
        assert bytes.fromhex(key_to_env(key)[KEY_HEX_ENV]) == CORE
    monkeypatch.delenv(KEY_HEX_ENV)
    monkeypatch.setenv(KEY_ENV, "\t a text key \n")  # an environment variable holds text, never a NUL
    assert key_from_env() == resolve_key() == normalize_key(" a text key") == b"a text key"


def test_a_job_sealed_under_the_padded_key_opens_under_the_stripped_one() -> None:
    """The gearman job codec (what a client and a worker seal with) agrees with the rule too."""
    function = b"remote_executor.default"
    sealed = JobCodec(PADDED["newline"], function).encode_job(Call(1, [b"call"]), Session(7, None, 0), 2e9)
    job = JobCodec(CORE, function).decode_job(sealed.payload)
    assert bytes(job.frame.parts[0]) == b"call"


# --- a key of only whitespace is an error, everywhere ---------------------------------------------------------

BLANK = [b" ", b"\n", b"\t\r\n", b"\x0b\x0c "]


def _tcp_server(key: bytes) -> object:
    return TcpServer("127.0.0.1", 0, key=key)


def _zmq_server(key: bytes) -> object:
    return server_class("zmq")("127.0.0.1", 0, key=key)


def _key_from_hex_env(key: bytes) -> object:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_HEX_ENV, key.hex())
        return key_from_env()


ENTRY_POINTS: dict[str, Callable[[bytes], object]] = {
    "RemoteExecutor": lambda key: RemoteExecutor(transport="tcp://127.0.0.1:1", key=key),
    "Options": lambda key: Options(key=key),
    "ServerSettings": lambda key: ServerSettings(key=key),
    "WorkerSettings": lambda key: WorkerSettings(url="tcp://127.0.0.1:1", key=key),
    "TcpServer": _tcp_server,
    "ZmqServer": _zmq_server,
    "JobCodec": lambda key: JobCodec(key, b"remote_executor.default"),
    "REMOTE_EXECUTOR_KEY_HEX": _key_from_hex_env,
    "key_to_env": key_to_env,
    "SSHCluster": lambda key: SSHJobServer(["node1"], key=key),
}


@pytest.mark.parametrize("entry", [pytest.param(name, marks=pytest.mark.zmq) if name == "ZmqServer" else name
                                   for name in ENTRY_POINTS])
@pytest.mark.parametrize("blank", BLANK, ids=repr)
def test_a_key_of_only_whitespace_is_a_clear_value_error(entry: str, blank: bytes) -> None:
    with pytest.raises(ValueError, match=r"empty once surrounding whitespace \(never part of a key\)") as caught:
        give(entry, blank)
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # the error itself, not a wrapper


def give(entry: str, key: bytes) -> None:
    """Give ``key`` to an entry point; whatever took it is stopped at once (a server holds a socket)."""
    made = ENTRY_POINTS[entry](key)
    stop = getattr(made, "stop", None)
    if stop is not None:
        stop()


def test_a_hex_key_that_is_not_hex_says_so_without_quoting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_HEX_ENV, "00ffzz-secret-digits")
    with pytest.raises(ValueError, match=rf"\${KEY_HEX_ENV} is not hexadecimal") as caught:
        key_from_env()
    assert "secret" not in str(caught.value)


def test_an_ssh_cluster_key_must_fit_on_the_line_that_carries_it_to_the_hosts() -> None:
    assert SSHJobServer(["node1"], key=b" \tkey with spaces\n").key == b"key with spaces"
    with pytest.raises(ValueError, match="cannot contain a line break"):
        SSHJobServer(["node1"], key=b"two\nlines")


# --- generated keys ------------------------------------------------------------------------------------------


def test_generated_keys_have_no_whitespace_and_256_bits() -> None:
    keys = {generate_key() for _ in range(5000)}
    assert len(keys) == 5000
    for key in keys:
        assert len(key) == 64 and len(bytes.fromhex(key.decode())) == 32  # 32 random bytes, hex
        assert normalize_key(key) == key and not any(chr(byte).isspace() for byte in key)


@pytest.mark.parametrize("embedded", [EmbeddedJobServer, pytest.param(EmbeddedGearmand, marks=pytest.mark.gearman)])
def test_the_embedded_clusters_generate_keys_without_whitespace(embedded: Any) -> None:
    """Without a key of the executor's own each embedded cluster makes a fresh generated one, and hands
    its workers that very key."""
    keys = []
    for _ in range(3):
        args = (Session(7, None, 0), 1) if embedded is EmbeddedGearmand else (_unstarted_server,)
        cluster = embedded(Options(), *args)  # gearman: gearmand starts only at start()
        try:
            keys.append(cluster.key)
            assert bytes.fromhex(cluster.worker_env()[KEY_HEX_ENV]) == cluster.key
        finally:
            cluster.stop()
    assert len(set(keys)) == 3
    for key in keys:
        assert len(key) == 64 and len(bytes.fromhex(key.decode())) == 32 and normalize_key(key) == key


def _unstarted_server(settings: ServerSettings) -> Any:
    return TcpServer.from_settings("127.0.0.1", 0, settings)
