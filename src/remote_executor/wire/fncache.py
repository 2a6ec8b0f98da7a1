"""Functions shipped by value, pickled once on the client and unpickled once on each worker, never stale.

A function of ``__main__``, a lambda, a closure or a notebook cell travels by value: cloudpickle pickles its
code and everything the code reaches (the globals it names, its defaults, its closure cells, its ``__dict__``
and its names), which costs tens of µs per call on each side. Repeated calls of the same function mostly
ship the same bytes, so:

- **Client** (:func:`pickled_function`): the bytes are kept per code object with a *fingerprint* of every
  value cloudpickle would capture, and reused only while a fresh fingerprint, taken on every call, is equal.
  The fingerprint is a list of object identities: sound for values that cannot change in place (numbers,
  strings, bytes, ``None``, tuples and frozensets of such, modules, functions and classes pickled by name),
  kept alive by the cache entry so that an identity cannot be reused. Mutable containers (lists, dicts,
  sets), closure cells and other by-value functions are walked on every call, element by element, so an
  in-place change is seen. Anything else (an instance, a class defined in ``__main__``, a bound method, an
  array) cannot be fingerprinted cheaply: such a function is pickled in full on every call, as before.
- **Worker** (:func:`load_function`): the unpickled function is kept in a bounded LRU keyed by the exact
  bytes, so the same bytes are unpickled once. The client allows it only for a function that cannot carry
  state from one call to the next: one that reaches no list, dict or set, and whose code never assigns a
  global (``global x``) or a variable of an enclosing function (``nonlocal x``), sets no attribute, and
  names none of the built-ins and attributes that reach a function's globals, defaults or attributes
  (``globals``, ``setattr``, ``__defaults__``...). Any other function is unpickled afresh for every call,
  so each call starts from the client's values, exactly as without the cache.
"""

from __future__ import annotations

import dis
import functools
import pickle
import sys
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import cloudpickle

MAX_FUNCTION_BYTES = 1 << 20  # bigger pickles (a function carrying a big value) are kept by neither side


class _Marker:
    """A value of our own in a fingerprint, standing for something that has no object."""


_ABSENT = _Marker()  # a name the code uses that the globals do not hold (a builtin, or not defined yet)
_EMPTY = _Marker()  # the contents of an empty closure cell
_MAX_TOKENS = 1024  # a fingerprint longer than this (a big list in the globals) costs more than it saves

# Markers in a fingerprint, told apart from identities (which are positive) by their sign.
_FUNCTION, _SEEN, _LIST, _DICT, _SET, _MODULE, _BY_NAME, _NONE, _EMPTY_DICT, _END = range(-1, -11, -1)

_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None), type(Ellipsis), range})
_LEAVES = _SCALARS | {_Marker}
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # cloudpickle ships these too
# What lets a function change what the client shipped it with, so that a copy a worker kept would carry the
# change into the next call: assigning a global (``global x``) or an enclosing function's variable
# (``nonlocal x``), setting an attribute (of a function, say), and the built-ins and attributes that reach
# the globals, defaults or attributes of a function. (The lists, dicts and sets it reaches are found by
# the fingerprint itself.)
_STATEFUL_OPS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_ATTR", "DELETE_ATTR"})
_CELL_OPS = frozenset({"STORE_DEREF", "DELETE_DEREF"})
_STATEFUL_NAMES = frozenset({"globals", "vars", "setattr", "delattr", "exec", "eval", "__dict__", "__defaults__",
                             "__kwdefaults__", "__code__", "__globals__", "__closure__", "f_globals"})


class _Unsound(Exception):
    """A value the fingerprint cannot vouch for: the function is pickled in full."""


@dataclass(eq=False)
class _Entry:
    registered: frozenset[str]  # the modules registered for pickling by value, when the bytes were made
    tokens: list[int]
    blob: bytes
    reusable: bool  # whether a worker may run its unpickled copy for more than one call
    keep: list[object]  # the leaves behind the identities, kept alive so that no identity is reused (the
    # functions, containers and cells met are not kept: their contents are walked on every call)
    immutable: set[int]  # identities of the tuples checked to hold immutables only
    names: dict[int, tuple[str, ...]]  # per code object (by identity) of the functions walked: its globals
    valid: bool = True
    # The code objects of the other functions walked, watched: an identity in ``tokens`` must not outlive its
    # code (the entry's own code is its key, and the entry goes with it).
    watch: list[weakref.ref[types.CodeType]] = field(default_factory=list)

    def forget(self, _code: object) -> None:
        self.valid = False


