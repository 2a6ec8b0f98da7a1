"""What security costs on tcp://: a standalone job server and one worker process, without a key (--insecure),
with a key (an HMAC per frame over fresh per-connection keys and its sequence number), and with a key over
mutual TLS.

Run from the repository root::

    .venv/bin/python benchmarks/tls_cost.py [--calls 2000] [--payload-mb 100] [--runs 3] [--rounds 2]

Each round starts a fresh ``remote-executor server`` and ``remote-executor worker --processes 1`` per mode
(the modes interleaved round by round) on 127.0.0.1; this process is the client. It prints one
markdown table: sequential round-trip latency (p50 and p99 over all timed calls) and the MB/s of a
``--payload-mb`` round trip ((bytes sent + bytes received) / time, MB = 10^6 bytes, median of the runs).
The certificates are made with ``remote-executor tls-keygen`` (needs ``cryptography``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from remote_executor import RemoteExecutor
from remote_executor.tls import TlsMaterial, make_cluster_material

MB = 1_000_000
MODES = ("no key", "key", "key + TLS")


def echo(payload: object) -> object:
    return payload


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def cluster(tls: TlsMaterial | None, key_file: Path | None) -> Iterator[str]:
    """A standalone server and one worker process (as a user starts them); the URL."""
    cli = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
    server_tls: list[str] = ["--insecure"] if key_file is None else ["--key-file", str(key_file)]
    client_tls = list(server_tls)
    if tls is not None:
        server_tls += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--tls-ca", str(tls.ca)]
        client_tls += ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key)]
    for _ in range(5):  # the free port may be taken by someone else before the server binds it
        url = f"tcp://127.0.0.1:{_free_port()}"
        server = subprocess.Popen([*cli, "server", url, *server_tls], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        if server.stdout.readline().startswith("serving"):
            break
        server.wait()
        server.stdout.close()
    else:
        raise RuntimeError("could not start a job server")
    worker = None
    try:
        worker = subprocess.Popen([*cli, "worker", url, "--processes", "1", *client_tls], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        yield url
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        if server.stdout is not None:
            server.stdout.close()


def measure(url: str, tls: TlsMaterial | None, key_file: Path | None, calls: int, payload_mb: int,
            runs: int) -> tuple[list[float], list[float]]:
    """(latencies in µs, MB/s samples) against one running cluster."""
    options: dict[str, Any] = {"insecure": True} if key_file is None else {"key_file": str(key_file)}
    if tls is not None:
        options["tls"] = tls.client()
    with RemoteExecutor(transport=url, max_workers=1, **options) as ex:
        deadline = time.monotonic() + 60
        while ex.submit(echo, 0).result(timeout=60) != 0 and time.monotonic() < deadline:
            pass  # the first call also waits for the worker to attach
        for i in range(calls // 10):  # warm-up
            ex.submit(echo, i).result()
        latencies = []
        for i in range(calls):
            start = time.perf_counter()
            ex.submit(echo, i).result()
            latencies.append((time.perf_counter() - start) * 1e6)
        payload = bytes(payload_mb * MB)
        ex.submit(echo, payload[: MB]).result()
        throughput = []
        for _ in range(runs):
            start = time.perf_counter()
            result = ex.submit(echo, payload).result(timeout=600)
            throughput.append(2 * len(payload) / MB / (time.perf_counter() - start))
            assert len(result) == len(payload)  # type: ignore[arg-type]
            del result
    return latencies, throughput


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls timed per round and mode")
    parser.add_argument("--payload-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="payload round trips per round and mode")
    parser.add_argument("--rounds", type=int, default=2, help="fresh clusters per mode, interleaved")
    args = parser.parse_args()

    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    throughput: dict[str, list[float]] = {mode: [] for mode in MODES}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        material = make_cluster_material(Path(tmp) / "tls", ["127.0.0.1"])
        key_file = Path(tmp) / "cluster.key"
        key_file.write_text(os.urandom(32).hex() + "\n")
        key_file.chmod(0o600)
        for _ in range(args.rounds):
            for mode in MODES:
                tls = material if "TLS" in mode else None
                key = key_file if "key" in mode and mode != "no key" else None
                with cluster(tls, key) as url:
                    lat, mbs = measure(url, tls, key, args.calls, args.payload_mb, args.runs)
                latencies[mode] += lat
                throughput[mode] += mbs

    rows = [
        (f"sequential round trip p50 ({args.calls:,} calls x {args.rounds})", "µs",
         {m: percentile(latencies[m], 0.5) for m in MODES}, False),
        (f"sequential round trip p99 ({args.calls:,} calls x {args.rounds})", "µs",
         {m: percentile(latencies[m], 0.99) for m in MODES}, False),
        (f"{args.payload_mb} MB round trip (median of {args.runs} x {args.rounds})", "MB/s",
         {m: statistics.median(throughput[m]) for m in MODES}, True),
    ]
    print("| metric | unit | no key | key | key + TLS | key vs no key | key + TLS vs no key |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, unit, values, higher_is_better in rows:
        base = values["no key"]
        costs = []
        for mode in ("key", "key + TLS"):
            change = (values[mode] / base - 1) * 100
            costs.append(f"{-change if higher_is_better else change:+.0f}% cost")
        print(f"| {label} | {unit} | {base:,.0f} | {values['key']:,.0f} | {values['key + TLS']:,.0f} | "
              f"{costs[0]} | {costs[1]} |")
    print()
    print(f"- Standalone `remote-executor server` + `remote-executor worker --processes 1` on 127.0.0.1, this "
          f"process the client; TLS = mutual TLS ({ssl.OPENSSL_VERSION}), certificates from tls-keygen (ECDSA "
          f"P-256). key = HMAC-SHA256 per frame over per-connection keys and sequence numbers. "
          f"MB/s = (bytes sent + bytes received) / time, MB = 10^6 bytes.")
    print(f"- Machine: nproc={os.cpu_count()}, Python {platform.python_version()}, {platform.platform()}; "
          f"run took {time.perf_counter() - began:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
