"""Whoever reaches gearmand learns nothing and can forge or replay nothing (with a key): real gearmand, real
worker processes, and a third party holding raw Gearman connections.

- confidentiality: a rogue worker grabs a job and finds none of the call's bytes; everything gearmand
  relays between client and workers, both ways, is ciphertext (and, as a control, is not without a key);
- replay: a captured job submitted again is refused by the worker that ran it (the call's side effect
  happens once) while a legitimate client runs beside it without a failure; an expired job is refused;
- forged results: garbage, an unencrypted pickle, the result of another job or a tampered result fails
  that one future with a clear error, and nothing of it is unpickled;
- the embedded ``transport="gearman"`` cluster encrypts, and needs ``cryptography`` at construction.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from pathlib import Path

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.conformance.gate import Gate, wait_at_gate
from remote_executor.errors import AuthenticationError, ProtocolError, WorkerLostError
from remote_executor.security import key_to_env
from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import Call, Options, Session, WorkerCore, WorkerSettings
from remote_executor.transports.gearman.client import GearmanClientTransport
from remote_executor.transports.gearman.connection import (
    ClientCallbacks,
    GearmanClientConnection,
    GearmanWorkerConnection,
    Job,
    admin_status,
)
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.jobs import JobCodec, JobIdentity, function_name, parse_url
from remote_executor.transports.gearman.replay import REPLAYED, ReplayGuard
from remote_executor.transports.gearman.worker import GearmanWorker
from remote_executor.wire.aead import CryptographyMissingError, is_sealed
from remote_executor.wire.frames import Frame, Kind, decode_whole, encode_bytes
from remote_executor.wire.serialization import dumps

from ..conftest import wait_for

pytestmark = pytest.mark.gearman

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

_pools = itertools.count()


def append_line(path: str, line: str) -> str:
    """The call whose side effect counts how often it ran."""
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


def shout_back(marker: str) -> str:
    """Returns its argument: the marker travels in the job and in the result."""
    return marker


def lines_in(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class _Trap:
    """Unpickling this creates a directory: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gearmand() -> Iterator[GearmandProcess]:
    """One gearmand without -j (a job whose worker goes away is handed out again); a pool per test."""
    with GearmandProcess(threads=2) as server:
        yield server


@pytest.fixture
def pool_url(gearmand: GearmandProcess) -> str:
    return f"{gearmand.url}/sec-{os.getpid()}-{next(_pools)}"


@pytest.fixture
def key() -> bytes:
    """Hex text: a key is stripped of surrounding whitespace where it is given to an executor, and random
    bytes may end in a space."""
    return os.urandom(32).hex().encode()


@pytest.fixture
def start_workers() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(url: str, key: bytes | None, count: int = 1) -> Supervisor:
        """Workers with ``key``; ``None``: keyless, which takes --insecure (else the per-user key)."""
        supervisor = Supervisor(url, count, env=key_to_env(key), worker_args=() if key else ("--insecure",),
                                name="sec-worker")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.stop()


@contextlib.contextmanager
def worker_thread(url: str, key: bytes | None, name: str = "sec-thread-worker") -> Iterator[WorkerSettings]:
    """A worker in this process, so the test can read its log."""
    settings = WorkerSettings(url=url, key=key, name=name)
    thread = threading.Thread(target=GearmanWorker(settings, WorkerCore()).run, name="test-gearman-worker")
    thread.start()
    try:
        yield settings
    finally:
        settings.drain.set()
        thread.join(30)
    assert not thread.is_alive()


def address_and_function(url: str) -> tuple[str, int, bytes]:
    addresses, pool = parse_url(url)
    return addresses[0][0], addresses[0][1], function_name(pool)


def wait_for_workers(url: str, count: int) -> None:
    host, port, function = address_and_function(url)

    def registered() -> bool:
        return any(s.function.encode() == function and s.workers == count for s in admin_status(host, port))

    wait_for(registered, what=f"{count} worker(s) registered for {url}")


