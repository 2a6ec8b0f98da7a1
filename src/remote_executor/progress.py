"""Progress for long work: ``for result in progress(executor.map(fn, items), total=len(items)): ...``.

:func:`progress` wraps futures or a ``map`` iterator and yields what they yield, counting as it goes: a
``tqdm`` bar when tqdm is installed (``tqdm.auto``: a widget in Jupyter, text in a terminal), else a plain
line on stderr at most every ``interval`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, as_completed

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import, and only the type checker needs these
    from typing import Any, Protocol, TextIO, TypeVar

    T = TypeVar("T")

    class _Counter(Protocol):
        def update(self, n: int = 1) -> object: ...

        def close(self) -> object: ...

__all__ = ["progress"]


def progress(items: Iterable[T], total: int | None = None, desc: str | None = None, *,
             interval: float = 10.0, file: TextIO | None = None) -> Iterator[T]:
    """Yield from ``items`` while showing how many came, of ``total``.

    ``items`` is either a collection of futures (a list, a set, the keys of a dict: what ``submit`` returns),
    yielded as they complete, in completion order (as ``concurrent.futures.as_completed`` does); or any other
    iterable, such as the iterator ``executor.map`` returns, yielded in its own order. ``total`` defaults to
    the number of futures, or to ``len(items)`` when it has one (a ``map`` iterator has none: pass it).

    With tqdm installed (``pip install remote-executor[progress]``) the bar is ``tqdm.auto.tqdm``; without
    it, a line such as ``squares: 40/100 (40%), 12.5/s, 3s elapsed, about 5s left`` is written to ``file``
    (stderr by default) at most every ``interval`` seconds, and a last one when ``items`` ends.
    """
    if interval < 0:
        raise ValueError("interval must be >= 0 seconds")
    futures = _futures(items)
    if total is None:
        total = len(futures) if futures is not None else _length(items)
    source: Iterable[Any] = as_completed(futures) if futures is not None else items
    return _counting(source, _counter(total, desc, interval, file))


def _futures(items: Iterable[Any]) -> list[Future[Any]] | None:
    """The futures of a collection of futures (in no particular order), else None."""
    if not isinstance(items, Collection) or isinstance(items, (str, bytes)):
        return None
    members = list(items)
    if members and all(isinstance(item, Future) for item in members):
        return members
    return None


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _counting(source: Iterable[T], counter: _Counter) -> Iterator[T]:
    try:
        for item in source:
            counter.update(1)  # counted when it arrives: the remote work behind it is done
            yield item
    finally:
        counter.close()


def _counter(total: int | None, desc: str | None, interval: float, file: TextIO | None) -> _Counter:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Lines(total, desc, interval, file)
    bar: _Counter = tqdm(total=total, desc=desc, file=file)
    return bar


class _Lines:
    """tqdm's stand-in: a line of text now and then."""

    def __init__(self, total: int | None, desc: str | None, interval: float, file: TextIO | None) -> None:
        self._total = total
        self._desc = desc or "progress"
        self._interval = interval
        self._file = file
        self._done = 0
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._write(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(time.monotonic(), final=True)

    def _write(self, now: float, final: bool = False) -> None:
        elapsed = now - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self._desc}: {self._done}" + (f"/{self._total}" if self._total is not None else "")]
        if self._total:
            parts[0] += f" ({100 * self._done / self._total:.0f}%)"
        parts.append(f"{rate:.1f}/s")
        parts.append(f"{elapsed:.0f}s elapsed")
        if not final and self._total is not None and rate > 0:
            parts.append(f"about {max(self._total - self._done, 0) / rate:.0f}s left")
        file = self._file or sys.stderr
        if final:
            parts[-1] += " (stopped early)" if self._total is not None and self._done < self._total else " (done)"
        file.write(", ".join(parts) + "\n")
        file.flush()