@dataclass
class Stats:
    """Counts, for tests: a hit is a pickling or an unpickling skipped."""

    pickled: int = 0
    pickle_hits: int = 0
    unpickled: int = 0
    unpickle_hits: int = 0


stats = Stats()
_entries: weakref.WeakKeyDictionary[types.CodeType, _Entry] = weakref.WeakKeyDictionary()


# The modules registered with ``cloudpickle.register_pickle_by_value`` (their functions travel by value): the
# set cloudpickle changes in place, looked at on every call.
REGISTERED: set[str] = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())


def is_registered(module: str, registered: Iterable[str]) -> bool:
    """Whether ``module`` or a package it belongs to is registered for pickling by value."""
    return any(module == name or module.startswith(name + ".") for name in registered)


# --- client ----------------------------------------------------------------------------------------


def pickled_function(fn: types.FunctionType, pickle_fn: Callable[[object], bytes]) -> tuple[bytes, bool] | None:
    """The pickled bytes of ``fn`` (a function shipped by value) and whether a worker may reuse its copy, or
    None when its state cannot be fingerprinted (the caller pickles it with the call, as it always did).
    ``pickle_fn`` pickles a function by value, in band."""
    if not _understood():
        return None
    registered = REGISTERED
    entry = _entries.get(fn.__code__)
    try:
        if entry is not None and entry.valid and entry.registered == registered and _same(fn, entry):
            stats.pickle_hits += 1
            return entry.blob, entry.reusable
        return _fill(fn, pickle_fn, frozenset(registered))
    except Exception:  # _Unsound, a dict another thread resized as we walked it, a failure to pickle...
        return None  # ...the caller pickles the function with the call, as it always did (and reports that)


# What cloudpickle captures of a function besides its code and its __dict__: the fingerprint covers these
# (the globals, through the names the code uses, and the submodules, through the count of modules).
_CAPTURED = frozenset({"__annotations__", "__closure__", "__defaults__", "__doc__", "__globals__",
                       "__kwdefaults__", "__module__", "__name__", "__qualname__", "_cloudpickle_submodules"})


@functools.cache
def _understood() -> bool:
    """Whether this cloudpickle captures what the fingerprint covers: another version may capture more,
    and then the cache stays off rather than miss a change."""
    getstate = getattr(cloudpickle.cloudpickle, "_function_getstate", None)
    try:
        slots = getstate(lambda: None)[1]  # type: ignore[misc]
    except Exception:
        return False
    return isinstance(slots, dict) and set(slots) == _CAPTURED


def _same(fn: types.FunctionType, entry: _Entry) -> bool:
    try:
        return _Walk(entry.immutable, entry.names).function(fn) == entry.tokens
    except _Unsound:  # a value the entry has not proved immutable (a new tuple, say): _fill looks closer
        return False


def _fill(fn: types.FunctionType, pickle_fn: Callable[[object], bytes],
          registered: frozenset[str]) -> tuple[bytes, bool]:
    walk = _Walk(set(), {}, check=True)
    tokens = walk.function(fn)
    blob = pickle_fn(fn)
    stats.pickled += 1
    # Walked again after pickling: a change made meanwhile (by another thread) must not pair old tokens with
    # newer bytes. If they differ, the bytes are used for this call only. Big pickles are not kept: the entry
    # would hold the bytes and the values behind them (a 50 MB global read by a __main__ function) for as
    # long as the function's code lives, that is for good, while pickling them costs little next to
    # sending them, which every call does anyway.
    if len(blob) <= MAX_FUNCTION_BYTES and _Walk(walk.immutable, walk.names).function(fn) == tokens:
        entry = _Entry(registered, tokens, blob, not walk.stateful, walk.keep, walk.immutable, walk.names)
        entry.watch = [weakref.ref(code, entry.forget) for code in walk.codes if code is not fn.__code__]
        _entries[fn.__code__] = entry
    return blob, not walk.stateful