class Rogue:
    """A third party's raw worker connection, registered for a pool's function. When it leaves it fails the
    jobs it grabbed and did not answer, so a failing test never leaves a future waiting for ever."""

    def __init__(self, url: str) -> None:
        host, port, function = address_and_function(url)
        self.conn = GearmanWorkerConnection(host, port, [function], client_id=b"rogue")
        self._unanswered: list[bytes] = []

    def grab(self) -> Job:
        job = self.conn.grab_job(30)
        assert job is not None, "the rogue worker got no job within 30 s"
        self._unanswered.append(job.handle)
        return job

    def complete(self, job: Job, payload: bytes | bytearray) -> None:
        self._unanswered.remove(job.handle)
        self.conn.complete(job.handle, payload)

    def let_go(self) -> None:
        """Leave without answering: gearmand hands the jobs it held to the next worker."""
        self._unanswered.clear()
        self.conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for handle in self._unanswered:
                self.conn.fail(handle)
        self.conn.close()


@contextlib.contextmanager
def rogue_worker(url: str) -> Iterator[Rogue]:
    rogue = Rogue(url)
    try:
        wait_for_workers(url, 1)
        yield rogue
    finally:
        rogue.close()


class _Outcomes(ClientCallbacks[int]):
    """What a third party's raw client hears about each of its submissions."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.data: dict[int, list[bytes]] = {}
        self.outcome: dict[int, str] = {}

    def on_data(self, token: int, payload: bytes) -> None:
        with self.lock:
            self.data.setdefault(token, []).append(payload)

    def _settle(self, token: int, outcome: str) -> None:
        with self.lock:
            self.outcome[token] = outcome
            self.lock.notify_all()

    def on_complete(self, token: int, payload: bytes) -> None:
        self._settle(token, "complete")

    def on_fail(self, token: int) -> None:
        self._settle(token, "fail")

    def on_disconnect(self, exc: Exception, in_flight: list[int]) -> None:
        for token in in_flight:
            self._settle(token, "disconnected")

    def wait(self, count: int) -> dict[int, str]:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.outcome) >= count, 30), self.outcome
            return dict(self.outcome)


class RecordingProxy:
    """A TCP relay on 127.0.0.1 in front of gearmand that records every byte, both ways: what gearmand
    (or anyone on its network path) sees. ``cut()`` drops every connection, as a network fault would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # every socket, closed at close()
        self._live: list[socket.socket] = []  # those cut() has not cut yet
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, name="recording-proxy", daemon=True)
        self._acceptor.start()

    def url(self, pool: str) -> str:
        return f"gearman://127.0.0.1:{self.port}/{pool}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                if self._closing:
                    downstream.close()
                    upstream.close()
                    return
                self._sockets += [downstream, upstream]
                self._live += [downstream, upstream]
                for src, dst in ((downstream, upstream), (upstream, downstream)):
                    thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.recorded += data
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the pair, as a relay that lost a leg does
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            sockets, self._live = self._live, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        self.cut()
        for thread in self._threads:
            thread.join()
        with self._lock:
            for sock in self._sockets:
                sock.close()


@pytest.fixture
def proxy(gearmand: GearmandProcess) -> Iterator[RecordingProxy]:
    relay = RecordingProxy(("127.0.0.1", gearmand.port))
    yield relay
    relay.close()


# --- what a third party can read ---------------------------------------------------------------------------


