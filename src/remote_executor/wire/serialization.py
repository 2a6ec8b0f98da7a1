"""Everything that turns calls, results and exceptions into bytes and back, for both sides of the wire.

A message body is a list of buffers: the pickle stream first, then the pickle protocol 5 out-of-band
buffers (large numpy arrays, ``PickleBuffer`` objects), which transports send as their own frames without
copying. Envelopes are plain tuples so the job server never needs to unpickle anything:

    call      ("call", fn, args, kwargs)          chunk    ("chunk", fn, [args, ...])
    outcome   ("ok", value) | ("raise", error) | ("chunk", [value, ...], error | None)
    error     (pickled exception or None, type name, message, remote traceback text)

The caller re-raises the original exception type with a :class:`RemoteTraceback` as ``__cause__``; an
exception that cannot be pickled there or unpickled here arrives as :class:`RemoteError`.
"""

from __future__ import annotations

import io
import pickle
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import FunctionType
from typing import Any

import cloudpickle

from ..errors import RemoteError, RemoteTraceback, SerializationError

Buffer = bytes | bytearray | memoryview
Parts = list[Buffer]
ErrorInfo = tuple[bytes | None, str, str, str]

PROTOCOL = 5


def dumps(obj: object) -> Parts:
    """Pickle ``obj``; out-of-band buffers follow the stream as separate parts.

    The standard library pickler is tried first: it is ten times faster than cloudpickle's for the
    common case (functions and classes importable by name everywhere). Anything that needs pickling by
    value — lambdas, closures, objects from ``__main__`` or from modules registered with
    ``cloudpickle.register_pickle_by_value`` — makes it give up, and cloudpickle does the whole object.
    """
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    try:
        _FastPickler(stream, PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except Exception:
        return _cloudpickle_dumps(obj)
    return [stream.getvalue(), *(buf.raw() for buf in buffers)]


def _cloudpickle_dumps(obj: object) -> Parts:
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return [data, *(buf.raw() for buf in buffers)]


def _by_value(fn: object) -> bool:
    """Whether cloudpickle must pickle ``fn`` by value (so the stdlib pickler would fail on it)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    return module == "__main__" or module in _by_value_modules() or "<" in qualname


class _NeedsCloudpickle(Exception):
    """Raised inside the fast pickler for an object that only cloudpickle pickles correctly."""


class _FastPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for every object except plain containers and scalars, so keep it cheap.
        module = getattr(obj, "__module__", None) if isinstance(obj, (type, FunctionType)) else None
        if module is None:
            module = type(obj).__module__
        if module == "__main__" or module in _by_value_modules():
            raise _NeedsCloudpickle(module)
        return NotImplemented


def _by_value_modules() -> set[str]:
    registered: set[str] = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    return registered


def loads(parts: Sequence[Buffer]) -> Any:
    """Inverse of :func:`dumps`."""
    return pickle.loads(parts[0], buffers=parts[1:])


def describe(fn: object) -> str:
    """A short, human name for a callable, for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else repr(fn)


# --- caller side -----------------------------------------------------------------------------------


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parts:
    """Serialize one call; a :class:`SerializationError` names the argument that failed to pickle."""
    try:
        if _by_value(fn):  # the fast pickler would only give up on it: skip the attempt
            return _cloudpickle_dumps(("call", fn, args, kwargs))
        return dumps(("call", fn, args, kwargs))
    except Exception as exc:
        raise _pickling_error(exc, fn, args, kwargs) from exc


def encode_chunk(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]) -> Parts:
    """Serialize a batch of calls of one function (``map`` with ``chunksize > 1``)."""
    try:
        return dumps(("chunk", fn, list(items)))
    except Exception as exc:
        culprits = (_culprit(fn, args, {}) for args in items)
        culprit = next((c for c in culprits if c != "the call"), "the call")
        raise SerializationError(_message("pickle", culprit, fn, exc)) from exc


def encode_initializer(fn: Callable[..., Any], args: tuple[Any, ...]) -> Parts:
    """Serialize an initializer and its arguments."""
    return encode_call(fn, args, {})


