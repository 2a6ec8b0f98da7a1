"""Side-by-side benchmark: ProcessPoolExecutor(max_workers=2) against RemoteExecutor with 2 local workers.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py [--quick] [--transports tcp,zmq,gearman,tcp-server,zmq-server] [--output ...]

Every executor is measured in the same run, interleaved round by round (each round of each executor in a fresh
child process, so one executor's memory or threads cannot slow the next). The parent prints one markdown table
(rows = metrics, columns = executors, then one "x PPE" ratio column per transport, oriented so that > 1 is better
than ProcessPoolExecutor on every row) and writes it to ``--output``. A transport that cannot start shows
``n/a (<reason>)`` in its cells; the script does not crash on it.

See docs/benchmarks.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass, field
from typing import Any

from _bytecode import compile_packages
from _tasks import echo, noop  # benchmarks/ is this script's directory: sys.path[0], also in every worker

WORKERS = 2
MB = 1_000_000  # MB/s and payload sizes are in decimal megabytes
PPE = "PPE"
EMBEDDED = ("tcp", "zmq", "gearman")  # RemoteExecutor(transport=...): a cluster of its own
STANDALONE = {"tcp-server": "tcp", "zmq-server": "zmq"}  # a `remote-executor server` + 2 CLI workers
ALL_TRANSPORTS = (*EMBEDDED, *STANDALONE)
LOKY = "loky"  # loky's ProcessPoolExecutor, a column of its own when loky is installed (pip install loky)
REFERENCES = (PPE, LOKY)  # the executors we compare with: no prefetch, their own module to import

# --- what is measured -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """How much work each measurement does; ``--quick`` shrinks everything for a smoke run."""

    rounds: int  # child processes per executor, interleaved across executors
    calls: int  # submit-all and map items
    warmup_calls: int
    sequential: int  # submit(f, i).result() round trips per round
    sequential_warmup: int
    payload_runs: dict[int, int]  # payload size in MB -> timed runs per round
    warm_starts: int  # in-process start-up/shutdown cycles per round
    cold_starts: int  # fresh subprocesses per executor for the cold start-up
    imports: int  # fresh interpreters importing remote_executor, and as many concurrent.futures
    prefetch_sequential: int  # sequential round trips of the prefetch=1 executor per round
    metric_timeout: float  # seconds one metric may take before it is reported as failed
    child_timeout: float  # seconds one child process may take before it is killed


FULL = Params(rounds=3, calls=20_000, warmup_calls=1_000, sequential=2_000, sequential_warmup=200,
              payload_runs={1: 5, 10: 5, 100: 3}, warm_starts=5, cold_starts=5, imports=9,
              prefetch_sequential=1_000, metric_timeout=300.0, child_timeout=1_200.0)
QUICK = Params(rounds=1, calls=2_000, warmup_calls=200, sequential=200, sequential_warmup=50,
               payload_runs={1: 2, 10: 1, 100: 1}, warm_starts=2, cold_starts=1, imports=3,
               prefetch_sequential=100, metric_timeout=90.0, child_timeout=200.0)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


def _payload_key(size_mb: int) -> str:
    return f"payload_{size_mb}mb"


METRICS: tuple[Metric, ...] = (
    Metric("submit_all", "submit-all throughput (N no-op submits, then all results)", "calls/s", True),
    Metric("submit_all_main", "submit-all, a function defined in `__main__` (N calls)", "calls/s", True),
    Metric("prefetch_submit_all", "submit-all with prefetch=1 (N calls)", "calls/s", True),
    Metric("prefetch_seq_p50", "sequential round trip p50 with prefetch=1", "µs", False),
    Metric("map_c1", "map, chunksize=1", "items/s", True),
    Metric("map_c100", "map, chunksize=100", "items/s", True),
    Metric("seq_p50", "sequential round trip p50", "µs", False),
    Metric("seq_p99", "sequential round trip p99", "µs", False),
    Metric(_payload_key(1), "1 MB round trip", "MB/s", True),
    Metric(_payload_key(10), "10 MB round trip", "MB/s", True),
    Metric(_payload_key(100), "100 MB round trip", "MB/s", True),
    Metric("startup_cold", "start-up to first result, cold (fresh process, imports included)", "ms", False),
    Metric("startup_warm", "start-up to first result, warm (in-process, after imports)", "ms", False),
    Metric("shutdown", "shutdown of an idle executor after work", "ms", False),
    Metric("import", "import time, what a user writes (`from remote_executor import RemoteExecutor`; "
           "PPE: `import concurrent.futures`; loky: `from loky import get_reusable_executor`), fresh interpreter",
           "ms", False),
    Metric("import_pool", "import time of the executor class (PPE: `from concurrent.futures import "
           "ProcessPoolExecutor`; RemoteExecutor and loky as above), fresh interpreter", "ms", False),
)
# What a standalone server's column does not measure: its start-up is the server's and the workers'.
NOT_STANDALONE = frozenset({"startup_cold"})


def noop_main(x: int) -> int:
    """``noop`` defined in ``__main__``: RemoteExecutor ships it by value, ProcessPoolExecutor by reference."""
    return x


_server_url: str | None = None  # the standalone server of this child, if its column has one


def make_executor(name: str, **options: Any) -> Executor:
    if name == PPE:
        return ProcessPoolExecutor(max_workers=WORKERS)
    if name == LOKY:
        import loky

        executor: Executor = loky.ProcessPoolExecutor(max_workers=WORKERS)
        return executor
    from remote_executor import RemoteExecutor

    if name in STANDALONE:
        assert _server_url is not None
        return RemoteExecutor(WORKERS, _server_url, **options)
    return RemoteExecutor(max_workers=WORKERS, transport=name, **options)


@contextlib.contextmanager
def executor_for(name: str) -> Iterator[Executor]:
    """An executor that is shut down whatever happens (cancelling what is left if the body failed)."""
    ex = make_executor(name)
    ok = False
    try:
        yield ex
        ok = True
    finally:
        ex.shutdown(wait=ok, cancel_futures=not ok)


def short_reason(exc: BaseException, limit: int = 160) -> str:
    # concurrent.futures timeouts carry no message
    if isinstance(exc, (TimeoutError, FuturesTimeoutError)) and not str(exc):
        return "TimeoutError: no result within the time limit"
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the child: one round of one executor -------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("metric took longer than its time limit")
        return left


def _submit_all(ex: Executor, n: int, deadline: _Deadline, fn: Callable[[int], int] = noop) -> float:
    t0 = time.perf_counter()
    futures = [ex.submit(fn, i) for i in range(n)]
    for future in futures:
        future.result(timeout=deadline.left())
    elapsed = time.perf_counter() - t0
    return n / elapsed


def _map(ex: Executor, n: int, chunksize: int, deadline: _Deadline) -> float:
    t0 = time.perf_counter()
    count = sum(1 for _ in ex.map(noop, range(n), chunksize=chunksize, timeout=deadline.left()))
    elapsed = time.perf_counter() - t0
    if count != n:
        raise RuntimeError(f"map returned {count} results for {n} items")
    return n / elapsed


def _sequential(ex: Executor, n: int, warmup: int, deadline: _Deadline) -> list[float]:
    for i in range(warmup):
        ex.submit(noop, i).result(timeout=deadline.left())
    samples: list[float] = []
    perf = time.perf_counter
    for i in range(n):
        t0 = perf()
        ex.submit(noop, i).result(timeout=deadline.left())
        samples.append((perf() - t0) * 1e6)
    return samples


def _payload(ex: Executor, size_mb: int, runs: int, deadline: _Deadline) -> list[float]:
    """MB/s of (bytes sent + bytes received) / time, one sample per run."""
    size = size_mb * MB
    payload = bytes(size)
    samples: list[float] = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            result = ex.submit(echo, payload).result(timeout=deadline.left())
            elapsed = time.perf_counter() - t0
            received = len(result)
            del result  # free the 100 MB copy before the next run
            if received != size:
                raise RuntimeError(f"sent {size} bytes, got {received} back")
            samples.append(2 * size / MB / elapsed)
    finally:
        del payload
        gc.collect()
    return samples


def _warm_cycles(name: str, cycles: int, warmup_calls: int, deadline: _Deadline) -> tuple[list[float], list[float]]:
    """Construct -> first result (start-up) -> some work -> shutdown(wait=True) (timed), in this process."""
    starts: list[float] = []
    stops: list[float] = []
    for cycle in range(cycles + 1):  # cycle 0 warms up imports and caches and is not counted
        t0 = time.perf_counter()
        ex = make_executor(name)
        try:
            ex.submit(noop, 0).result(timeout=deadline.left())
            t1 = time.perf_counter()
            for future in [ex.submit(noop, i) for i in range(warmup_calls)]:
                future.result(timeout=deadline.left())
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        t2 = time.perf_counter()
        ex.shutdown(wait=True)
        t3 = time.perf_counter()
        if cycle:
            starts.append((t1 - t0) * 1e3)
            stops.append((t3 - t2) * 1e3)
    return starts, stops


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not listen on port {port} within {seconds:g} s")
        time.sleep(0.02)  # polling a port another process opens: nothing to wait on instead


@contextlib.contextmanager
def standalone_server(name: str) -> Iterator[str]:
    """A ``remote-executor server`` on a free loopback port and ``remote-executor worker --processes 2``
    for it, with a fresh shared key; its URL. Both are stopped (SIGTERM, then SIGKILL) on the way out."""
    key = secrets.token_hex(16)
    os.environ["REMOTE_EXECUTOR_KEY"] = key  # the client in this process reads it too
    port = _free_port()
    url = f"{STANDALONE[name]}://127.0.0.1:{port}"
    here = os.path.dirname(os.path.abspath(__file__))  # the workers import _tasks from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
    cli = [sys.executable, "-m", "remote_executor.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen([*cli, "server", url, "--log-level", "WARNING"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        procs.append(server)
        _wait_listening(port, server, 30.0)
        procs.append(subprocess.Popen([*cli, "worker", url, "--processes", str(WORKERS), "--log-level", "WARNING"],
                                      env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        yield url
    finally:
        for proc in reversed(procs):  # the workers first: they drain, then the server goes
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_child(name: str, params: Params) -> dict[str, Any]:
    """One round of every in-process metric for one executor. Raw samples per metric, or an error string."""
    global _server_url
    if name not in STANDALONE:
        return _run_child(name, params)
    try:
        with standalone_server(name) as url:
            _server_url = url
            return _run_child(name, params)
    except Exception as exc:  # the server or its workers did not start
        return {"samples": {}, "errors": {}, "start_error": short_reason(exc)}


class NoPrefetchError(Exception):
    """This version of RemoteExecutor has no ``prefetch=`` keyword."""


NO_PREFETCH = "no prefetch= keyword"


def _prefetch_rows(name: str, params: Params, deadline: _Deadline) -> dict[str, list[float]]:
    """submit-all and sequential p50 of ``RemoteExecutor(..., prefetch=1)``; ProcessPoolExecutor always
    queues a call ahead per worker, so its column repeats its plain rows here, measured the same way."""
    try:
        ex = make_executor(name) if name in REFERENCES else make_executor(name, prefetch=1)
    except TypeError as exc:
        if "prefetch" in str(exc):
            raise NoPrefetchError from None
        raise
    try:
        for future in [ex.submit(noop, i) for i in range(params.warmup_calls)]:
            future.result(timeout=deadline.left())
        rate = _submit_all(ex, params.calls, deadline)
        seq = _sequential(ex, params.prefetch_sequential, params.sequential_warmup, deadline)
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return {"prefetch_submit_all": [rate], "prefetch_seq": seq}


def _run_child(name: str, params: Params) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"samples": samples, "errors": errors}
    ex: Executor | None = None

    def start() -> Executor:
        new = make_executor(name)
        try:
            deadline = _Deadline(params.metric_timeout)
            new.submit(noop, 0).result(timeout=deadline.left())
            for future in [new.submit(noop, i) for i in range(params.warmup_calls)]:
                future.result(timeout=deadline.left())
            list(new.map(noop, range(params.warmup_calls), chunksize=10, timeout=deadline.left()))
            new.submit(echo, bytes(MB)).result(timeout=deadline.left())
        except BaseException:
            new.shutdown(wait=False, cancel_futures=True)
            raise
        return new

    def measure(keys: Sequence[str], body: Callable[[Executor, _Deadline], dict[str, list[float]]]) -> None:
        nonlocal ex
        try:
            if ex is None:
                ex = start()
            got = body(ex, _Deadline(params.metric_timeout))
        except Exception as exc:
            for key in keys:
                errors[key] = short_reason(exc)
            if ex is not None:  # the executor may be broken: replace it for the next metric
                ex.shutdown(wait=False, cancel_futures=True)
                ex = None
            gc.collect()
            return
        for key, values in got.items():
            samples.setdefault(key, []).extend(values)

    try:
        try:
            ex = start()
        except Exception as exc:
            out["start_error"] = short_reason(exc)
            return out
        n = params.calls
        measure(["submit_all"], lambda e, d: {"submit_all": [_submit_all(e, n, d)]})
        measure(["submit_all_main"], lambda e, d: {"submit_all_main": [_submit_all(e, n, d, noop_main)]})
        measure(["map_c1"], lambda e, d: {"map_c1": [_map(e, n, 1, d)]})
        measure(["map_c100"], lambda e, d: {"map_c100": [_map(e, n, 100, d)]})

        def sequential(e: Executor, d: _Deadline) -> dict[str, list[float]]:
            return {"seq": _sequential(e, params.sequential, params.sequential_warmup, d)}

        measure(["seq_p50", "seq_p99"], sequential)
        for size_mb, runs in params.payload_runs.items():
            def payload(e: Executor, d: _Deadline, size_mb: int = size_mb, runs: int = runs) -> dict[str, list[float]]:
                return {_payload_key(size_mb): _payload(e, size_mb, runs, d)}

            measure([_payload_key(size_mb)], payload)

        # The executor that did all the work above, now idle: its shutdown is the first shutdown sample.
        if ex is not None:
            t0 = time.perf_counter()
            ex.shutdown(wait=True)
            samples.setdefault("shutdown", []).append((time.perf_counter() - t0) * 1e3)
            ex = None
        try:
            for key, values in _prefetch_rows(name, params, _Deadline(params.metric_timeout)).items():
                samples.setdefault(key, []).extend(values)
        except Exception as exc:
            reason = NO_PREFETCH if isinstance(exc, NoPrefetchError) else short_reason(exc)
            errors["prefetch_submit_all"] = errors["prefetch_seq_p50"] = reason
        try:
            starts, stops = _warm_cycles(name, params.warm_starts, 100, _Deadline(params.metric_timeout))
            samples.setdefault("startup_warm", []).extend(starts)
            samples.setdefault("shutdown", []).extend(stops)
        except Exception as exc:
            errors["startup_warm"] = short_reason(exc)
    finally:
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
    return out


# --- the cold start-up: a fresh interpreter per measurement -------------------------------------------------

_COLD_SCRIPT = """\
import time
t0 = time.perf_counter()
NAME = {name!r}
if NAME == "PPE":
    from concurrent.futures import ProcessPoolExecutor
    ex = ProcessPoolExecutor(max_workers={workers})
