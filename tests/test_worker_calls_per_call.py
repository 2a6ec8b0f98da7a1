"""Python function calls per call in a worker process, counted by the worker itself with ``sys.setprofile``
(benchmarks/worker_calls.py): a count, unlike a time, does not depend on how loaded the machine is, so a
layer added to every call's path (frame parsing, HMAC, the worker loop) fails here at once.

The bounds are the counts measured when they were set, plus a small margin for the rare extra turn of the
worker's wait loop (a heartbeat, a receive that timed out on a slow machine)."""

from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import remote_executor
from remote_executor.errors import AuthenticationError
from remote_executor.wire.frames import LIMITED, Frame, FrameReader, Kind, encode_bytes
from remote_executor.wire.session import ONE_SHOT_MAX, Mac

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "worker_calls.py"
CALLS = 1000
# measured: tcp 38.0, zmq 41.0 Python calls per call (79 and 89 before the hot path was cut down)
BOUNDS = {"tcp": 44.0, "zmq": 47.0}
# Far below any real count: a hook that counted nothing (or the wrong thread) fails rather than passes.
FLOOR = 20.0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", sorted(BOUNDS))
def test_a_worker_makes_few_python_calls_per_call(scheme: str) -> None:
    package_root = str(Path(remote_executor.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--transports", scheme, "--calls", str(CALLS), "--json"],
                          capture_output=True, text=True, timeout=240, cwd=SCRIPT.parent.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout)[scheme]
    assert FLOOR < counts["call"] <= BOUNDS[scheme], counts


# --- the short cuts compute what the general paths do ----------------------------------------------------

KEY = b"k" * 32
BIND = b"bound to an exchange"


@pytest.mark.parametrize("sequenced", [False, True])
@pytest.mark.parametrize("size", [0, 1, ONE_SHOT_MAX - 1, ONE_SHOT_MAX, ONE_SHOT_MAX + 1, 3 * ONE_SHOT_MAX])
def test_a_frame_mac_is_the_same_whichever_way_it_is_computed(size: int, sequenced: bool) -> None:
    """A small frame's MAC is computed in one call over a joined copy, a large one's piece by piece: both
    are the HMAC-SHA256 of bind | sequence number | prefix | parts, so either side may take either path."""
    prefix = b"a frame prefix"
    parts: list[bytes | bytearray | memoryview] = [os.urandom(size // 2), memoryview(os.urandom(size - size // 2))]
    seq = (1).to_bytes(8, "big") if sequenced else b""
    expected = hmac.new(KEY, BIND + seq + prefix + b"".join(parts), "sha256").digest()
    for nbytes in (None, size):  # None: the size is not known, so never the one-shot path
        signer, checker = Mac(KEY, sequenced=sequenced, bind=BIND), Mac(KEY, sequenced=sequenced, bind=BIND)
        signer.sign(b"an earlier frame", [])  # the second frame of a session: seq 1
        checker.verify(b"an earlier frame", [], Mac(KEY, sequenced=sequenced, bind=BIND).sign(b"an earlier frame", []))
        assert signer.sign(prefix, parts, nbytes) == expected
        checker.verify(prefix, parts, expected, nbytes)
        last = bytes(parts[-1])  # one bit flipped: overwriting a random byte with a constant was no change 1 in 256
        tampered = [*parts[:-1], bytes([last[0] ^ 1]) + last[1:]] if size > 1 else [b"tampered"]
        with pytest.raises(AuthenticationError):
            Mac(KEY, sequenced=sequenced, bind=BIND).verify(prefix, tampered, expected, nbytes)


@pytest.mark.parametrize("key", [None, KEY])
def test_a_frame_read_whole_or_in_pieces_is_the_same_frame(key: bytes | None) -> None:
    """The reader's short cut (a small frame wholly in its buffer) and its general path (the same frame
    arriving a byte at a time) give the same frame, and both check the MAC."""
    frame = Frame(Kind.TASK, 7, 9, [b"call", b"", bytes(300)], LIMITED)
    wire = encode_bytes(frame, key)
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        reader = FrameReader(key)
        got: list[Frame] = []
        for piece in pieces:
            reader.buffer()[: len(piece)] = piece
            got += reader.feed(len(piece))
        assert [(f.kind, f.a, f.b, [bytes(p) for p in f.parts], f.flags) for f in got] == [
            (Kind.TASK, 7, 9, [b"call", b"", bytes(300)], LIMITED)]
    if key is not None:
        forged = wire[:-1] + bytes([wire[-1] ^ 1])
        reader = FrameReader(key)
        reader.buffer()[: len(forged)] = forged
        with pytest.raises(AuthenticationError):
            reader.feed(len(forged))
