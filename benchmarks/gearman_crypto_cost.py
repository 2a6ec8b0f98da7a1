"""What encrypting gearman jobs costs: ``gearman://`` with a key (every job and result sealed with AES-256-GCM)
against the same without a key (plaintext frames: loopback or a trusted network only).

Run from the repository root::

    .venv/bin/python benchmarks/gearman_crypto_cost.py [--quick] [--rounds N]

One private gearmand on 127.0.0.1 and two worker processes per mode (``remote-executor worker`` through the
supervisor, each mode in a pool of its own); the client is this process. Rounds alternate the modes so that
load from other users of the machine falls on both alike; each cell is the median over rounds. Rows:

- sequential round trip: one no-op call at a time, p50 and p99 per call (µs);
- 100 MB round trip: ``echo(100 MB of bytes)``, (sent + received) / time (MB/s) and seconds per call;
- the sealing itself, in this process: seal + open of one small job and of 100 MB, no network.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from remote_executor import RemoteExecutor
from remote_executor.security import key_to_env
from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import Call, Session
from remote_executor.transports.gearman.connection import admin_status
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.jobs import JobCodec, function_name
from remote_executor.wire.serialization import encode_call

MB = 1_000_000
WORKERS = 2
MODES = ("key (encrypted)", "no key (plaintext)")


def noop(x: int) -> int:
    return x


def echo(payload: bytes) -> bytes:
    return payload


def wait_registered(host: str, port: int, pool: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s.function == f"remote_executor.{pool}" and s.workers == count for s in admin_status(host, port)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not register for pool {pool} within {timeout}s")
        time.sleep(0.05)


def sequential(ex: RemoteExecutor, calls: int) -> tuple[float, float]:
    for i in range(max(calls // 10, 20)):  # warm-up
        ex.submit(noop, i).result()
    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        ex.submit(noop, i).result()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def payload_round_trip(ex: RemoteExecutor, size: int) -> tuple[float, float]:
    payload = bytes(size)
    t0 = time.perf_counter()
    result = ex.submit(echo, payload).result()
    elapsed = time.perf_counter() - t0
    if len(result) != size:
        raise RuntimeError(f"sent {size} bytes, got {len(result)}")
    return 2 * size / MB / elapsed, elapsed


def sealing_cost(size: int) -> dict[str, float]:
    """Seal + open in this process: one small job (µs) and ``size`` bytes (ms)."""
    function = function_name("bench")
    codec = JobCodec(os.urandom(32).hex().encode(), function)
    session = Session(1, None, 0)

    def once(call: Call) -> float:
        t0 = time.perf_counter()
        sealed = codec.encode_job(call, session, time.time() + 60)
        codec.decode_job(sealed.payload)
        return time.perf_counter() - t0

    small = Call(1, encode_call(noop, (1,), {}))
    small_us = statistics.median(once(small) for _ in range(2000)) * 1e6
    big_ms = statistics.median(once(Call(2, encode_call(echo, (bytes(size),), {}))) for _ in range(3)) * 1e3
    return {"small": small_us, "big": big_ms}


def median_of(rounds: list[dict[str, float]], name: str) -> float:
    return statistics.median(r[name] for r in rounds)


def run(rounds: int, calls: int, size: int) -> str:
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with GearmandProcess(threads=0) as gearmand:
        clusters: dict[str, tuple[str, bytes | None, Supervisor]] = {}
        try:
            for index, mode in enumerate(MODES):
                key = os.urandom(32).hex().encode() if index == 0 else None
                pool = f"crypto-cost-{index}"
                # No key means no key at all (--insecure): else both sides would share the per-user key.
                workers = Supervisor(f"{gearmand.url}/{pool}", WORKERS, env=key_to_env(key), name=f"bench-{index}",
                                     worker_args=() if key else ("--insecure",), capture_output=True)
                workers.start()
                clusters[mode] = (f"{gearmand.url}/{pool}", key, workers)
                wait_registered("127.0.0.1", gearmand.port, pool, WORKERS)
            for round_ in range(rounds):
                for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                    url, key, _ = clusters[mode]
                    with RemoteExecutor(transport=url, key=key, insecure=key is None, max_workers=WORKERS) as ex:
                        p50, p99 = sequential(ex, calls)
                        rate, seconds = payload_round_trip(ex, size)
                    results[mode].append({"p50": p50, "p99": p99, "rate": rate, "seconds": seconds})
                    print(f"round {round_ + 1}/{rounds} {mode}: p50 {p50:.0f} µs, p99 {p99:.0f} µs, "
                          f"{size // MB} MB round trip {rate:.0f} MB/s ({seconds:.2f} s)", file=sys.stderr, flush=True)
        finally:
            for _, _, workers in clusters.values():
                workers.stop()
    sealing = sealing_cost(size)
    return table(results, sealing, rounds, calls, size)


def table(results: dict[str, list[dict[str, float]]], sealing: dict[str, float], rounds: int, calls: int,
          size: int) -> str:
    keyed, plain = (results[mode] for mode in MODES)
    rows: list[tuple[str, str, Callable[[float], str], str]] = [
        ("sequential round trip p50", "µs", "{:,.0f}".format, "p50"),
        ("sequential round trip p99", "µs", "{:,.0f}".format, "p99"),
        (f"{size // MB} MB round trip", "MB/s", "{:,.0f}".format, "rate"),
        (f"{size // MB} MB round trip", "s", "{:.2f}".format, "seconds"),
    ]
    lines = [f"| metric | unit | {MODES[0]} | {MODES[1]} | key vs no key |", "|---|---|---:|---:|---:|"]
    for label, unit, fmt, name in rows:
        a, b = median_of(keyed, name), median_of(plain, name)
        lines.append(f"| {label} | {unit} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |")
    lines.append(f"| seal + open one small job, in process | µs | {sealing['small']:.1f} | | |")
    lines.append(f"| seal + open one {size // MB} MB job, in process | ms | {sealing['big']:.0f} | | |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append("")
    lines.append(f"Medians of {rounds} alternating rounds ({calls:,} sequential calls and one {size // MB} MB echo "
                 f"per round and mode), {WORKERS} workers, gearmand on 127.0.0.1, {os.cpu_count()} CPUs, "
                 f"load average {load:.1f} at the end, Python {sys.version.split()[0]}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per round")
    parser.add_argument("--mb", type=int, default=100, help="size of the echo payload in MB")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 200 calls, 10 MB: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.mb = 2, 200, 10
    print(run(args.rounds, args.calls, args.mb * MB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
