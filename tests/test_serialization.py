"""Unit tests for serialization.py: buffers, envelopes, remote exceptions and culprit naming."""

from __future__ import annotations

import pickle
import threading

import pytest

from remote_executor import RemoteError, RemoteTraceback, SerializationError
from remote_executor.wire import serialization as s


def divide(a: float, b: float) -> float:
    return a / b


def returns_lock() -> threading.Lock:
    return threading.Lock()


class CustomError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


def raise_custom() -> None:
    raise CustomError(7, "seven")


def test_dumps_sends_pickle_buffers_out_of_band_without_copying() -> None:
    data = bytearray(b"x" * 10_000)
    parts = s.dumps({"payload": pickle.PickleBuffer(data), "small": 1})
    assert len(parts) == 2
    assert len(parts[0]) < 1_000  # the large buffer is not in the stream
    data[0] = ord("y")
    assert bytes(parts[1])[:1] == b"y"  # the part is a view of the caller's memory, not a copy
    restored = s.loads([bytes(p) for p in parts])
    assert bytes(restored["payload"]) == bytes(data)
    assert restored["small"] == 1


def test_dumps_plain_objects_have_one_part() -> None:
    parts = s.dumps([1, "two", b"three"])
    assert len(parts) == 1
    assert s.loads(parts) == [1, "two", b"three"]


def test_call_envelope_runs_and_returns_value() -> None:
    outcome = s.run_task(s.encode_call(divide, (1,), {"b": 4}))
    assert s.loads_tag(outcome) == "ok"
    assert s.decode_outcome(outcome) == (True, 0.25)


def test_lambda_and_closure_travel_by_value() -> None:
    offset = 10
    outcome = s.run_task(s.encode_call(lambda x: x + offset, (5,), {}))
    assert s.decode_outcome(outcome) == (True, 15)


def test_raise_envelope_keeps_type_args_and_remote_traceback() -> None:
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(raise_custom, (), {})))
    assert not ok
    assert type(exc) is CustomError
    assert exc.args == (7, "seven")
    assert exc.code == 7
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_custom" in exc.__cause__.tb
    assert "CustomError" in str(exc.__cause__)


def test_unpicklable_exception_arrives_as_remote_error() -> None:
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(raise_unpicklable, (), {})))
    assert not ok
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "UnpicklableError"
    assert exc.message == "cannot travel"
    assert "raise_unpicklable" in exc.traceback_text
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert pickle.loads(pickle.dumps(exc)).type_name == "UnpicklableError"  # RemoteError itself travels


def test_rebuild_exception_with_a_blob_that_is_not_an_exception() -> None:
    exc = s.rebuild_exception((pickle.dumps(42), "Odd", "odd", "tb text"))
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "Odd"


def test_chunk_reports_values_before_the_error_at_index_k() -> None:
    items = [(1, 1), (1, 2), (1, 0), (1, 4)]
    ok, (values, error) = s.decode_outcome(s.run_task(s.encode_chunk(divide, items)))
    assert ok
    assert values == [1.0, 0.5]  # index 2 raised; index 3 never ran
    assert isinstance(error, ZeroDivisionError)
    assert "divide" in str(error.__cause__)


def test_chunk_without_error() -> None:
    ok, (values, error) = s.decode_outcome(s.run_task(s.encode_chunk(divide, [(4, 2), (9, 3)])))
    assert (ok, values, error) == (True, [2.0, 3.0], None)


def test_chunk_culprit_names_the_argument() -> None:
    with pytest.raises(SerializationError, match=r"argument 1 \(lock\)"):
        s.encode_chunk(divide, [(1, 2), (3, threading.Lock())])


