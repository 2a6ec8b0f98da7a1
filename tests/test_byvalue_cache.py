"""Functions shipped by value are pickled and unpickled once while nothing they capture changes, and never
run stale: a change of code, globals, defaults, closure cells or attributes between calls is seen."""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from remote_executor import SerializationError
from remote_executor.wire import fncache
from remote_executor.wire import serialization as s

SRC = Path(__file__).resolve().parent.parent / "src"
SCRIPT = Path(__file__).resolve().parent / "byvalue_script.py"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    fncache.clear()
    fncache.stats.__init__()  # type: ignore[misc]
    yield
    fncache.clear()


def script(source: str) -> dict[str, Any]:
    """Run ``source`` as if it were a script's code: its functions belong to ``__main__`` (not importable)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, "<script>", "exec"), namespace)
    return namespace


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """One call through both sides of the wire, in this process."""
    assert s._by_value(fn)
    ok, value = s.decode_outcome(s.run_task(s.encode_call(fn, args, {})))
    assert ok, value
    return value


def test_the_same_function_is_pickled_and_unpickled_once() -> None:
    ns = script("import math\nSCALE = 2.0\ndef f(x):\n    return math.floor(x * SCALE)\n")
    assert [call(ns["f"], x) for x in range(5)] == [0, 2, 4, 6, 8]
    assert (fncache.stats.pickled, fncache.stats.pickle_hits) == (1, 4)
    assert (fncache.stats.unpickled, fncache.stats.unpickle_hits) == (1, 4)


def test_a_changed_global_is_seen() -> None:
    ns = script("SCALE = 2\ndef f(x):\n    return x * SCALE\n")
    assert call(ns["f"], 5) == 10
    ns["SCALE"] = 3
    assert call(ns["f"], 5) == 15
    ns["SCALE"] = 3.0  # equal, but not the same value
    assert type(call(ns["f"], 5)) is float
    assert fncache.stats.pickled == 3


def test_a_function_redefined_under_the_same_name_is_seen() -> None:
    ns = script("def f(x):\n    return x + 1\ndef g(x):\n    return f(x) * 10\n")
    assert call(ns["g"], 1) == 20
    exec("def f(x):\n    return x + 2\n", ns)
    assert call(ns["g"], 1) == 30


def test_a_global_of_another_script_function_is_seen() -> None:
    ns = script("OFFSET = 1\ndef f(x):\n    return x + OFFSET\ndef g(x):\n    return f(x) * 10\n")
    assert call(ns["g"], 1) == 20
    ns["OFFSET"] = 5
    assert call(ns["g"], 1) == 60


def test_a_closure_cell_changed_is_seen() -> None:
    ns = script("def make():\n    k = 1\n    def add(x):\n        return x + k\n"
                "    def set_k(v):\n        nonlocal k\n        k = v\n    return add, set_k\n")
    add, set_k = ns["make"]()
    assert call(add, 1) == 2
    set_k(10)
    assert call(add, 1) == 11


def test_changed_defaults_and_keyword_defaults_are_seen() -> None:
    ns = script("def f(x, y=1, *, z=10):\n    return x + y + z\n")
    assert call(ns["f"], 1) == 12
    ns["f"].__defaults__ = (2,)
    assert call(ns["f"], 1) == 13
    ns["f"].__kwdefaults__["z"] = 20  # changed in place
    assert call(ns["f"], 1) == 23


def test_a_mutable_global_changed_in_place_is_seen() -> None:
    ns = script("items = [1, 2]\nconfig = {'n': 1}\ndef f():\n    return sum(items) * config['n']\n")
    assert call(ns["f"]) == 3
    ns["items"].append(3)
    assert call(ns["f"]) == 6
    ns["config"]["n"] = 2
    assert call(ns["f"]) == 12
    ns["items"][0] = 1.0
    assert type(call(ns["f"])) is float


def test_a_mutable_value_inside_an_annotation_changed_in_place_is_seen() -> None:
    # Annotated[T, x] keeps x in __metadata__: an annotation is not immutable just because its type parts are.
    ns = script("import typing\nmeta = [1]\nT = typing.Annotated[int, meta]\n"
                "def f():\n    return T.__metadata__[0][0]\n")
    assert call(ns["f"]) == 1
    ns["meta"][0] = 2
    assert call(ns["f"]) == 2


def test_a_function_attribute_changed_is_seen() -> None:
    ns = script("def f():\n    return f.tag\nf.tag = 'first'\n")
    assert call(ns["f"]) == "first"
    ns["f"].tag = "second"
    assert call(ns["f"]) == "second"


def test_lambdas_made_again_hit_the_cache_and_see_their_cells() -> None:
    assert [call(lambda x: x * 2, x) for x in range(3)] == [0, 2, 4]  # a new lambda object every time
    assert fncache.stats.pickle_hits == 2
    factors = [call((lambda k: lambda x: x * k)(n), 1) for n in (1, 2, 3)]
    assert factors == [1, 2, 3]


def test_a_class_of_the_script_is_pickled_every_call_and_seen() -> None:
    ns = script("class Box:\n    factor = 3\ndef f(x):\n    return Box.factor * x\n")
    assert call(ns["f"], 1) == 3
    ns["Box"].factor = 4
    assert call(ns["f"], 1) == 4
    assert fncache.stats.pickled == fncache.stats.pickle_hits == 0  # not cached: pickled with the call


def test_an_instance_in_the_globals_is_pickled_every_call() -> None:
    ns = script("class Config:\n    n = 1\nconfig = Config()\ndef f():\n    return config.n\n")
    assert call(ns["f"]) == 1
    ns["config"].n = 2
    assert call(ns["f"]) == 2


def test_a_function_that_keeps_state_starts_from_the_callers_values_every_call() -> None:
    ns = script("counter = 0\ndef count():\n    global counter\n    counter += 1\n    return counter\n"
                "def accumulate(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n"
                "def tick():\n    tick.calls = getattr(tick, 'calls', 0) + 1\n    return tick.calls\n"
                "def make():\n    n = 0\n    def step():\n        nonlocal n\n        n += 1\n        return n\n"
                "    return step\n")
    step = ns["make"]()
    for fn, args in ((ns["count"], ()), (ns["accumulate"], (1,)), (ns["tick"], ()), (step, ())):
        assert [call(fn, *args) for _ in range(3)] == [1, 1, 1]
    assert fncache.stats.pickle_hits == 8  # the client still pickles them once...
    assert fncache.stats.unpickle_hits == 0  # ...but the worker unpickles them afresh for every call


def test_registering_a_module_by_value_is_seen() -> None:
    module = types.ModuleType("byvalue_probe_module")
    sys.modules[module.__name__] = module
    try:
        ns = script("import byvalue_probe_module as m\ndef f():\n    return m.__name__\n")
        assert call(ns["f"]) == "byvalue_probe_module"
        assert fncache.pickled_function(ns["f"], s._pickle_function) is not None
        cloudpickle.register_pickle_by_value(module)
        try:
            assert fncache.pickled_function(ns["f"], s._pickle_function) is None  # now shipped with the call
            assert call(ns["f"]) == "byvalue_probe_module"
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    finally:
        del sys.modules[module.__name__]


def test_chunks_use_the_cache_too() -> None:
    ns = script("def f(x):\n    return x + 1\n")
    for _ in range(2):
        ok, (values, error) = s.decode_outcome(s.run_task(s.encode_chunk(ns["f"], [(1,), (2,)])))
        assert ok and values == [2, 3] and error is None
    assert fncache.stats.pickle_hits == fncache.stats.unpickle_hits == 1


def test_a_traceback_of_a_cached_function_still_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / "script.py"
    source = "def f(x):\n    return 1 / x\n"
    path.write_text(source)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, str(path), "exec"), namespace)
    for _ in range(2):  # the second call runs the worker's cached copy
        ok, exc = s.decode_outcome(s.run_task(s.encode_call(namespace["f"], (0,), {})))
        assert not ok and isinstance(exc, ZeroDivisionError)
        assert f'File "{path}", line 2, in f\n    return 1 / x\n' in str(exc.__cause__)
    assert fncache.stats.unpickle_hits == 1


def test_memory_is_bounded_on_both_sides() -> None:
    namespaces = [script(f"def f():\n    return {n}\n") for n in range(fncache.MAX_FUNCTIONS + 40)]
    assert [call(ns["f"]) for ns in namespaces] == list(range(fncache.MAX_FUNCTIONS + 40))
    assert len(fncache._loaded) == fncache.MAX_FUNCTIONS  # the worker's least recently used are dropped
    assert len(fncache._entries) == len(namespaces)
    del namespaces
    gc.collect()
    assert len(fncache._entries) == 0  # the client's entries go with their code

    fncache.clear()
    big = script(f"DATA = b'x' * {fncache.MAX_FUNCTION_BYTES}\ndef f():\n    return len(DATA)\n")
    assert [call(big["f"]) for _ in range(2)] == [fncache.MAX_FUNCTION_BYTES] * 2
    # Neither side keeps so big a pickle: the client's entry would keep DATA (and its pickle) alive after
    # the script dropped it, for as long as the function's code lives.
    assert fncache.stats.pickle_hits == 0 and len(fncache._entries) == 0
    assert len(fncache._loaded) == 0
    pickled = fncache.stats.pickled
    long_list = script("DATA = list(range(5000))\ndef f():\n    return len(DATA)\n")
    assert call(long_list["f"]) == 5000
    assert fncache.stats.pickled == pickled  # too long to fingerprint on every call: pickled with the call
    assert fncache.pickled_function(long_list["f"], s._pickle_function) is None


@pytest.mark.parametrize("fn", [(b"not a pickle", True), (pickle.dumps(42), True)])
def test_bad_pickled_functions_are_error_outcomes(fn: tuple[bytes, bool]) -> None:
    ok, exc = s.decode_outcome(s.run_task([pickle.dumps(("call", fn, (), {}))]))
    assert not ok and isinstance(exc, SerializationError)
    assert "cannot unpickle the call" in str(exc) or "not callable" in str(exc)


@pytest.mark.parametrize("fn", [(b"x", 1), (b"x",), (b"x", True, True), (bytearray(b"x"), True), ("x", True)])
def test_envelopes_with_a_malformed_pickled_function_are_refused(fn: object) -> None:
    ok, exc = s.decode_outcome(s.run_task([pickle.dumps(("call", fn, (), {}))]))
    assert not ok and isinstance(exc, SerializationError)
    assert "no call it can run" in str(exc)


def test_the_embedded_cluster_never_runs_stale_code() -> None:
    """A real script, run as ``__main__`` with a worker process of the embedded default cluster."""
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["global"] == [10, 15, 500]
    assert results["helper"] == [20, 30, 0]
    assert results["list"] == [3, 6]
    assert results["closure"] == [2, 6]
    assert results["defaults"] == [2, 2, 8, 10]
    assert results["dict"] == ["first", "second"]
    assert results["lambda"] == [8, 20]
    assert results["class"] == [3, 4]
    assert results["state"] == [1, 1, 11, 1, 1]
    assert results["lru_cache"] == [6, 6765]  # SCALE is 3 by then
    assert results["singledispatch"] == ["the number 6", "the text 'x'", "something"]
    hits = [h for h, _ in results["probe"]]
    assert hits == [hits[0], hits[0] + 1, hits[0] + 2, hits[0] + 3]  # the worker reused its copy
    assert results["client_hits"] > 0


def test_annotations_and_tuples_are_proved_immutable_once() -> None:
    ns = script("import typing\nTABLE = (1, (2.0, 'three'), frozenset({4}))\n"
                "def f(x: list[int], y: int | None = None) -> typing.Optional[typing.Dict[str, int]]:\n"
                "    return TABLE[0] + x[0]\n")
    assert [call(ns["f"], [1]) for _ in range(3)] == [2, 2, 2]
    assert (fncache.stats.pickled, fncache.stats.pickle_hits, fncache.stats.unpickle_hits) == (1, 2, 2)
    ns["TABLE"] = (10,)  # a new tuple: proved again
    assert [call(ns["f"], [1]) for _ in range(2)] == [11, 11]
    assert (fncache.stats.pickled, fncache.stats.pickle_hits) == (2, 3)
    ns["f"].__annotations__["x"] = list[str]
    assert call(ns["f"], [1]) == 11
    assert fncache.stats.pickled == 3


def test_the_cache_stays_off_for_a_cloudpickle_that_captures_more(monkeypatch: pytest.MonkeyPatch) -> None:
    original = cloudpickle.cloudpickle._function_getstate

    def captures_more(fn: Any) -> Any:
        state, slots = original(fn)
        return state, {**slots, "__type_params__": ()}

    monkeypatch.setattr(cloudpickle.cloudpickle, "_function_getstate", captures_more)
    fncache._understood.cache_clear()
    try:
        ns = script("def f(x):\n    return x + 1\n")
        assert [call(ns["f"], 1) for _ in range(2)] == [2, 2]
        assert fncache.stats.pickled == fncache.stats.pickle_hits == 0
    finally:
        fncache._understood.cache_clear()


def test_sharing_and_cycles_are_part_of_the_fingerprint() -> None:
    ns = script("A = [1]\nB = A\ndef f():\n    return A is B, len(A)\n")
    assert call(ns["f"]) == (True, 1)
    ns["B"] = [1]  # equal, but no longer the same list
    assert call(ns["f"]) == (False, 1)
    ns["A"].append(ns["A"])  # a list that holds itself
    assert call(ns["f"]) == (False, 2)
    ns["B"] = (1, 2)  # a tuple where a list was, then a tuple holding a list
    ns["A"] = [1]
    assert call(ns["f"]) == (False, 1)
    ns["B"] = (ns["A"],)
    assert call(ns["f"]) == (False, 1)
    ns["A"].append(2)
    assert call(ns["f"]) == (False, 2)


def test_a_module_imported_since_the_last_call_is_seen() -> None:
    """cloudpickle ships which submodules of a module the function uses are imported: a new one counts."""
    package = types.ModuleType("byvalue_probe_package")
    sys.modules[package.__name__] = package
    try:
        ns = script("import byvalue_probe_package as p\ndef f():\n    return p.__name__\n")
        assert [call(ns["f"]) for _ in range(2)] == ["byvalue_probe_package"] * 2
        assert (fncache.stats.pickled, fncache.stats.pickle_hits) == (1, 1)
        sys.modules["byvalue_probe_package.sub"] = types.ModuleType("byvalue_probe_package.sub")
        assert call(ns["f"]) == "byvalue_probe_package"
        assert (fncache.stats.pickled, fncache.stats.pickle_hits) == (2, 1)
    finally:
        sys.modules.pop("byvalue_probe_package.sub", None)
        del sys.modules[package.__name__]
