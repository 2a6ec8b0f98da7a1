"""Ctrl-C inside submit(): how often a run is left with a call that never resolves. Not in CI.

    python benchmarks/interrupt_stress.py                          # tcp, zmq, gearman, 5 runs of 5 s each
    python benchmarks/interrupt_stress.py --executors tcp,thread --runs 10 --seconds 3

Each run is a fresh child process. Its main thread submits tiny calls (waiting for every 50th batch), and a
helper thread sends it SIGINT every 0.5-5 ms, but only while the main thread is inside ``submit()``: every
interrupt lands in the hand-over, at whatever point it had reached. The main thread catches each
``KeyboardInterrupt`` and goes on. At the end of the run every returned future must resolve with its own
argument and ``shutdown(wait=True)`` must return. The table counts, per executor: runs, interrupts, runs
whose futures or shutdown hung (20 s), and results that were not their call's.

``thread`` is ``ThreadPoolExecutor(2)`` and ``process`` ``ProcessPoolExecutor(2)``, under the same harness.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, os, random, signal, sys, threading, time
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
    from remote_executor import RemoteExecutor
    from remote_executor.conformance.tasks import identity

    name, seconds = sys.argv[1], float(sys.argv[2])
    if name == "thread":
        executor = ThreadPoolExecutor(2)
    elif name == "process":
        executor = ProcessPoolExecutor(2)
    else:
        executor = RemoteExecutor(max_workers=2, transport=name)
    inside = [False]
    stop = threading.Event()
    main = threading.main_thread().ident

    def shooter():
        while not stop.is_set():
            time.sleep(random.uniform(0.0005, 0.005))
            if inside[0]:
                signal.pthread_kill(main, signal.SIGINT)

    report = {"interrupts": 0, "hung": False, "wrong": 0}
    executor.submit(identity, 0).result(timeout=60)
    threading.Thread(target=shooter, daemon=True).start()
    futures = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not report["hung"]:
        try:
            inside[0] = True
            future = executor.submit(identity, len(futures))
            inside[0] = False
            futures.append(future)
            if len(futures) % 50 == 0 and wait(futures[-50:], timeout=20).not_done:
                report["hung"] = True
        except KeyboardInterrupt:
            inside[0] = False
            report["interrupts"] += 1
    stop.set()
    inside[0] = False
    time.sleep(0.05)  # (a signal already sent is handled here, outside submit)
    if not report["hung"]:
        done, not_done = wait(futures, timeout=20)
        report["hung"] = bool(not_done)
        report["wrong"] = sum(1 for i, f in enumerate(futures) if f in done and f.result() != i)
    closer = threading.Thread(target=executor.shutdown, daemon=True)
    closer.start()
    closer.join(20)
    report["hung"] = report["hung"] or closer.is_alive()
    print(json.dumps(report), flush=True)
    os._exit(0)  # a hung executor's threads would keep the process
""")


def run_once(name: str, seconds: float) -> dict[str, object]:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(seconds)], capture_output=True, text=True,
                              timeout=seconds + 120, check=False)
    except subprocess.TimeoutExpired:
        return {"interrupts": 0, "hung": True, "wrong": 0}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{name}: the run printed no report:\n{proc.stderr[-3000:]}")
    report: dict[str, object] = json.loads(lines[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executors", default="tcp,zmq,gearman",
                        help="comma-separated: transports (tcp, zmq, gearman, memory), thread, process")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run's submit loop")
    args = parser.parse_args()
    print("| executor | runs | interrupts | runs that hung | wrong results |")
    print("|---|---:|---:|---:|---:|")
    for name in args.executors.split(","):
        reports = [run_once(name, args.seconds) for _ in range(args.runs)]
        interrupts = sum(int(str(r["interrupts"])) for r in reports)
        hung = sum(bool(r["hung"]) for r in reports)
        wrong = sum(int(str(r["wrong"])) for r in reports)
        print(f"| {name} | {len(reports)} | {interrupts} | {hung} | {wrong} |", flush=True)


if __name__ == "__main__":
    main()