@pytest.mark.parametrize(
    ("args", "kwargs", "culprit"),
    [
        ((1, threading.Lock()), {}, r"argument 1 \(lock\)"),
        ((1,), {"b": threading.Lock()}, r"keyword argument 'b' \(lock\)"),
    ],
)
def test_encode_call_names_the_culprit(
    args: tuple[object, ...], kwargs: dict[str, object], culprit: str
) -> None:
    with pytest.raises(SerializationError, match=culprit) as info:
        s.encode_call(divide, args, kwargs)
    assert "divide" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)
    assert isinstance(info.value, pickle.PicklingError)  # code catching pickle errors still works


def test_encode_call_names_an_unpicklable_callable() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="the callable"):
        s.encode_call(lambda: lock, (), {})


def test_unpicklable_result_is_an_error_outcome_naming_the_result() -> None:
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(returns_lock, (), {})))
    assert not ok
    assert isinstance(exc, SerializationError)
    assert "the result (lock)" in str(exc)
    assert "returns_lock" in str(exc)


def test_garbage_outcome_decodes_to_serialization_error() -> None:
    ok, exc = s.decode_outcome([b"not a pickle"])
    assert not ok
    assert isinstance(exc, SerializationError)
    assert "cannot unpickle the result" in str(exc)


def test_garbage_call_is_reported_not_raised_by_the_worker() -> None:
    ok, exc = s.decode_outcome(s.run_task([b"not a pickle"]))
    assert not ok
    assert isinstance(exc, SerializationError)
    assert "on the worker" in str(exc)


class _Tag(str):
    """A str whose comparison would run code: a call envelope's tag must be a plain str."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("the worker ran code from the envelope's tag")

    __hash__ = str.__hash__


WRONG_SHAPES = [
    5, None, "call", [], (), ["call", divide, (1, 2), {}], {"call": divide}, ("call",), ("call", divide),
    ("call", divide, (1, 2)), ("call", divide, (1, 2), {}, "extra"), ("call", divide, [1, 2], {}),
    ("call", divide, (1, 2), [("b", 1)]), ("chunk", divide),
    ("chunk", divide, 5), ("chunk", divide, [1, 2]), ("raise", None), ("ok", 1),
    (_Tag("call"), divide, (1, 2), {}), (b"call", divide, (1, 2), {}),
]


@pytest.mark.parametrize("envelope", WRONG_SHAPES, ids=[f"shape{i}" for i in range(len(WRONG_SHAPES))])
def test_a_pickle_of_the_wrong_shape_is_an_error_outcome_not_an_exception(envelope: object) -> None:
    """An authenticated call can still be the wrong object (another program's, another version's): the
    worker answers it with a clear error instead of raising out of its loop."""
    ok, exc = s.decode_outcome(s.run_task([pickle.dumps(envelope)]))
    assert not ok
    assert isinstance(exc, SerializationError)
    assert "no call it can run" in str(exc)


@pytest.mark.parametrize("envelope", [("call", "text", (), {}), ("chunk", 7, [(1, 2)])], ids=["call", "chunk"])
def test_a_function_that_is_not_callable_raises_the_type_error_calling_it_would(envelope: object) -> None:
    """``submit(5)``: the future fails as ThreadPoolExecutor's does, with the TypeError of the call."""
    ok, value = s.decode_outcome(s.run_task([pickle.dumps(envelope)]))
    assert ok == (envelope[0] == "chunk")  # type: ignore[index]  # (a chunk's error comes with its values)
    exc = value if envelope[0] == "call" else value[1]  # type: ignore[index]
    assert isinstance(exc, TypeError) and not isinstance(exc, SerializationError)
    assert exc.args == (f"'{type(envelope[1]).__name__}' object is not callable",)  # type: ignore[index]


def test_the_shape_check_lets_every_real_envelope_through() -> None:
    assert s.decode_outcome(s.run_task(s.encode_call(divide, (1, 4), {}))) == (True, 0.25)
    assert s.decode_outcome(s.run_task(s.encode_call(divide, (), {"a": 1, "b": 2}))) == (True, 0.5)
    assert s.decode_outcome(s.run_task(s.encode_chunk(divide, [(1, 2), (3, 4)]))) == (True, ([0.5, 0.75], None))
    assert s.decode_outcome(s.run_task(s.encode_chunk(divide, []))) == (True, ([], None))
    assert s.run_initializer(s.encode_initializer(divide, (1, 1))) is None