class _Walk:
    """One fingerprint: the identities of everything cloudpickle captures of a function, in its order.

    ``check`` (when filling the cache): also keep the leaves alive, prove tuples immutable, and find out
    whether the function can carry state from one call to the next (``stateful``). Without it, a value is
    only looked into when it is not a leaf, so an identity the cache kept alive stands for its whole value."""

    __slots__ = ("check", "codes", "immutable", "keep", "modules", "names", "registered", "seen", "stateful",
                 "tokens")

    def __init__(self, immutable: set[int], names: dict[int, tuple[str, ...]], check: bool = False) -> None:
        self.tokens: list[int] = []
        self.seen: dict[int, int] = {}
        self.immutable = immutable
        self.names = names
        self.check = check
        self.keep: list[object] = []
        self.codes: list[types.CodeType] = []
        self.stateful = False
        self.modules = False
        self.registered = REGISTERED

    def function(self, fn: types.FunctionType) -> list[int]:
        self._function(fn)
        if self.modules:  # cloudpickle also ships which submodules of those modules are imported
            self.tokens.append(len(sys.modules))
        return self.tokens

    def _function(self, fn: types.FunctionType) -> None:
        if self._seen(fn):
            return
        code, names = fn.__code__, fn.__globals__
        self.tokens += (_FUNCTION, id(code), id(names))
        used = self.names.get(id(code))
        if used is None:
            used = _global_names(code)
            if self.check:
                self.names[id(code)] = used
                self.codes.append(code)
                self.stateful = self.stateful or _assigns_state(code)
        values = list(map(names.get, used, repeat(_ABSENT, len(used))))
        values += map(names.get, _BASE_GLOBALS, repeat(_ABSENT, len(_BASE_GLOBALS)))
        values += (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, fn.__defaults__)
        if fn.__closure__ is not None:
            self.tokens.extend(map(id, fn.__closure__))  # cells two functions share stay shared
            values += map(_contents, fn.__closure__)
        for own in (fn.__kwdefaults__, fn.__annotations__, fn.__dict__):  # its own: changing them is not state
            if own is None or not own:
                self.tokens.append(_NONE if own is None else _EMPTY_DICT)
            elif not self._seen(own):
                self.tokens += (_DICT, len(own))
                values += own
                values += own.values()
        if len(values) > _MAX_TOKENS:
            raise _Unsound("too much to fingerprint")
        self._values(values)

    def _values(self, values: list[Any]) -> None:
        """The values' identities, then, for each value that is not a leaf, its index and what it holds, then
        an end marker. Markers are negative, indices small and identities large, so two equal fingerprints
        have the same shape, and a leaf of one (kept alive by the entry) is the very same object in the
        other."""
        tokens = self.tokens
        tokens.extend(map(id, values))
        if self.check or not _LEAVES.issuperset(map(type, values)):  # else the common case: no loop in Python
            for index, value in enumerate(values):
                kind = type(value)
                if kind in _LEAVES or id(value) in self.immutable:
                    if self.check:
                        self.keep.append(value)
                elif self.check and _maybe_immutable(kind) and _immutable(value, self.registered):
                    self.immutable.add(id(value))
                    self.keep.append(value)
                else:
                    tokens.append(index)
                    self._object(value, kind)
        tokens.append(_END)

    def _object(self, value: Any, kind: type) -> None:
        if kind is types.FunctionType and _by_value(value, self.registered):
            self._function(value)
        elif kind is types.ModuleType:
            self._module(value)
        elif isinstance(value, type) or kind in (types.FunctionType, types.BuiltinFunctionType):
            self._by_name(value)
        elif kind in (tuple, list, set, frozenset):
            self._items(value, kind)
        elif kind is dict:
            self._dict(value)
        else:
            raise _Unsound(kind.__qualname__)

    def _seen(self, obj: object) -> bool:
        """For an object the walk met before: a back-reference (cycles end, and sharing shows)."""
        index = self.seen.get(id(obj))
        if index is not None:
            self.tokens += (_SEEN, index)
            return True
        self.seen[id(obj)] = len(self.tokens)
        if len(self.tokens) > _MAX_TOKENS:
            raise _Unsound("too much to fingerprint")
        return False

    def _module(self, module: types.ModuleType) -> None:
        # Pickled by name (so its contents are not shipped) unless registered by value or not importable.
        name = module.__name__
        if name not in sys.modules or (self.registered and is_registered(name, self.registered)):
            raise _Unsound(f"module {name} travels by value")
        self.modules = True
        self.tokens.append(_MODULE)
        if self.check:
            self.keep.append(module)

    def _by_name(self, obj: Any) -> None:
        # Pickled as "module.qualname": sound while that name still finds this very object.
        if not _found_by_name(obj, self.registered):
            raise _Unsound(f"{obj!r} travels by value")
        self.tokens.append(_BY_NAME)
        if self.check:
            self.keep.append(obj)

    def _items(self, items: list[Any] | tuple[Any, ...] | set[Any] | frozenset[Any], kind: type) -> None:
        if self._seen(items):
            return
        if kind is not tuple:
            self.stateful = True
        if len(items) > _MAX_TOKENS:
            raise _Unsound("too much to fingerprint")
        self.tokens += (_LIST if kind in (list, tuple) else _SET, id(kind), len(items))
        self._values(list(items))

    def _dict(self, mapping: dict[Any, Any]) -> None:
        if self._seen(mapping):
            return
        self.stateful = True
        if len(mapping) > _MAX_TOKENS:
            raise _Unsound("too much to fingerprint")
        self.tokens += (_DICT, len(mapping))
        self._values([*mapping, *mapping.values()])