elif NAME == "loky":
    from loky import ProcessPoolExecutor
    ex = ProcessPoolExecutor(max_workers={workers})
else:
    from remote_executor import RemoteExecutor
    ex = RemoteExecutor(max_workers={workers}, transport=NAME)
try:
    ex.submit(abs, -1).result(timeout=60)
    t1 = time.perf_counter()
finally:
    ex.shutdown(wait=True)
print("COLD_MS", (t1 - t0) * 1e3)
"""


# --- the parent: runs children, aggregates, renders -----------------------------------------------------------


@dataclass
class Column:
    name: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    down: str | None = None  # the executor could not start at all


def _run_isolated(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a child in its own session; on a timeout kill that session (the child and what it started)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    except BaseException:  # Ctrl-C in the parent: take the child's session down with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_round(column: Column, params: Params, quick: bool) -> str | None:
    """Run one round in a child process and merge its samples; return why the executor did not start, if so."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        args = [sys.executable, os.path.abspath(__file__), "--child", column.name, "--child-output", result_path]
        if quick:
            args.append("--quick")
        try:
            proc = _run_isolated(args, params.child_timeout)
        except subprocess.TimeoutExpired:
            column.errors["*"] = f"timed out after {params.child_timeout:.0f} s"
            return None
        if proc.returncode != 0 or not os.path.exists(result_path):
            reason = f"child exited {proc.returncode}: {_last_line(proc.stderr)}"
            column.errors["*"] = reason if len(reason) <= 70 else reason[:67] + "..."
            return None
        with open(result_path, encoding="utf-8") as fh:
            out = json.load(fh)
    if "start_error" in out:
        column.down = str(out["start_error"])
        return column.down
    for key, values in out["samples"].items():
        column.samples.setdefault(key, []).extend(values)
    for key, reason in out["errors"].items():
        column.errors.setdefault(key, reason)
    return None