def test_a_rogue_worker_that_grabs_a_job_finds_none_of_the_calls_bytes(
    pool_url: str, key: bytes, start_workers: Callable[..., Supervisor]
) -> None:
    marker = f"MARKER-{os.urandom(8).hex()}"
    function = address_and_function(pool_url)[2]
    with RemoteExecutor(transport=pool_url, key=key) as ex, rogue_worker(pool_url) as rogue:
        future = ex.submit(shout_back, marker)
        job = rogue.grab()
        for secret in (marker.encode(), marker.encode("utf-16-le"), b"shout_back", b"cloudpickle"):
            assert secret not in job.payload
        assert is_sealed(job.payload)
        with pytest.raises(ProtocolError):
            decode_whole(job.payload)  # no frame in clear either
        for guess in (b"another key", b"", None):
            with pytest.raises(AuthenticationError):
                JobCodec(guess or None, function).decode_job(job.payload)
        # Control: with the key the very same bytes are the call, marker and all.
        opened = JobCodec(key, function).decode_job(job.payload)
        assert marker.encode() in b"".join(bytes(p) for p in opened.frame.parts)
        rogue.let_go()  # gearmand hands the job to the rightful worker
        start_workers(pool_url, key)
        assert future.result(timeout=30) == marker


@pytest.mark.parametrize("keyed", [True, False], ids=["key-encrypted", "no-key-control"])
def test_what_gearmand_relays_both_ways_is_ciphertext(
    proxy: RecordingProxy, key: bytes, keyed: bool, start_workers: Callable[..., Supervisor]
) -> None:
    """Client and worker both talk to gearmand through a recording relay: with a key neither the call nor
    the result appears in what gearmand relays; without one (the control) both do."""
    url = proxy.url(f"relay-{os.getpid()}-{next(_pools)}")
    marker = f"MARKER-{os.urandom(8).hex()}"
    start_workers(url, key if keyed else None)
    with RemoteExecutor(transport=url, key=key if keyed else None, insecure=not keyed) as ex:
        assert ex.submit(shout_back, marker).result(timeout=30) == marker
        assert ex.submit(shout_back, marker.upper()).result(timeout=30) == marker.upper()
    with proxy._lock:
        recorded = bytes(proxy.recorded)
    seen = {m: recorded.count(m.encode()) for m in (marker, marker.upper())}
    if keyed:
        assert seen == {marker: 0, marker.upper(): 0} and b"shout_back" not in recorded
    else:  # each marker four times: in the job (client to gearmand to worker) and the result (back)
        assert seen == {marker: 4, marker.upper(): 4} and b"shout_back" in recorded


def test_a_large_call_and_result_cross_encrypted_in_segments(
    pool_url: str, key: bytes, start_workers: Callable[..., Supervisor]
) -> None:
    """3 MB each way: several 1 MiB segments, a part spanning two of them, in the job and in the result."""
    blob = os.urandom(3 * 1024 * 1024 + 123)
    start_workers(pool_url, key)
    with RemoteExecutor(transport=pool_url, key=key) as ex:
        assert ex.submit(shout_back, blob).result(timeout=60) == blob


# --- replay --------------------------------------------------------------------------------------------------


def test_a_captured_job_replayed_is_refused_while_a_rightful_client_runs(
    pool_url: str, key: bytes, tmp_path: Path, start_workers: Callable[..., Supervisor]
) -> None:
    effects = tmp_path / "effects"
    host, port, function = address_and_function(pool_url)
    with RemoteExecutor(transport=pool_url, key=key) as ex:
        with rogue_worker(pool_url) as rogue:
            original = ex.submit(append_line, str(effects), "ran")
            captured = rogue.grab().payload
            rogue.let_go()
        start_workers(pool_url, key, 1)  # one worker process: it remembers every job id it accepted
        assert original.result(timeout=30) == "ran"
        assert lines_in(effects) == ["ran"]

        replays, outcomes = 5, _Outcomes()
        legit_errors: list[BaseException] = []

        def rightful_load() -> None:
            try:
                assert list(ex.map(pow, range(200), [2] * 200)) == [i * i for i in range(200)]
                assert [ex.submit(pow, 3, i).result(timeout=30) for i in range(20)] == [3**i for i in range(20)]
            except BaseException as exc:
                legit_errors.append(exc)

        load = threading.Thread(target=rightful_load)
        load.start()
        with GearmanClientConnection(host, port, outcomes) as attacker:
            for token in range(replays):
                attacker.submit(token, function, captured)
            results = outcomes.wait(replays)
        load.join(60)
        assert not load.is_alive() and legit_errors == []
    assert results == dict.fromkeys(range(replays), "fail")
    for token in range(replays):
        refusal = outcomes.data[token][0]
        assert refusal.startswith(b"refused by sec-worker-0: refused a replayed job"), refusal
    assert lines_in(effects) == ["ran"]  # the call ran exactly once