def test_run_initializer_none_on_success_outcome_on_failure() -> None:
    assert s.run_initializer(s.encode_initializer(divide, (1, 1))) is None
    failure = s.run_initializer(s.encode_initializer(divide, (1, 0)))
    assert failure is not None
    ok, exc = s.decode_outcome(failure)
    assert not ok
    assert isinstance(exc, ZeroDivisionError)


def test_describe() -> None:
    assert s.describe(divide) == "divide"
    assert s.describe(CustomError) == "CustomError"
    assert s.describe(42) == "42"


class BadStrError(Exception):
    def __str__(self) -> str:
        raise ValueError("this exception cannot be printed")


class ExitsWhenPickled:
    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit("not from pickling, please")


def raise_bad_str() -> None:
    raise BadStrError("payload")


def returns_exits_when_pickled() -> ExitsWhenPickled:
    return ExitsWhenPickled()


def test_an_exception_whose_str_raises_still_travels() -> None:
    """The worker describes what it can (before, encoding the error raised out of the worker's loop)."""
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(raise_bad_str, (), {})))
    assert not ok
    assert type(exc) is BadStrError and exc.args == ("payload",)
    assert isinstance(exc.__cause__, RemoteTraceback) and "raise_bad_str" in str(exc.__cause__)
    assert s.safe_str(exc) == "<str() failed: ValueError>"


def test_a_result_whose_pickling_raises_system_exit_is_an_error_outcome() -> None:
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(returns_exits_when_pickled, (), {})))
    assert not ok
    assert isinstance(exc, SerializationError)
    assert "the result (ExitsWhenPickled)" in str(exc) and "SystemExit: not from pickling, please" in str(exc)


def test_a_worker_survives_both() -> None:
    from remote_executor import RemoteExecutor

    with RemoteExecutor(1, transport="tcp", max_retries=0) as ex:
        with pytest.raises(BadStrError):
            ex.submit(raise_bad_str).result(timeout=60)
        with pytest.raises(SerializationError):
            ex.submit(returns_exits_when_pickled).result(timeout=60)
        assert ex.submit(divide, 1, 4).result(timeout=60) == 0.25
        (worker,) = ex.status().workers  # the same worker process answered all three
        assert (worker.done, worker.failed) == (3, 2)


class Block:
    """Pickled as numpy arrays are: its memory as an out-of-band buffer, rebuilt as a view of what arrives."""

    def __init__(self, data: object) -> None:
        self.view = memoryview(data)  # type: ignore[arg-type]

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return (Block, (pickle.PickleBuffer(self.view),))


def bump(block: Block) -> Block:
    block.view[0] = (block.view[0] + 1) % 256  # in place, as `array += 1` would
    return block


@pytest.mark.parametrize("size", [100, 100_000])
def test_out_of_band_buffers_arrive_writable(size: int) -> None:
    parts = s.encode_call(bump, (Block(bytearray(size)),), {})
    assert len(parts) == 2  # the block travels out of band
    received = [bytes(part) for part in parts]  # as a receiver parses small parts: read-only bytes
    ok, block = s.decode_outcome(s.run_task(received))
    assert ok and not block.view.readonly and block.view[0] == 1 and len(block.view) == size


@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_a_worker_can_change_an_array_it_was_sent(transport: str) -> None:
    from remote_executor import RemoteExecutor

    with RemoteExecutor(1, transport=transport) as ex:
        for size in (100, 100_000, 3_000_000):
            block = ex.submit(bump, Block(bytearray(size))).result(timeout=60)
            assert block.view[0] == 1 and not block.view.readonly, size
