"""Remote tracebacks that show the caller's source, for functions shipped by value.

cloudpickle renames the file of every code object it pickles by value to ``<dynamic-code>``, so a call that
raised in a lambda, a ``__main__`` function or a notebook cell showed ``File "<dynamic-code>", line 5`` and
no source. Here:

- the client's pickler keeps each such code object's real file name (line numbers already survive);
- the worker remembers which code objects arrived by value, and formats a traceback without reading their
  lines from its own disk: a worker on another machine has no such file, or another version of it at the
  same path, and the code that ran is the client's;
- the client fills each frame that came without a source line from its own ``linecache``, which knows the
  script, the module and the notebook cells the code came from.
"""

from __future__ import annotations

import contextlib
import linecache
import re
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

# Code objects this process unpickled by value: the worker formats their frames without source lines.
_shipped: weakref.WeakSet[types.CodeType] = weakref.WeakSet()
_format_lock = threading.Lock()  # linecache is process-wide: one traceback hides its entries at a time

_CodeReducer = Callable[[types.CodeType], tuple[Callable[..., types.CodeType], tuple[Any, ...]]]
_cloudpickle_reduce: _CodeReducer = cloudpickle.Pickler.dispatch_table[types.CodeType]


def reduce_code(code: types.CodeType) -> tuple[Callable[..., types.CodeType], tuple[Any, ...]]:
    """cloudpickle's reduction of a code object, plus the file name it drops."""
    constructor, args = _cloudpickle_reduce(code)
    return _rebuild_code, (constructor, args, code.co_filename)


def _rebuild_code(constructor: Callable[..., types.CodeType], args: tuple[Any, ...],
                  filename: str) -> types.CodeType:
    code = constructor(*args).replace(co_filename=filename)
    _shipped.add(code)
    return code


def format_exception(exc: BaseException, skip_frames: int = 0) -> str:
    """The traceback text of ``exc`` as the worker sends it; frames of code shipped by value have no
    source line (the client adds its own). ``skip_frames`` drops the outermost frames (our own)."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None else None
    with _format_lock, _hidden(_shipped_files(exc)):
        return "".join(traceback.format_exception(type(exc), exc, tb))


def _shipped_files(exc: BaseException) -> set[str]:
    """The files of the frames of code shipped by value, in ``exc`` and every exception chained to it."""
    files: set[str] = set()
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        frames = traceback.walk_tb(current.__traceback__)
        files.update(frame.f_code.co_filename for frame, _ in frames if frame.f_code in _shipped)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        todo.extend(e for e in getattr(current, "exceptions", ()) if isinstance(e, BaseException))
    return files


@contextlib.contextmanager
def _hidden(files: set[str]) -> Iterator[None]:
    """Make ``linecache`` find no lines for ``files`` while the block runs, then restore it.

    An entry whose modification time is None is one ``checkcache`` keeps as it is (as for source a loader
    gave), so the empty entry survives the traceback module's own checks."""
    saved = {name: linecache.cache[name] for name in files if name in linecache.cache}
    for name in files:
        linecache.cache[name] = (0, None, [], name)
    try:
        yield
    finally:
        for name in files:
            linecache.cache.pop(name, None)
        linecache.cache.update(saved)


# A frame line of a formatted traceback (also inside an exception group's "  | " margin), and a source line.
_FRAME = re.compile(r'^(?P<margin>.*?)  File "(?P<file>.+)", line (?P<line>\d+), in ')


def add_source_lines(text: str) -> str:
    """Add, below each frame of a worker's traceback text that has none, the source line this process has
    for it (the file and line the frame names), indented as the traceback module does."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for index, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        if match is None:
            continue
        below = lines[index + 1] if index + 1 < len(lines) else ""
        if below.startswith(match["margin"] + "    "):
            continue  # the worker had the line
        source = linecache.getline(match["file"], int(match["line"])).strip()
        if source:
            out.append(f"{match['margin']}    {source}\n")
    return "".join(out)