def test_a_job_captured_in_one_pool_does_not_run_in_another(
    gearmand: GearmandProcess, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = (f"{gearmand.url}/sec-pool-{os.getpid()}-{next(_pools)}" for _ in range(2))
    host, port, other_function = address_and_function(second)
    with RemoteExecutor(transport=first, key=key) as ex, rogue_worker(first) as rogue:
        ex.submit(pow, 2, 2)
        captured = rogue.grab().payload  # the rightful future fails as the rogue leaves
        with caplog.at_level(logging.INFO, logger="remote_executor.gearman"), worker_thread(second, key):
            outcomes = _Outcomes()
            with GearmanClientConnection(host, port, outcomes) as attacker:
                attacker.submit(0, other_function, captured)
                assert outcomes.wait(1) == {0: "fail"}
    assert "refused a job it cannot authenticate" in caplog.text and "does not verify" in caplog.text


def test_an_expired_job_is_refused_logged_and_never_unpickled(
    pool_url: str, key: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An authentic job (the right key) whose expiry has passed: the worker refuses it before unpickling."""
    host, port, function = address_and_function(pool_url)
    trap = tmp_path / "unpickled"
    call = Call(1, [pickle.dumps(_Trap(str(trap)))])
    stale = JobCodec(key, function).encode_job(call, Session(7, None, 0), time.time() - 1).payload
    with caplog.at_level(logging.INFO, logger="remote_executor.gearman"), worker_thread(pool_url, key, "ttl-worker"):
        outcomes = _Outcomes()
        with GearmanClientConnection(host, port, outcomes) as attacker:
            attacker.submit(0, function, stale)
            assert outcomes.wait(1) == {0: "fail"}
    assert outcomes.data[0][0].startswith(b"refused by ttl-worker: refused an expired job (it expired ")
    assert "refused an expired job" in caplog.text
    assert not trap.exists()


def test_a_job_held_past_its_ttl_fails_that_call_clearly_and_the_executor_goes_on(
    pool_url: str, key: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rogue worker sits on a job past its ``job_ttl`` and lets it go: the rightful worker refuses it, the
    caller learns why, and the next call runs."""
    effects = tmp_path / "effects"
    ttl = 0.5
    function = address_and_function(pool_url)[2]
    with RemoteExecutor(transport=pool_url, key=key, job_ttl=ttl) as ex:
        with rogue_worker(pool_url) as rogue:
            before = time.time()
            held = ex.submit(append_line, str(effects), "late")
            expiry = JobCodec(key, function).decode_job(rogue.grab().payload).expiry
            assert expiry is not None and before + ttl <= expiry + 0.001  # the client made it: job_ttl from then
            wait_for(lambda: time.time() > expiry, what="the job to expire")  # time itself is the event
            rogue.let_go()
        with caplog.at_level(logging.INFO, logger="remote_executor.gearman"), worker_thread(pool_url, key):
            with pytest.raises(BrokenExecutor, match="refused an expired job") as info:
                held.result(timeout=30)
            assert "job_ttl" in str(info.value)
            assert ex.submit(append_line, str(effects), "on time").result(timeout=30) == "on time"
    assert lines_in(effects) == ["on time"]
    assert "refused an expired job" in caplog.text


def test_a_job_handed_out_again_to_the_worker_that_ran_it_is_resubmitted_not_failed(
    gearmand: GearmandProcess, proxy: RecordingProxy, key: bytes, tmp_path: Path,
    start_workers: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture,
) -> None:
    """gearmand loses a worker's connection while it runs a call and hands the job out again; the same worker
    process (reconnected) refuses it as a replay. That is a lost worker, not a call error: the client
    resubmits under a new job id and the call succeeds (it ran twice, as ``max_retries`` allows)."""
    pool = f"again-{os.getpid()}-{next(_pools)}"
    effects = tmp_path / "effects"
    start_workers(proxy.url(pool), key, 1)  # the worker reaches gearmand through the relay
    wait_for_workers(f"{gearmand.url}/{pool}", 1)
    with caplog.at_level(logging.WARNING, logger="remote_executor.gearman"), Gate() as gate, \
            RemoteExecutor(transport=f"{gearmand.url}/{pool}", key=key, heartbeat_timeout=120) as ex:
        # (a long heartbeat timeout: the client must not give up on the silent worker first, however slow
        # the machine, so the replay refusal is what it hears)
        future = ex.submit(_ran_then_gate, str(effects), gate.address)
        gate.wait_started(1)
        proxy.cut()  # gearmand sees the worker go and queues the job again, while the call still runs

        def requeued() -> bool:
            status = [s for s in admin_status("127.0.0.1", gearmand.port) if s.function == f"remote_executor.{pool}"]
            return bool(status) and status[0].total == 1 and status[0].running == 0

        wait_for(requeued, what="gearmand to queue the job again")
        gate.release()
        assert future.result(timeout=60) == "done"
    assert lines_in(effects) == ["ran", "ran"]
    assert "refused by sec-worker-0: refused a replayed job" in caplog.text and "resubmitting it" in caplog.text


def _ran_then_gate(path: str, address: tuple[str, int]) -> str:
    append_line(path, "ran")
    return str(wait_at_gate(address, "held", "done"))


# --- forged results ----------------------------------------------------------------------------------------


def _forged_result(kind: str, key: bytes, job: Job, function: bytes, trap: str) -> bytes | bytearray:
    """What a rogue worker (or gearmand) sends back as the result of ``job``."""
    trap_parts = [pickle.dumps(("ok", _Trap(trap)))]  # a well-formed outcome envelope
    if kind == "garbage":
        return b"\x80\x05 not a result at all" + bytes(64)
    if kind == "unencrypted-pickle":
        return encode_bytes(Frame(Kind.RESULT, a=1, parts=trap_parts))
    identity = JobCodec(key, function).decode_job(job.payload).identity(function)  # as a captured result would
    codec = JobCodec(key, function)
    if kind == "result-of-another-job":
        other = JobIdentity(function, identity.executor_id, identity.task_id + 1, os.urandom(16))
        return codec.encode_result(Frame(Kind.RESULT, a=other.task_id, parts=trap_parts), other)
    if kind == "result-of-another-submission":  # same call, another job id
        other = JobIdentity(function, identity.executor_id, identity.task_id, os.urandom(16))
        return codec.encode_result(Frame(Kind.RESULT, a=identity.task_id, parts=trap_parts), other)
    if kind == "another-key":
        return JobCodec(b"rogue key", function).encode_result(Frame(Kind.RESULT, a=identity.task_id,
                                                                    parts=trap_parts), identity)
    sealed = bytearray(codec.encode_result(Frame(Kind.RESULT, a=identity.task_id, parts=trap_parts), identity))
    if kind == "tampered":
        sealed[-20] ^= 0x01
    return sealed  # "genuine": the control, the trap fires


@pytest.mark.parametrize("kind", ["garbage", "unencrypted-pickle", "result-of-another-job",
                                  "result-of-another-submission", "another-key", "tampered", "genuine"])
def test_a_forged_result_fails_only_its_future_and_is_never_unpickled(
    pool_url: str, key: bytes, tmp_path: Path, kind: str, start_workers: Callable[..., Supervisor]
) -> None:
    trap = tmp_path / "unpickled"
    function = address_and_function(pool_url)[2]
    with RemoteExecutor(transport=pool_url, key=key) as ex:
        with rogue_worker(pool_url) as rogue:
            forged = ex.submit(pow, 2, 10)
            job = rogue.grab()
            rogue.complete(job, _forged_result(kind, key, job, function, str(trap)))
            error = forged.exception(timeout=30)
        if kind == "genuine":  # control: a result sealed for this very job is opened and unpickled
            assert error is None and forged.result() is None and trap.exists()
            return
        assert isinstance(error, BrokenExecutor), error
        assert "the result of this call was refused, unread" in str(error)
        assert not trap.exists()
        start_workers(pool_url, key)  # only that future failed: the executor goes on
        assert ex.submit(pow, 2, 11).result(timeout=30) == 2048


# --- keys on one side only, the embedded cluster --------------------------------------------------------------


@pytest.mark.parametrize("client_keyed", [True, False], ids=["client-keyed", "worker-keyed"])
def test_a_key_on_one_side_only_is_a_clear_refusal(pool_url: str, key: bytes, client_keyed: bool,
                                                   start_workers: Callable[..., Supervisor]) -> None:
    start_workers(pool_url, None if client_keyed else key)
    expected = "this worker has none" if client_keyed else "the job is not encrypted"
    with RemoteExecutor(transport=pool_url, key=key if client_keyed else None, insecure=not client_keyed) as ex, \
            pytest.raises(BrokenExecutor, match="refused a job it cannot authenticate") as info:
        ex.submit(pow, 2, 2).result(timeout=30)
    assert expected in str(info.value)


def test_the_embedded_cluster_encrypts_every_job() -> None:
    marker = f"MARKER-{os.urandom(8).hex()}"
    with RemoteExecutor(max_workers=1, transport="gearman") as ex:
        assert ex.submit(pow, 2, 2).result(timeout=30) == 4
        cluster = ex.transport.cluster  # type: ignore[attr-defined]
        cluster.supervisor.stop()  # its worker goes: the next job waits in gearmand for whoever grabs it
        url = f"{cluster.url}/default"
        with rogue_worker(url) as rogue:
            future = ex.submit(shout_back, marker)
            job = rogue.grab()
            assert is_sealed(job.payload) and marker.encode() not in job.payload
            with pytest.raises(AuthenticationError):
                JobCodec(None, function_name("default")).decode_job(job.payload)
            opened = JobCodec(cluster.server.key, function_name("default")).decode_job(job.payload)
            assert marker.encode() in b"".join(bytes(p) for p in opened.frame.parts)  # control
            rogue.complete(job, b"garbage")
            with pytest.raises(BrokenExecutor, match="refused, unread"):
                future.result(timeout=30)


def test_without_cryptography_a_key_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch, gearmand: GearmandProcess
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    started: list[object] = []
    monkeypatch.setattr(GearmandProcess, "start", lambda self: started.append(self))
    hint = r"pip install 'remote-executor\[crypto\]'"
    with pytest.raises(CryptographyMissingError, match=rf'transport="gearman".*{hint}'):
        RemoteExecutor(max_workers=1, transport="gearman")
    assert started == []  # failed before any gearmand or worker was started
    with pytest.raises(CryptographyMissingError, match=hint):
        GearmanClientTransport(gearmand.url, Options(key=b"k"))
    with pytest.raises(CryptographyMissingError, match=hint):
        GearmanWorker(WorkerSettings(url=gearmand.url, key=b"k"), WorkerCore())
    GearmanClientTransport(gearmand.url, Options()).close()  # without a key nothing needs cryptography


# --- sans I/O: the job codec and the replay guard ---------------------------------------------------------------


def test_job_ttl_is_checked() -> None:
    for bad in (0, -1, "300", True, 86_401):
        with pytest.raises(ValueError, match="job_ttl"):
            GearmanClientTransport("gearman://127.0.0.1:1", Options(extra={"job_ttl": bad}))


def test_each_submission_of_a_call_gets_its_own_job_id_and_expiry() -> None:
    function = function_name("default")
    codec = JobCodec(b"k", function)
    call, session = Call(3, dumps(("call", pow, (2, 2), {}))), Session(9, None, 0)
    one, two = (codec.encode_job(call, session, 1000.0 + i) for i in range(2))
    assert one.job_id != two.job_id and len(one.job_id) == 16
    opened = codec.decode_job(two.payload)
    assert (opened.job_id, opened.expiry, opened.frame.a, opened.frame.b) == (two.job_id, 1001.0, 3, 9)


def test_replay_guard_admits_once_until_expiry() -> None:
    guard = ReplayGuard()
    assert guard.admit(b"a" * 16, expiry=110.0, now=100.0) is None
    assert "refused a replayed job" in str(guard.admit(b"a" * 16, expiry=110.0, now=105.0))
    assert guard.admit(b"b" * 16, expiry=110.0, now=105.0) is None
    assert "refused an expired job" in str(guard.admit(b"a" * 16, expiry=110.0, now=111.0))
    assert len(guard) == 0  # forgotten once expired: a replay now is refused as expired
    assert "more than a day" in str(guard.admit(b"c" * 16, expiry=100.0 + 2 * 86_400, now=100.0))


def test_replay_guard_stays_bounded_and_safe_under_a_flood() -> None:
    guard = ReplayGuard(capacity=100)
    for i in range(1000):  # one job id per 0.01 s, each expiring 60 s after it was made
        now = 100.0 + i / 100
        assert guard.admit(i.to_bytes(16, "big"), expiry=now + 60, now=now) is None
        assert len(guard) <= 100
    now = 110.0
    for i in range(1000):  # every id again: refused, as a replay or as too old to be checked
        refusal = guard.admit(i.to_bytes(16, "big"), expiry=100.0 + i / 100 + 60, now=now)
        assert refusal is not None and ("replayed" in refusal or "older than the oldest" in refusal), i
    assert guard.floor >= 160
    assert guard.admit(b"new".ljust(16), expiry=now + 60, now=now) is None  # a fresh job still runs


def test_what_a_rogue_worker_says_is_escaped_and_cut_in_the_clients_logs_and_errors(
        pool_url: str, key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who reaches gearmand can register for a pool and grab a keyed client's jobs (without the key it
    cannot open them). The refusal text and worker names it sends back went raw into the client's log lines
    and errors: a forged CRITICAL line, terminal escapes, thousands of characters."""
    caplog.set_level(logging.INFO, logger="remote_executor")
    (host, port), pool = parse_url(pool_url)[0][0], parse_url(pool_url)[1]
    forged = "\nCRITICAL remote_executor FORGED LOG LINE \x1b[31mred\x1b[0m"
    with GearmanWorkerConnection(host, port, [function_name(pool)]) as rogue, \
            RemoteExecutor(transport=pool_url, key=key, max_retries=1) as ex:
        future = ex.submit(pow, 2, 3)
        for said in (f"refused by evil{forged}: {REPLAYED} " + "X" * 5000,  # resubmitted once
                     f"started by evil{forged}" + "Y" * 5000):  # then "started", and failed as lost
            job = rogue.grab_job(timeout=30)
            assert job is not None
            rogue.send_data(job.handle, said.encode())
            rogue.fail(job.handle)
        with pytest.raises(WorkerLostError) as failed:
            future.result(timeout=30)
    texts = [str(failed.value), *(record.getMessage() for record in caplog.records)]
    assert any("evil" in text for text in texts[1:]), texts  # the refusal was logged...
    for text in texts:  # ...on one line, without the escape, cut
        assert "\n" not in text and "\x1b" not in text and "XXXXXXXXXX" * 50 not in text, text[:300]
        assert "Y" * 500 not in text, text[:300]