_IMPORT_SCRIPT = """\
import time
t0 = time.perf_counter()
{statement}
print("IMPORT_MS", (time.perf_counter() - t0) * 1e3)
"""


# What each column's user imports: RemoteExecutor's package alone (``import remote_executor``) defers the
# executor to first use, so it is not what a user pays; the class is. Each statement is timed once per round
# and shared by the rows that show it.
_STATEMENTS = {"cf": "import concurrent.futures", "pool": "from concurrent.futures import ProcessPoolExecutor",
               "remote": "from remote_executor import RemoteExecutor", LOKY: "from loky import get_reusable_executor"}
_PPE_IMPORT = {"import": "cf", "import_pool": "pool"}  # the PPE column's statement in each row


def run_imports(columns: list[Column], params: Params) -> None:
    """Import times (see ``_STATEMENTS``), each in a fresh interpreter, alternating between the statements."""
    wanted = [which for which in _STATEMENTS if which != LOKY or any(c.name == LOKY for c in columns)]
    got: dict[str, list[float]] = {which: [] for which in wanted}
    error: dict[str, str] = {}
    for _ in range(params.imports):
        for which in wanted:
            try:
                proc = _run_isolated([sys.executable, "-c", _IMPORT_SCRIPT.format(statement=_STATEMENTS[which])],
                                     60.0)
            except subprocess.TimeoutExpired:
                error[which] = "timed out after 60 s"
                continue
            marker = [line for line in proc.stdout.splitlines() if line.startswith("IMPORT_MS ")]
            if proc.returncode != 0 or not marker:
                error[which] = _last_line(proc.stderr)[:70]
                continue
            got[which].append(float(marker[-1].split()[1]))
    for key, ppe in _PPE_IMPORT.items():
        for column in columns:
            which = ppe if column.name == PPE else LOKY if column.name == LOKY else "remote"
            if got[which]:
                column.samples[key] = got[which]
            elif which in error:
                column.errors[key] = error[which]