def _contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet: a recursive closure's own name, before it is assigned
        return _EMPTY


def _by_value(fn: types.FunctionType, registered: Iterable[str]) -> bool:
    """Whether cloudpickle pickles this function by value (else by name, as :func:`_found_by_name` checks)."""
    module = fn.__module__
    if module == "__main__" or "<" in fn.__qualname__:
        return True
    return bool(registered) and is_registered(module or "", registered)


def _found_by_name(obj: Any, registered: Iterable[str]) -> bool:
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if type(module_name) is not str or type(qualname) is not str or module_name == "__main__":
        return False
    if registered and is_registered(module_name, registered):
        return False
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, _ABSENT)
    return found is obj


def _maybe_immutable(kind: type) -> bool:
    return kind in (tuple, frozenset, types.GenericAlias, types.UnionType) or kind.__module__ == "typing"


def _immutable(value: object, registered: Iterable[str]) -> bool:
    """Whether a value holds (recursively) only values that cannot change: scalars, functions and classes
    pickled by name, and tuples, frozensets and type annotations (``list[int]``, ``int | None``,
    ``typing.Optional[int]``) of those."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind in (tuple, frozenset):
        return all(_immutable(item, registered) for item in value)  # type: ignore[attr-defined]
    if _maybe_immutable(kind) and hasattr(value, "__origin__"):
        # Annotated[T, x, ...] keeps its x in __metadata__, which cloudpickle ships too.
        parts = (getattr(value, "__origin__", None), *getattr(value, "__args__", ()),
                 *getattr(value, "__metadata__", ()))
        return all(_immutable(part, registered) for part in parts)
    if isinstance(value, type) or kind in (types.FunctionType, types.BuiltinFunctionType):
        return _found_by_name(value, registered)
    return False


_state_cache: weakref.WeakKeyDictionary[types.CodeType, bool] = weakref.WeakKeyDictionary()


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code (and the code nested in it) may read as a global: a superset of what cloudpickle
    ships, so nothing it captures is left out of the fingerprint."""
    return tuple(dict.fromkeys(name for each in _codes(code) for name in each.co_names))


def _assigns_state(code: types.CodeType) -> bool:
    """Whether the code assigns a global or a variable of an enclosing function: it would carry state from
    one call to the next in a copy a worker kept."""
    stateful = _state_cache.get(code)
    if stateful is None:
        codes = _codes(code)
        stateful = _state_cache[code] = any(not _STATEFUL_NAMES.isdisjoint(each.co_names) for each in codes) or any(
            op.opname in _STATEFUL_OPS or (op.opname in _CELL_OPS and op.argval in each.co_freevars)
            for each in codes for op in dis.get_instructions(each))
    return stateful


def _codes(code: types.CodeType) -> list[types.CodeType]:
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _codes(const)
    return found


# --- worker ----------------------------------------------------------------------------------------

MAX_FUNCTIONS = 128

_loaded: OrderedDict[bytes, object] = OrderedDict()
_loaded_lock = threading.Lock()


def load_function(blob: bytes, reusable: bool) -> object:
    """Unpickle a function shipped by value; the same bytes, when the client allows it, only once."""
    if not reusable or len(blob) > MAX_FUNCTION_BYTES:
        stats.unpickled += 1
        return pickle.loads(blob)
    with _loaded_lock:
        fn = _loaded.get(blob)
        if fn is not None:
            _loaded.move_to_end(blob)
            stats.unpickle_hits += 1
            return fn
    fn = pickle.loads(blob)
    stats.unpickled += 1
    with _loaded_lock:
        _loaded[blob] = fn
        while len(_loaded) > MAX_FUNCTIONS:
            _loaded.popitem(last=False)
    return fn


def clear() -> None:
    """Forget every cached pickle and unpickled function (for tests and benchmarks)."""
    with _loaded_lock:
        _loaded.clear()
    _entries.clear()
