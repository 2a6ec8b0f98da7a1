"""What a call prints, captured on the worker and written out in the client (``forward_output=True``).

The worker swaps ``sys.stdout`` and ``sys.stderr`` for the length of the call; everything written to them
is kept in order, as ``(stream, text)`` pieces, and travels back with the outcome. The client writes each
line to its own stdout or stderr, prefixed with the worker's name, before the call's future settles.

Only writes through Python's ``sys.stdout``/``sys.stderr`` are seen: output written by C code or by child
processes to the file descriptors themselves goes to the worker's own stdout and stderr, as before.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TextIO

STDOUT, STDERR = 1, 2
MAX_OUTPUT = 4 << 20  # characters kept per call: the rest is counted and reported, not sent

Piece = tuple[int, str]
Output = tuple[str, list[Piece]]  # the worker's name, and what the call printed in order
_writing = threading.Lock()


class _Capture(io.TextIOBase):
    """A stand-in for ``sys.stdout`` or ``sys.stderr`` that appends to a call's shared record. It answers
    what code asks of a standard stream: ``encoding``, ``buffer`` (bytes written there are decoded and kept
    too) and ``fileno()``, the real stream's descriptor, whose output is not captured (as C code's is not)."""

    def __init__(self, stream: int, record: _Record, real: TextIO | None) -> None:
        super().__init__()
        self._stream = stream
        self._record = record
        self._real = real
        self.buffer = _BinaryCapture(self)

    @property  # (read-only here: the real stream's)
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self._real, "errors", None) or "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._real is None:
            raise io.UnsupportedOperation("fileno")
        return self._real.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._record.add(self._stream, text)
        return len(text)


class _BinaryCapture(io.RawIOBase):
    """``sys.stdout.buffer`` during a captured call: bytes decoded with the stream's encoding, across writes
    (a character split between two writes is whole in the output)."""

    def __init__(self, text: _Capture) -> None:
        super().__init__()
        self._text = text
        try:
            self._decoder = codecs.getincrementaldecoder(text.encoding)("replace")
        except LookupError:  # a stream that names an encoding this Python does not have
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        if text := self._decoder.decode(chunk):
            self._text.write(text)
        return len(chunk)

    def finish(self) -> None:
        """The bytes of a character the call never completed."""
        if text := self._decoder.decode(b"", final=True):
            self._text.write(text)


class _Record:
    """What a call printed: runs of writes to one stream, joined once at the end (joining at every write
    made printing N lines cost N squared)."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, list[str]]] = []
        self.size = 0
        self.dropped = 0

    def add(self, stream: int, text: str) -> None:
        room = MAX_OUTPUT - self.size
        kept = text[:room] if room > 0 else ""
        self.dropped += len(text) - len(kept)
        if not kept:
            return
        self.size += len(kept)
        if self.runs and self.runs[-1][0] == stream:  # one piece per run of writes to one stream
            self.runs[-1][1].append(kept)
        else:
            self.runs.append((stream, [kept]))

    def finish(self) -> list[Piece]:
        pieces = [(stream, "".join(parts)) for stream, parts in self.runs]
        if self.dropped:
            # No leading newline: every piece is written from the start of a line (write_output ends one).
            note = f"[remote_executor: {self.dropped} more characters of output were not forwarded]\n"
            pieces.append((STDERR, note))
        return pieces


@contextlib.contextmanager
def captured() -> Iterator[list[Piece]]:
    """Capture ``sys.stdout`` and ``sys.stderr`` in the block; the list is filled when it ends."""
    record = _Record()
    pieces: list[Piece] = []
    saved = sys.stdout, sys.stderr
    captures = _Capture(STDOUT, record, saved[0]), _Capture(STDERR, record, saved[1])
    sys.stdout, sys.stderr = captures
    try:
        yield pieces
    finally:
        sys.stdout, sys.stderr = saved
        for capture in captures:
            capture.buffer.finish()
        pieces.extend(record.finish())


def write_output(output: Output, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
    """Write what a call printed to this process's stdout and stderr, each line prefixed ``[worker] ``."""
    worker, pieces = output
    targets = {STDOUT: stdout or sys.stdout, STDERR: stderr or sys.stderr}
    with _writing:  # results may arrive on several threads: one call's lines stay together
        for stream, text in pieces:
            target = targets.get(stream)
            if target is None:
                continue
            target.write(prefixed(worker, text))
            target.flush()  # stdout and stderr interleave in the order the call wrote them


def prefixed(worker: str, text: str) -> str:
    """``text`` with each line prefixed by the worker's name; a last line without a newline gets one, so the
    next worker's output starts on a line of its own."""
    return "".join(f"[{worker}] {line}" for line in _lines(text))


def _lines(text: str) -> Sequence[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    return lines