def run_cold(column: Column, params: Params) -> None:
    if column.name in STANDALONE:
        return  # not measured: see NOT_STANDALONE
    script = _COLD_SCRIPT.format(name=column.name, workers=WORKERS)
    for _ in range(params.cold_starts):
        try:
            proc = _run_isolated([sys.executable, "-c", script], 120.0)
        except subprocess.TimeoutExpired:
            column.errors.setdefault("startup_cold", "timed out after 120 s")
            return
        marker = [line for line in proc.stdout.splitlines() if line.startswith("COLD_MS ")]
        if proc.returncode != 0 or not marker:
            reason = _last_line(proc.stderr)
            column.errors.setdefault("startup_cold", reason if len(reason) <= 70 else reason[:67] + "...")
            return
        column.samples.setdefault("startup_cold", []).append(float(marker[-1].split()[1]))


def value_of(column: Column, key: str) -> float | None:
    if key in ("seq_p50", "seq_p99", "prefetch_seq_p50"):
        seq = column.samples.get("prefetch_seq" if key.startswith("prefetch") else "seq")
        if not seq:
            return None
        ordered = sorted(seq)
        q = 0.50 if key == "seq_p50" else 0.99
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    values = column.samples.get(key)
    return statistics.median(values) if values else None


def fmt(value: float) -> str:
    if value >= 1_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell_na(reason: str) -> str:
    return f"n/a ({reason.replace('|', '/')})"