def decode_outcome(parts: Sequence[Buffer]) -> tuple[bool, Any]:
    """Decode an outcome envelope: ``(True, value)``, ``(False, exception)`` or, for a chunk,
    ``(True, (values, exception_or_None))``."""
    try:
        envelope = loads(parts)
    except Exception as exc:
        error = SerializationError(f"cannot unpickle the result: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return False, error
    tag = envelope[0]
    if tag == "ok":
        return True, envelope[1]
    if tag == "raise":
        return False, rebuild_exception(envelope[1])
    values, error = envelope[1], envelope[2]
    return True, (values, None if error is None else rebuild_exception(error))


def rebuild_exception(info: ErrorInfo) -> BaseException:
    """The caller-side exception for an :data:`ErrorInfo`, with the remote traceback as its cause."""
    blob, type_name, message, tb_text = info
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob is not None else RemoteError(type_name, message, tb_text)
        if not isinstance(exc, BaseException):
            raise TypeError(f"unpickled a {type(exc).__name__}, not an exception")
    except Exception:
        exc = RemoteError(type_name, message, tb_text)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc


# --- worker side -----------------------------------------------------------------------------------


def run_task(parts: Sequence[Buffer]) -> Parts:
    """Run a serialized call or chunk and return its serialized outcome; never raises."""
    try:
        envelope = loads(parts)
    except BaseException as exc:
        wrapped = SerializationError(f"cannot unpickle the call on the worker: {type(exc).__name__}: {exc}")
        return error_outcome(wrapped, exc)
    wrong = _bad_envelope(envelope)
    if wrong is not None:  # a pickle of something else (another program's, another version's): no call
        return error_outcome(SerializationError(f"the worker received no call it can run: {wrong}"))
    if envelope[0] == "chunk":
        return _run_chunk(envelope[1], envelope[2])
    fn, args, kwargs = envelope[1], envelope[2], envelope[3]
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return error_outcome(exc)
    return _encode_value(fn, value)


def _bad_envelope(envelope: object) -> str | None:
    """What is wrong with an unpickled call envelope (see the module docstring), or None if it has the shape
    of one. Only exact built-in types are looked into: a subclass could run code in ``__eq__`` or ``len``."""
    shape = "expected ('call', fn, args, kwargs) or ('chunk', fn, [args, ...])"
    if type(envelope) is not tuple or not envelope or type(envelope[0]) is not str:
        return f"{shape}, got a {type(envelope).__name__}"
    tag = envelope[0]
    if tag == "call":
        if len(envelope) != 4 or type(envelope[2]) is not tuple or type(envelope[3]) is not dict:
            return f"{shape}, got a 'call' of {len(envelope)} items"
    elif tag == "chunk":
        if len(envelope) != 3 or type(envelope[2]) is not list or any(type(a) is not tuple for a in envelope[2]):
            return f"{shape}, got a 'chunk' of {len(envelope)} items"
    else:
        return f"{shape}, got the tag {tag[:40]!r}"
    if not callable(envelope[1]):
        return f"the function to call is a {type(envelope[1]).__name__}, which is not callable"
    return None


def run_initializer(parts: Sequence[Buffer]) -> Parts | None:
    """Run a serialized initializer: ``None`` on success, else the serialized error outcome."""
    outcome = run_task(parts)
    return outcome if loads_tag(outcome) != "ok" else None


def loads_tag(outcome: Sequence[Buffer]) -> str:
    """The tag of an outcome envelope ("ok", "raise", "chunk")."""
    return str(loads(outcome)[0])


def encode_error(exc: BaseException, traceback_from: BaseException | None = None) -> ErrorInfo:
    """Describe an exception for the wire, pickled if it can be (else ``None`` as the blob)."""
    source = traceback_from if traceback_from is not None else exc
    tb_text = "".join(traceback.format_exception(type(source), source, source.__traceback__))
    try:
        blob: bytes | None = cloudpickle.dumps(exc, protocol=PROTOCOL)
    except Exception:
        blob = None
    return (blob, type(exc).__qualname__, str(exc), tb_text)


def _run_chunk(fn: Callable[..., Any], items: Iterable[tuple[Any, ...]]) -> Parts:
    values: list[Any] = []
    error: ErrorInfo | None = None
    for args in items:
        try:
            values.append(fn(*args))
        except BaseException as exc:
            error = encode_error(exc)
            break
    try:
        return dumps(("chunk", values, error))
    except Exception as exc:
        return error_outcome(SerializationError(_message("pickle", "a result", fn, exc)), exc)


def _encode_value(fn: Callable[..., Any], value: Any) -> Parts:
    try:
        return dumps(("ok", value))
    except Exception as exc:
        culprit = f"the result ({type(value).__name__})"
        return error_outcome(SerializationError(_message("pickle", culprit, fn, exc)), exc)


def error_outcome(exc: BaseException, traceback_from: BaseException | None = None) -> Parts:
    """The serialized outcome of a call that raised ``exc``."""
    return [pickle.dumps(("raise", encode_error(exc, traceback_from)), protocol=PROTOCOL)]


def _pickling_error(
    exc: Exception, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> SerializationError:
    return SerializationError(_message("pickle", _culprit(fn, args, kwargs), fn, exc))


def _culprit(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Find which piece of a call fails to pickle (only on the error path, so the cost is fine)."""
    if not _picklable(fn):
        return f"the callable {describe(fn)!r}"
    for index, arg in enumerate(args):
        if not _picklable(arg):
            return f"argument {index} ({type(arg).__name__})"
    for name, value in kwargs.items():
        if not _picklable(value):
            return f"keyword argument {name!r} ({type(value).__name__})"
    return "the call"


def _picklable(obj: object) -> bool:
    try:
        cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        return False
    return True


def _message(verb: str, culprit: str, fn: object, exc: BaseException) -> str:
    return f"cannot {verb} {culprit} of a call to {describe(fn)}: {type(exc).__name__}: {exc}"
