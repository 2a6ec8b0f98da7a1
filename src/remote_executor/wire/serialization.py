"""Everything that turns calls, results and exceptions into bytes and back, for both sides of the wire.

A message body is a list of buffers: the pickle stream first, then the pickle protocol 5 out-of-band
buffers (large numpy arrays, ``PickleBuffer`` objects), which transports send as their own frames without
copying. Envelopes are plain tuples so the job server never needs to unpickle anything:

    call      ("call", fn, args, kwargs[, True])  chunk    ("chunk", fn, [args, ...][, True])
    fn        the callable, or (pickled function, reusable) for a function shipped by value (see :mod:`.fncache`)
    outcome   ("ok", value[, output]) | ("raise", error[, output]) | ("chunk", [value, ...], error | None[, output])
    error     (pickled exception or None, type name, message, remote traceback text)
    output    (worker name, [(1 for stdout or 2 for stderr, text), ...])

The optional last ``True`` of a call asks the worker to capture what it prints (:mod:`.output`); only then
does its outcome carry the ``output`` element, so a call without it is the same on the wire as ever.

The caller re-raises the original exception type with a :class:`RemoteTraceback` as ``__cause__``; an
exception that cannot be pickled there or unpickled here arrives as :class:`RemoteError`.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from collections import ChainMap
from collections.abc import Callable, Iterable, Sequence
from types import FunctionType
from typing import Any

import cloudpickle

from ..errors import RemoteError, RemoteTraceback, SerializationError
from .fncache import REGISTERED, is_registered, load_function, pickled_function
from .output import Output, Piece, captured
from .tracebacks import add_source_lines, format_exception, reduce_code

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
    if not buffers:  # most outcomes: no generator to run for nothing (this is every call's result)
        return [stream.getvalue()]
    return [stream.getvalue(), *(buf.raw() for buf in buffers)]


def _cloudpickle_dumps(obj: object) -> Parts:
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _ByValuePickler(stream, protocol=PROTOCOL, buffer_callback=buffers.append).dump(obj)
    return [stream.getvalue(), *(buf.raw() for buf in buffers)]


class _ByValuePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, except that code keeps its file name, for tracebacks (see :mod:`.tracebacks`),
    and that a ``functools.lru_cache`` (or ``cache``) or ``singledispatch`` function defined in ``__main__``
    travels by value too: pickle would send the first by name, which the workers' ``__main__`` does not have,
    and could not pickle the second's cache."""

    dispatch_table = ChainMap({types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is FunctionType and obj.__code__ is _SINGLEDISPATCH_CODE and _by_value(obj):
            # Its closure holds a cache of weak references, which cannot be pickled: sent as what it is made
            # of, the function and the implementations registered for each type.
            dispatching: Any = obj  # (a function with the attributes singledispatch gives it)
            return _singledispatched, (dispatching.__wrapped__, dict(dispatching.registry))
        if type(obj) is _LRU_CACHE_WRAPPER and _by_value(obj):
            # The cache stays here; the worker's lasts for the call (kept longer, it could hand back a value
            # computed with a global changed since).
            parameters = obj.cache_parameters()
            return _lru_cached, (obj.__wrapped__, parameters["maxsize"], parameters["typed"])
        return super().reducer_override(obj)


_LRU_CACHE_WRAPPER = type(functools.lru_cache(maxsize=None)(lambda: None))


def _any(value: object) -> None:
    """(a function to make a singledispatch function of, once, for its wrapper's code)"""


_SINGLEDISPATCH_CODE = getattr(functools.singledispatch(_any), "__code__", None)  # every such function's wrapper


def _singledispatched(fn: Callable[..., Any], registry: dict[Any, Callable[..., Any]]) -> Callable[..., Any]:
    """On the worker: ``fn`` made a ``functools.singledispatch`` function again, with its implementations."""
    dispatching = functools.singledispatch(fn)
    for cls, implementation in registry.items():
        if cls is not object:  # (``fn`` itself)
            dispatching.register(cls, implementation)
    return dispatching


def _lru_cached(fn: Callable[..., Any], maxsize: int | None, typed: bool) -> Callable[..., Any]:
    """On the worker: ``fn`` cached as it was in the caller's process."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(fn)


def _pickle_function(fn: object) -> bytes:
    """A function pickled by value on its own, in band (see :mod:`.fncache`)."""
    stream = io.BytesIO()
    _ByValuePickler(stream, protocol=PROTOCOL).dump(fn)
    return stream.getvalue()


def _by_value(fn: object) -> bool:
    """Whether cloudpickle must pickle ``fn`` by value (so the stdlib pickler would fail on it)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module == "__main__" or "<" in str(qualname):
        return True
    return bool(REGISTERED) and type(module) is str and is_registered(module, REGISTERED)


def _pickled(fn: Callable[..., Any]) -> tuple[bytes, bool] | None:
    """For a function shipped by value: its cached pickle and whether a worker may reuse its unpickled copy,
    or None to pickle it with the call (when :mod:`.fncache` cannot vouch for it)."""
    return pickled_function(fn, _pickle_function) if type(fn) is FunctionType else None


class _NeedsCloudpickle(Exception):
    """Raised inside the fast pickler for an object that only cloudpickle pickles correctly."""


class _FastPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for every object except plain containers and scalars, so keep it cheap.
        cls = type(obj)
        module = getattr(obj, "__module__", None) if isinstance(obj, (type, FunctionType)) \
            or cls is _LRU_CACHE_WRAPPER else None
        if module is None:
            module = cls.__module__
        if module == "__main__":
            raise _NeedsCloudpickle(module)
        if REGISTERED and is_registered(module, REGISTERED):  # a registered package's modules are too
            raise _NeedsCloudpickle(module)
        return NotImplemented


def loads(parts: Sequence[Buffer]) -> Any:
    """Inverse of :func:`dumps`."""
    return pickle.loads(parts[0], buffers=writable(parts) if len(parts) > 1 else None)


def writable(parts: Sequence[Buffer]) -> list[Buffer]:
    """The out-of-band buffers of ``parts`` (all but the first) as pickle must get them: writable, as the
    sender's were and as an in-band pickle would rebuild them (a numpy array comes back writable, as from
    ProcessPoolExecutor). A large part arrives in a buffer of its own, writable already; a small one is
    parsed out as ``bytes`` and copied here."""
    return [part if not memoryview(part).readonly else bytearray(part) for part in parts[1:]]


def describe(fn: object) -> str:
    """A short, human name for a callable, for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else repr(fn)


# --- caller side -----------------------------------------------------------------------------------


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                output: bool = False) -> Parts:
    """Serialize one call; a :class:`SerializationError` names the argument that failed to pickle.

    ``output``: the worker captures what the call prints and sends it back with the outcome."""
    try:
        if not _by_value(fn):
            return dumps(("call", fn, args, kwargs, True) if output else ("call", fn, args, kwargs))
        pickled = _pickled(fn)
        shipped = fn if pickled is None else pickled
        envelope = ("call", shipped, args, kwargs, True) if output else ("call", shipped, args, kwargs)
        # Pickled with the call, the function needs cloudpickle: the fast pickler would only give up on it.
        return _cloudpickle_dumps(envelope) if pickled is None else dumps(envelope)
    except Exception as exc:
        raise _pickling_error(exc, fn, args, kwargs) from exc


def encode_chunk(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], output: bool = False) -> Parts:
    """Serialize a batch of calls of one function (``map`` with ``chunksize > 1``)."""
    try:
        pickled = _pickled(fn) if _by_value(fn) else None
        shipped = fn if pickled is None else pickled
        return dumps(("chunk", shipped, list(items), True) if output else ("chunk", shipped, list(items)))
    except Exception as exc:
        culprits = (_culprit(fn, args, {}) for args in items)
        culprit = next((c for c in culprits if c != "the call"), "the call")
        raise SerializationError(_message("pickle", culprit, fn, exc)) from exc


def encode_initializer(fn: Callable[..., Any], args: tuple[Any, ...]) -> Parts:
    """Serialize an initializer and its arguments."""
    return encode_call(fn, args, {})


def decode_outcome(parts: Sequence[Buffer],
                   on_output: Callable[[Output], object] | None = None) -> tuple[bool, Any]:
    """Decode an outcome envelope: ``(True, value)``, ``(False, exception)`` or, for a chunk,
    ``(True, (values, exception_or_None))``. What the call printed, if the worker captured it, goes to
    ``on_output`` first."""
    try:
        envelope = loads(parts)
    except BaseException as exc:
        # BaseException too: what a result's __reduce__ raises is the result's doing, KeyboardInterrupt or
        # SystemExit included (no real Ctrl-C lands here: this runs off the main thread, or with Ctrl-C held
        # off). Raised, it would end the thread that brings every result, and no future would resolve again.
        error = SerializationError(f"cannot unpickle the result: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return False, error
    tag = envelope[0]
    width = 3 if tag == "chunk" else 2  # the elements before the optional output
    if len(envelope) > width and on_output is not None:
        on_output(envelope[width])
    if tag == "ok":
        return True, envelope[1]
    if tag == "raise":
        return False, rebuild_exception(envelope[1])
    values, error = envelope[1], envelope[2]
    return True, (values, None if error is None else rebuild_exception(error))


def rebuild_exception(info: ErrorInfo) -> BaseException:
    """The caller-side exception for an :data:`ErrorInfo`, with the remote traceback as its cause."""
    blob, type_name, message, tb_text = info
    tb_text = add_source_lines(tb_text)
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob is not None else RemoteError(type_name, message, tb_text)
        if not isinstance(exc, BaseException):
            raise TypeError(f"unpickled a {type(exc).__name__}, not an exception")
    except BaseException:  # (as in decode_outcome: the exception's own unpickling raised)
        exc = RemoteError(type_name, message, tb_text)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc


# --- worker side -----------------------------------------------------------------------------------


def run_task(parts: Sequence[Buffer], worker: str | None = None) -> Parts:
    """Run a serialized call or chunk and return its serialized outcome; never raises.

    ``worker`` names this worker in the output of calls that ask for it; None means the call runs in the
    caller's own process (its output is there already), so nothing is captured."""
    return run_task_reporting(parts, worker)[0]


def run_task_reporting(parts: Sequence[Buffer], worker: str | None = None) -> tuple[Parts, bool]:
    """:func:`run_task`, and whether the outcome is an error (the call, or a chunk's call, raised; or it
    could not be unpickled, or its result pickled): what a worker counts as failed, known without
    unpickling the outcome again."""
    try:
        # loads(), inline: this is every call's path
        envelope = pickle.loads(parts[0], buffers=writable(parts) if len(parts) > 1 else None)
        wrong = _bad_envelope(envelope)
        fn: Any = None if wrong is not None else _function(envelope[1])
    except BaseException as exc:
        wrapped = SerializationError(f"cannot unpickle the call on the worker: {type(exc).__name__}: {exc}"
                                     f"{_missing_module_hint(exc)}")
        return error_outcome(wrapped, exc), True
    if wrong is None and fn is not envelope[1] and not callable(fn):  # (by reference: the call raises TypeError)
        wrong = f"the function shipped by value is a {type(fn).__name__}, which is not callable"
    if wrong is not None:  # a pickle of something else (another program's, another version's): no call
        return error_outcome(SerializationError(f"the worker received no call it can run: {wrong}")), True
    chunk = envelope[0] == "chunk"
    wanted = worker is not None and len(envelope) > (3 if chunk else 4) and envelope[-1] is True
    pieces: list[Piece] | None = None
    if not wanted:  # no context manager when nothing is captured: it costs six Python calls per call
        result = _run_chunk(fn, envelope[2]) if chunk else _run_call(fn, envelope[2], envelope[3])
    else:
        with captured() as pieces:
            result = _run_chunk(fn, envelope[2]) if chunk else _run_call(fn, envelope[2], envelope[3])
    output = None if pieces is None or worker is None else (worker, pieces)
    failed = result[0] == "raise" or (chunk and result[2] is not None)
    encoded, pickled = _encode_outcome(fn, result, output)
    return encoded, failed or not pickled


def _function(shipped: Any) -> Any:
    """The function of a checked envelope: itself, or unpickled from the bytes it was shipped as (by value:
    ``(pickle, cacheable)``)."""
    if type(shipped) is tuple and len(shipped) == 2 and type(shipped[0]) is bytes and type(shipped[1]) is bool:
        return load_function(*shipped)
    return shipped


def _run_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:
        return ("raise", encode_error(exc, skip_frames=1))


def _run_chunk(fn: Callable[..., Any], items: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    values: list[Any] = []
    error: ErrorInfo | None = None
    for args in items:
        try:
            values.append(fn(*args))
        except BaseException as exc:
            error = encode_error(exc, skip_frames=1)
            break
    return ("chunk", values, error)


def _encode_outcome(fn: Callable[..., Any], result: tuple[Any, ...], output: Output | None) -> tuple[Parts, bool]:
    """Pickle a call's outcome, with what it printed (if captured) as the last element; False with the error
    outcome if it cannot be pickled."""
    try:
        return dumps(result if output is None else (*result, output)), True
    except BaseException as exc:  # a result's __reduce__ may raise anything, SystemExit included
        culprit = f"the result ({type(result[1]).__name__})" if result[0] == "ok" else "a result"
        return error_outcome(SerializationError(_message("pickle", culprit, fn, exc)), exc, output=output), False


def _missing_module_hint(exc: BaseException) -> str:
    """For a module the worker cannot import: how to get it there (the commonest first-hour mistake)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.split(".")[0]
    return (f". The workers cannot import {top!r}: install it where they run (or start them where it can be "
            f"imported: the embedded cluster's workers get this process's sys.path), or ship it with the call: "
            f"cloudpickle.register_pickle_by_value({top}) in this process before submitting")


def _bad_envelope(envelope: object) -> str | None:
    """What is wrong with an unpickled call envelope (see the module docstring), or None if it has the shape
    of one. Only exact built-in types are looked into: a subclass could run code in ``__eq__`` or ``len``."""
    shape = "expected ('call', fn, args, kwargs[, True]) or ('chunk', fn, [args, ...][, True])"
    if type(envelope) is not tuple or not envelope or type(envelope[0]) is not str:
        return f"{shape}, got a {type(envelope).__name__}"
    tag = envelope[0]
    if tag == "call":
        if (len(envelope) not in (4, 5) or type(envelope[2]) is not tuple or type(envelope[3]) is not dict
                or (len(envelope) == 5 and envelope[4] is not True)):
            return f"{shape}, got a 'call' of {len(envelope)} items"
    elif tag == "chunk":
        if (len(envelope) not in (3, 4) or type(envelope[2]) is not list
                or any(type(a) is not tuple for a in envelope[2]) or (len(envelope) == 4 and envelope[3] is not True)):
            return f"{shape}, got a 'chunk' of {len(envelope)} items"
    else:
        return f"{shape}, got the tag {tag[:40]!r}"
    fn = envelope[1]
    if type(fn) is tuple and not (len(fn) == 2 and type(fn[0]) is bytes and type(fn[1]) is bool):
        return "a function shipped by value must be (pickle, cacheable)"
    # Any other function that is not callable is called all the same: it raises the TypeError that calling
    # it in this process would (``submit(5)``), as in ThreadPoolExecutor, and runs nothing.
    return None


def run_initializer(parts: Sequence[Buffer]) -> Parts | None:
    """Run a serialized initializer: ``None`` on success, else the serialized error outcome."""
    outcome = run_task(parts)
    return outcome if loads_tag(outcome) != "ok" else None


def loads_tag(outcome: Sequence[Buffer]) -> str:
    """The tag of an outcome envelope ("ok", "raise", "chunk")."""
    return str(loads(outcome)[0])


def encode_error(exc: BaseException, traceback_from: BaseException | None = None,
                 skip_frames: int = 0) -> ErrorInfo:
    """Describe an exception for the wire, pickled if it can be (else ``None`` as the blob).

    ``skip_frames`` drops the outermost frames of the traceback: ours, that called the user's function."""
    source = traceback_from if traceback_from is not None else exc
    # User code runs in each step below (__str__, __reduce__, the traceback's objects), and may raise anything,
    # SystemExit included: whatever it raises, the worker answers with what it could describe.
    try:
        tb_text = format_exception(source, skip_frames)
    except BaseException as err:
        tb_text = f"(the traceback could not be formatted: {type(err).__name__})\n"
    try:
        blob: bytes | None = cloudpickle.dumps(exc, protocol=PROTOCOL)
    except BaseException:
        blob = None
    return (blob, type(exc).__qualname__, safe_str(exc), tb_text)


def safe_str(obj: object) -> str:
    """``str(obj)``, or a placeholder if its ``__str__`` raises."""
    try:
        return str(obj)
    except BaseException as err:
        return f"<str() failed: {type(err).__name__}>"


def error_outcome(exc: BaseException, traceback_from: BaseException | None = None,
                  output: Output | None = None) -> Parts:
    """The serialized outcome of a call that raised ``exc`` (with what it printed, if captured)."""
    envelope = ("raise", encode_error(exc, traceback_from))
    return [pickle.dumps(envelope if output is None else (*envelope, output), protocol=PROTOCOL)]


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
    return f"cannot {verb} {culprit} of a call to {describe(fn)}: {type(exc).__name__}: {safe_str(exc)}"