# The targets, side by side with ProcessPoolExecutor(2) in one run, as ratios in the table's orientation
# (> 1 is better than PPE): a latency at most 0.6x PPE's is a ratio of at least 1/0.6.
# metric -> [(columns it applies to, least ratio, how it is written)]
_EMBEDDED_DEFAULT = ("tcp", "zmq")  # RemoteExecutor()'s own cluster; zmq: the same cluster over ZeroMQ
_ALL_REMOTE = (*ALL_TRANSPORTS,)
TARGETS: dict[str, list[tuple[tuple[str, ...], float, str]]] = {
    "submit_all": [(_EMBEDDED_DEFAULT, 2.0, "≥2x"), (tuple(STANDALONE), 1.0, "≥1x"), (("gearman",), 0.6, "≥0.6x")],
    "seq_p50": [(_EMBEDDED_DEFAULT, 1 / 0.6, "≤0.6x PPE's µs"), (tuple(STANDALONE), 1.0, "≤1x PPE's µs"),
                (("gearman",), 1 / 1.5, "≤1.5x PPE's µs")],
    "submit_all_main": [(_EMBEDDED_DEFAULT, 1.8, "≥1.8x")],
    _payload_key(100): [(_EMBEDDED_DEFAULT, 1.5, "≥1.5x"), (tuple(STANDALONE), 1.5, "≥1.5x"),
                        (("gearman",), 0.8, "≥0.8x")],
    "startup_cold": [(_EMBEDDED_DEFAULT, 0.5, "≤2x PPE's ms")],
    "prefetch_submit_all": [(_ALL_REMOTE, 3.0, "≥3x")],
    "import": [(_ALL_REMOTE, 0.5, "≤2x `import concurrent.futures`'")],  # one package: the first column says it
}
ZMQ_OF_TCP = 1.3  # zmq within 1.3x of tcp on the tiny-call rows
_TINY_CALL_ROWS = ("submit_all", "submit_all_main", "seq_p50", "prefetch_submit_all")


