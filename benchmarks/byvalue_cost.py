"""What a function shipped by value costs per call, next to one shipped by reference.

Run from the repository root::

    .venv/bin/python benchmarks/byvalue_cost.py [--calls 2000] [--runs 7]

This script is ``__main__``, so the functions it defines travel by value (cloudpickle), as a user's script,
lambda, closure or notebook cell does; ``colorsys.rgb_to_yiq`` is importable everywhere and travels by name.
Each row times, in this one process, what a call costs the client (``encode_call``: the call pickled) and the
worker (``run_task``: the call unpickled and run, the outcome pickled), repeating the same call ``--calls``
times, and prints the median over ``--runs`` runs (the cases interleaved run by run), in µs of this process's
CPU time per call (steadier than the wall clock on a shared machine), as a markdown table; the last column
is the total next to the importable function's.
"""

from __future__ import annotations

import argparse
import colorsys
import statistics
import time
from collections.abc import Callable
from typing import Any

from remote_executor.wire.serialization import encode_call, run_task

SCALE = 255.0


def in_main(r: float, g: float, b: float) -> tuple[float, float, float]:
    """A script's function: reads a module, a constant and another function of the script."""
    return colorsys.rgb_to_yiq(*_scaled(r, g, b))


def _scaled(r: float, g: float, b: float) -> tuple[float, float, float]:
    return r / SCALE, g / SCALE, b / SCALE


def _closure() -> Callable[..., Any]:
    factor = 2.0
    return lambda r, g, b: colorsys.rgb_to_yiq(r / factor, g / factor, b / factor)


CASES: dict[str, Callable[..., Any]] = {
    "importable (colorsys.rgb_to_yiq)": colorsys.rgb_to_yiq,
    "__main__ function (+ a helper)": in_main,
    "lambda": lambda r, g, b: colorsys.rgb_to_yiq(r, g, b),
    "closure": _closure(),
}


def time_case(fn: Callable[..., Any], calls: int) -> tuple[float, float]:
    """µs per call spent in encode_call and in run_task."""
    args = (10.0, 20.0, 30.0)
    encoded = []
    start = time.process_time()
    for _ in range(calls):
        encoded.append(encode_call(fn, args, {}))
    middle = time.process_time()
    for parts in encoded:
        run_task(parts)
    end = time.process_time()
    return (middle - start) / calls * 1e6, (end - middle) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    options = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    for _ in range(options.runs):
        for name, fn in CASES.items():
            runs[name].append(time_case(fn, options.calls))
    print("| function | client: encode_call µs | worker: run_task µs | total µs | x importable |")
    print("|---|---:|---:|---:|---:|")
    reference = 0.0
    for name, timings in runs.items():
        encode = statistics.median(r[0] for r in timings)
        run = statistics.median(r[1] for r in timings)
        reference = reference or encode + run
        print(f"| {name} | {encode:.1f} | {run:.1f} | {encode + run:.1f} | {(encode + run) / reference:.2f} |")


if __name__ == "__main__":
    main()
