"""Run as a program by tests/test_byvalue_cache.py: its functions are ``__main__``'s, so they travel by value.

Each scenario calls a function on the embedded default cluster's one worker, changes something between the
calls, and records what the worker returned; the results are printed as one line of JSON."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from remote_executor import RemoteExecutor
from remote_executor.wire import fncache
from remote_executor.wire.serialization import _by_value

SCALE = 2
OFFSET = 1
items = [1, 2]
counter = 0


def scaled(x: int) -> int:
    return x * SCALE


def helper(x: int) -> int:
    return x + OFFSET


def calls_helper(x: int) -> int:
    return helper(x) * 10


def total() -> int:
    return sum(items)


def count() -> int:
    global counter
    counter += 1
    return counter


def accumulate(x: int, seen: list[int] = []) -> int:  # noqa: B006 (the mutable default is the point)
    seen.append(x)
    return len(seen)


def with_default(x: int, y: int = 1) -> int:
    return x + y


def with_keyword(x: int, *, y: int = 1) -> int:
    return x + y


def tagged() -> str:
    return str(tagged.tag)  # type: ignore[attr-defined]


tagged.tag = "first"  # type: ignore[attr-defined]


def make_adder() -> tuple[Callable[[int], int], Callable[[int], None]]:
    k = 1

    def add(x: int) -> int:
        return x + k

    def set_k(value: int) -> None:
        nonlocal k
        k = value

    return add, set_k


class Box:
    factor = 3


def uses_class(x: int) -> int:
    return Box.factor * x


@functools.lru_cache(maxsize=8)
def cached(x: int) -> int:
    return x * SCALE


@functools.cache
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@functools.singledispatch
def describe(value: object) -> str:
    return "something"


@describe.register
def _(value: int) -> str:
    return f"the number {value * SCALE}"


@describe.register(str)
def _describe_text(value: str) -> str:
    return f"the text {value!r}"


def probe() -> tuple[int, int]:
    from remote_executor.wire import fncache as worker_cache  # the worker's own counters

    return worker_cache.stats.unpickle_hits, worker_cache.stats.unpickled


results: dict[str, Any] = {}
with RemoteExecutor(1) as ex:

    def run(fn: Callable[..., Any], *args: Any) -> Any:
        assert _by_value(fn), fn
        return ex.submit(fn, *args).result(timeout=60)

    results["global"] = [run(scaled, 5)]
    SCALE = 3
    results["global"].append(run(scaled, 5))

    def scaled(x: int) -> int:  # redefined under the same name
        return x * 100

    results["global"].append(run(scaled, 5))

    results["helper"] = [run(calls_helper, 1)]
    OFFSET = 2  # a global of the other function
    results["helper"].append(run(calls_helper, 1))

    def helper(x: int) -> int:
        return x - 1

    results["helper"].append(run(calls_helper, 1))

    results["list"] = [run(total)]
    items.append(3)
    results["list"].append(run(total))

    results["closure"] = []
    add, set_k = make_adder()
    results["closure"].append(run(add, 1))
    set_k(5)
    results["closure"].append(run(add, 1))

    results["defaults"] = [run(with_default, 1), run(with_keyword, 1)]
    with_default.__defaults__ = (7,)
    with_keyword.__kwdefaults__["y"] = 9  # type: ignore[index]
    results["defaults"] += [run(with_default, 1), run(with_keyword, 1)]

    results["dict"] = [run(tagged)]
    tagged.tag = "second"  # type: ignore[attr-defined]
    results["dict"].append(run(tagged))

    factor = 2
    results["lambda"] = [run(lambda x: x * factor, 4)]
    factor = 5
    results["lambda"].append(run(lambda x: x * factor, 4))

    results["class"] = [run(uses_class, 1)]
    Box.factor = 4
    results["class"].append(run(uses_class, 1))

    results["state"] = [run(count), run(count)]
    counter = 10
    results["state"].append(run(count))
    results["state"] += [run(accumulate, 1), run(accumulate, 1)]

    results["lru_cache"] = [run(cached, 2), run(fib, 20)]  # (a name this __main__ has, the workers' not)
    results["singledispatch"] = [run(describe, 2), run(describe, "x"), run(describe, 1.5)]

    results["probe"] = [run(probe) for _ in range(4)]
    results["client_hits"] = fncache.stats.pickle_hits

print(json.dumps(results))