def targets_for(key: str, values: dict[str, float | None], ratios: dict[str, float | None]) -> list[str]:
    """The targets of one row, each written as met or MISSED (n/a without a value)."""
    def mark(ok: bool) -> str:
        return "**met**" if ok else "**MISSED**"

    out: list[str] = []
    for names, need, text in TARGETS.get(key, []):
        for name in names:
            if name in ratios:
                r = ratios[name]
                out.append(f"{name} {text}: " + ("n/a" if r is None else mark(r >= need)))
                if key == "import":
                    break
    if key in _TINY_CALL_ROWS:
        for zmq, tcp in (("zmq", "tcp"), ("zmq-server", "tcp-server")):
            if zmq in ratios and tcp in ratios:
                rz, rt = ratios[zmq], ratios[tcp]
                out.append(f"{zmq} within {ZMQ_OF_TCP:g}x of {tcp}: "
                           + ("n/a" if rz is None or rt is None else mark(rz * ZMQ_OF_TCP >= rt)))
    return out


def render(columns: list[Column], params: Params, command: str, started: _dt.datetime, seconds: float) -> str:
    ppe = columns[0]
    transports = columns[1:]
    header = ["metric", "unit", PPE, *(c.name for c in transports), *(f"{c.name} x PPE" for c in transports),
              "targets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 3) + ["---"])
             + "|"]
    for metric in METRICS:
        label = metric.label.replace("N no-op", f"{params.calls:,} no-op")
        label = label.replace("(N calls", f"({params.calls:,} calls")
        if metric.key.startswith("map"):
            label += f" ({params.calls:,} items)"
        if metric.key.startswith("seq"):
            label += f" ({params.sequential:,} calls/round)"
        if metric.key == "prefetch_seq_p50":
            label += f" ({params.prefetch_sequential:,} calls/round)"
        cells = [label, metric.unit]
        values: dict[str, float | None] = {}
        ratios: dict[str, float | None] = {}
        ppe_value = value_of(ppe, metric.key)
        for column in columns:
            lookup = "seq" if metric.key.startswith("seq") else metric.key
            value = None if column.down else value_of(column, metric.key)
            if column is not ppe:
                values[column.name] = value
            if column.name in STANDALONE and metric.key in NOT_STANDALONE:
                cells.append("—")
            elif column.down:
                cells.append(_cell_na(f"did not start: {column.down.split(':')[0]}"))
            elif value is not None:
                cells.append(fmt(value))
            else:
                reason = column.errors.get(lookup) or column.errors.get(metric.key) or column.errors.get("*")
                cells.append(_cell_na(reason or "no samples"))
        for column in transports:
            value = values[column.name]
            if column.name in STANDALONE and metric.key in NOT_STANDALONE:
                ratios[column.name] = None
                cells.append("—")
                continue
            if value is None or ppe_value is None or value == 0 or ppe_value == 0:
                ratios[column.name] = None
                cells.append("n/a")
                continue
            ratio = value / ppe_value if metric.higher_is_better else ppe_value / value
            ratios[column.name] = ratio
            cells.append(f"{ratio:.2f}x")
        cells.append("; ".join(targets_for(metric.key, values, ratios)))
        lines.append("| " + " | ".join(cells) + " |")

    rounds = params.rounds
    payloads = ", ".join(f"{mb} MB x{runs * rounds}" for mb, runs in params.payload_runs.items())
    footer = [
        "",
        "- **x PPE** is oriented so that **> 1 means better than ProcessPoolExecutor on every row**: "
        "value/PPE for throughputs (calls/s, items/s, MB/s), PPE/value for latencies and times (µs, ms).",
        f"- Medians over {rounds} round(s) per executor, interleaved across executors, each round in a fresh child "
        f"process after a warm-up ({params.warmup_calls:,} calls, a small map, one 1 MB round trip). Throughput rows: "
        f"median of {rounds} round(s). Sequential: p50/p99 over all {rounds * params.sequential:,} timed calls "
        f"({params.sequential_warmup} warm-up calls per round). Payload MB/s = (bytes sent + bytes received) / time, "
        f"MB = 10^6 bytes, bytes payloads, median of {payloads} runs. Cold start-up: median of {params.cold_starts} "
        f"fresh interpreters per executor, timed from before the import to the first result, with the package "
        f"byte-compiled first as an install leaves it. Warm start-up: median "
        f"of {rounds * params.warm_starts} in-process constructions (after one untimed cycle). Shutdown: "
        f"`shutdown(wait=True)` of an idle executor after work, median of {rounds * (params.warm_starts + 1)}.",
        f"- Executors: `ProcessPoolExecutor(max_workers={WORKERS})` and `RemoteExecutor(max_workers={WORKERS}, "
        "transport=...)` (embedded: job server in the client process + 2 local worker processes). Clock: "
        "`time.perf_counter`.",
        "- Targets (x PPE, so a latency ≤ 0.6x PPE's is ≥ 1.67x here): embedded (tcp, zmq) submit-all ≥ 2x, "
        "sequential p50 ≤ 0.6x PPE's, `__main__` submit-all ≥ 1.8x, 100 MB ≥ 1.5x, cold start-up ≤ 2x PPE's; "
        "standalone server (tcp-server, zmq-server) submit-all ≥ 1x, sequential p50 ≤ 1x, 100 MB ≥ 1.5x; gearman "
        "submit-all ≥ 0.6x, sequential p50 ≤ 1.5x, 100 MB ≥ 0.8x; prefetch=1 submit-all ≥ 3x (any transport); "
        "import ≤ 2x `import concurrent.futures`' (for `from remote_executor import RemoteExecutor`); "
        "zmq within 1.3x of tcp on the tiny-call rows.",
        "- Standalone columns: `remote-executor server URL` and `remote-executor worker URL --processes 2` on "
        "this machine, the client in the benchmark's child; their cold start-up is not measured (—). "
        "Import time: the same package for every RemoteExecutor column, measured once.",
        f"- Machine: nproc={_nproc()}, Python {platform.python_version()} ({platform.python_implementation()}), "
        f"`{platform.platform()}`; {_versions()}.",
        *(f"- {c.name} did not start: {c.down}" for c in columns if c.down),
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; whole run took {seconds:.0f} s.",
        f"- Command: `{command}`",
    ]
    return "\n".join(lines + footer) + "\n"


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _versions() -> str:
    parts: list[str] = []
    try:
        import remote_executor

        parts.append(f"remote_executor {remote_executor.__version__}")
    except Exception:  # pragma: no cover - the package is installed where this runs
        parts.append("remote_executor not importable")
    with contextlib.suppress(Exception):
        import cloudpickle

        parts.append(f"cloudpickle {cloudpickle.__version__}")
    with contextlib.suppress(Exception):
        import zmq

        parts.append(f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})")
    with contextlib.suppress(Exception):
        out = subprocess.run(["gearmand", "--version"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            parts.append(out.stdout.strip().splitlines()[0].split(" - ")[0])
    return ", ".join(parts)


def _command() -> str:
    python = sys.executable
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(python)
        if not rel.startswith(".."):
            python = rel
    return shlex.join([python, *sys.argv])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, one round: a smoke run")
    parser.add_argument("--transports", default=",".join(ALL_TRANSPORTS),
                        help="comma-separated RemoteExecutor transports to compare with ProcessPoolExecutor")
    parser.add_argument("--output", default=None,
                        help="where to write the markdown table (default: benchmarks/results.md for a full run; "
                             "a --quick run only prints it, so it never replaces the measured table)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.output is None and not args.quick:
        args.output = "benchmarks/results.md"

    if args.child:
        out = run_child(args.child, params)
        with open(args.child_output, "w", encoding="utf-8") as fh:
            json.dump(out, fh)
        return 0

    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in transports if t not in ALL_TRANSPORTS]
    if unknown:
        parser.error(f"unknown transport(s) {', '.join(unknown)}; choose from {', '.join(ALL_TRANSPORTS)}")
    command = _command()
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    loky_column = [Column(LOKY)] if importlib.util.find_spec("loky") is not None else []
    columns = [Column(PPE), *loky_column, *(Column(t) for t in transports)]
    for round_no in range(1, params.rounds + 1):
        for column in columns:
            if column.down:
                continue
            print(f"[bench] round {round_no}/{params.rounds}: {column.name} ...", file=sys.stderr, flush=True)
            down = run_round(column, params, args.quick)
            if down:
                print(f"[bench]   {column.name} did not start: {down}", file=sys.stderr, flush=True)
    compile_packages("remote_executor", "cloudpickle")
    for column in columns:
        if not column.down:
            print(f"[bench] cold start-up: {column.name} ...", file=sys.stderr, flush=True)
            run_cold(column, params)
    print("[bench] import time ...", file=sys.stderr, flush=True)
    run_imports(columns, params)
    table = render(columns, params, command, started, time.perf_counter() - t_start)
    print(table)
    if args.output:
        directory = os.path.dirname(args.output)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
