"""What start-up costs: import time and cold/warm start-up to the first result, beside ProcessPoolExecutor.

Every sample runs in a fresh interpreter (the same one that runs this script), and each row is the median of
``--runs`` of them:

- import: ``import remote_executor`` against ``import concurrent.futures``, and ``from remote_executor
  import RemoteExecutor`` (what a program that uses the executor imports);
- modules: how many modules each of those imports loads;
- cold start-up: a fresh interpreter's imports, the executor's construction and its first result, and the
  CPU time all the processes of that run used (user + system: it depends far less on what else the machine
  is doing than the wall time does);
- warm start-up: construction to first result in an interpreter that already did it once;
- both for the default start method and for ``start_method="fork"`` (the first workers forked from the
  caller's process where that is safe).

    python benchmarks/startup_cost.py                      # tcp (the default), 7 runs per row
    python benchmarks/startup_cost.py --transport gearman --runs 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

from _bytecode import compile_packages  # benchmarks/ is this script's directory: sys.path[0]

IMPORT_SCRIPT = """\
import sys, time
n = len(sys.modules)
t0 = time.perf_counter()
{statement}
t1 = time.perf_counter()
print("RESULT", (t1 - t0) * 1e3, len(sys.modules) - n)
"""

START_SCRIPT = """\
import time
t0 = time.perf_counter()
if {ppe!r}:
    from concurrent.futures import ProcessPoolExecutor
    make = lambda: ProcessPoolExecutor(max_workers=2)
else:
    from remote_executor import RemoteExecutor
    make = lambda: RemoteExecutor(max_workers=2, transport={transport!r}, start_method={method!r})
times = []
for _ in range({cycles}):
    ex = make()
    ex.submit(abs, -1).result(timeout=60)
    times.append((time.perf_counter() - t0) * 1e3)
    ex.shutdown(wait=True)
    t0 = time.perf_counter()
print("RESULT", times[0], times[-1])
"""


def sample(script: str) -> tuple[float, float, float]:
    """(first number, second number, CPU ms of the child and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"a sample failed:\n{proc.stderr}")
    _, first, second = lines[-1].split()
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e3
    return float(first), float(second), cpu


def median_of(script: str, runs: int) -> tuple[float, float, float]:
    samples = [sample(script) for _ in range(runs)]
    first, second, cpu = (statistics.median(s[i] for s in samples) for i in range(3))
    return first, second, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per row (default 7)")
    parser.add_argument("--transport", default="tcp", help="the embedded cluster's scheme (default tcp)")
    args = parser.parse_args()
    runs = max(args.runs, 1)
    compile_packages("remote_executor", "cloudpickle")

    print(f"median of {runs} fresh interpreters, Python {sys.version.split()[0]}")
    print(f"{'row':<60}{'ms':>9}{'modules':>9}")
    base_ms, base_modules, _ = median_of(IMPORT_SCRIPT.format(statement="import concurrent.futures"), runs)
    print(f"{'import concurrent.futures':<60}{base_ms:>9.1f}{base_modules:>9.0f}")
    for statement in ("import remote_executor", "from remote_executor import RemoteExecutor"):
        ms, modules, _ = median_of(IMPORT_SCRIPT.format(statement=statement), runs)
        print(f"{statement:<60}{ms:>9.1f}{modules:>9.0f}   {ms / base_ms:.2f}x")
    print(f"{'start-up to first result':<60}{'ms':>9}{'CPU ms':>9}")
    for label, ppe, transport, method in (
            ("ProcessPoolExecutor(2)", True, "", None),
            (f"RemoteExecutor({args.transport}, 2)", False, args.transport, None),
            (f"RemoteExecutor({args.transport}, 2, start_method='fork')", False, args.transport, "fork")):
        script = START_SCRIPT.format(ppe=ppe, transport=transport, method=method, cycles="{cycles}")
        cold, _, cpu = median_of(script.format(cycles=1), runs)
        _, warm, _ = median_of(script.format(cycles=2), runs)
        if ppe:
            ppe_cold, ppe_warm = cold, warm
        print(f"{'cold, ' + label:<60}{cold:>9.1f}{cpu:>9.0f}   {cold / ppe_cold:.2f}x")
        print(f"{'warm, ' + label:<60}{warm:>9.1f}{'':>9}   {warm / ppe_warm:.2f}x")

if __name__ == "__main__":
    main()
