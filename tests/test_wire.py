"""Unit tests for the sans-I/O frame layer (wire/frames.py): any split of the stream, tampering, strict headers.

Everything is fed through the reader's real receive protocol: ``buf = reader.buffer()``, write at most
``len(buf)`` bytes into it, ``reader.feed(n)``; the parts of the stream are chosen by hypothesis.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_executor.errors import AuthenticationError, ProtocolError
from remote_executor.wire.frames import (
    DIRECT_READ_THRESHOLD,
    FIRST_DIRECT_SIZE,
    HEADER,
    KEYED,
    MAC_SIZE,
    STAGING_SIZE,
    Frame,
    FrameReader,
    Kind,
    Limits,
    decode_parts,
    encode,
    encode_bytes,
)

KEY = b"the shared secret of this test"
OTHER_KEY = b"a different secret"
U64 = 2**64 - 1
U16 = 2**16 - 1
# The magic and version this side writes, read back from a real frame rather than imported.
MAGIC, VERSION = HEADER.unpack(encode_bytes(Frame(Kind.HEARTBEAT))[: HEADER.size])[:2]

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Shape = tuple[Kind, int, int, int, list[bytes]]


# --- helpers -----------------------------------------------------------------------------------------


def feed(reader: FrameReader, chunks: Iterable[bytes | memoryview], out: list[Frame] | None = None) -> list[Frame]:
    """Feed ``chunks`` one after the other through ``buffer()``/``feed(n)``; the frames returned, in order.

    Each chunk is one "receive": it is written into as many successive ``buffer()`` views as it takes (a
    view may be shorter than the chunk, for example the rest of a large part being read in place). The
    frames go into ``out`` as they come, so a caller still sees them if a later feed raises.
    """
    frames: list[Frame] = [] if out is None else out
    for chunk in chunks:
        left = memoryview(chunk).cast("B")
        while left:
            buf = reader.buffer()
            assert len(buf) > 0, "buffer() returned no room while bytes are waiting"
            n = min(len(buf), len(left))
            buf[:n] = left[:n]
            left = left[n:]
            frames += reader.feed(n)
    return frames


def split(data: bytes, cuts: Iterable[int]) -> list[memoryview]:
    """``data`` cut at the given offsets (out-of-range and duplicate offsets ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    view = memoryview(data)
    return [view[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


def every(data: bytes, size: int) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(data), size)]


def shape(frame: Frame) -> Shape:
    assert type(frame.kind) is Kind, f"kind {frame.kind!r} is not a Kind"
    return (frame.kind, frame.a, frame.b, frame.flags, [bytes(p) for p in frame.parts])


def prefix_size(frame: Frame, key: bytes | None) -> int:
    return HEADER.size + 8 * len(frame.parts) + (MAC_SIZE if key is not None else 0)


def boundaries(frames: Sequence[Frame], key: bytes | None) -> list[int]:
    """Offsets in the encoded stream where a frame, its parts, or its prefix end: good places to cut."""
    points = [0]
    offset = 0
    for frame in frames:
        points += [offset + HEADER.size, offset + prefix_size(frame, key) - (MAC_SIZE if key is not None else 0)]
        offset += prefix_size(frame, key)
        points.append(offset)
        for part in frame.parts:
            offset += len(part)
            points.append(offset)
    return points


# --- strategies --------------------------------------------------------------------------------------

BIG_SIZES = st.one_of(
    st.sampled_from([DIRECT_READ_THRESHOLD - 1, DIRECT_READ_THRESHOLD, DIRECT_READ_THRESHOLD + 1,
                     STAGING_SIZE - 1, STAGING_SIZE, STAGING_SIZE + 1]),
    st.integers(DIRECT_READ_THRESHOLD - 64, STAGING_SIZE + 4096),
)


@st.composite
def frame_lists(draw: st.DrawFn, *, min_frames: int = 1, max_frames: int = 4, big: bool = False) -> list[Frame]:
    """Frames of any kind, a, b and flags, 0..5 parts; with ``big``, now and then (at most twice per list) a
    part around DIRECT_READ_THRESHOLD / STAGING_SIZE, so that it is received in place."""
    big_left = 2 if big else 0
    frames = []
    for _ in range(draw(st.integers(min_frames, max_frames))):
        parts: list[bytes | bytearray | memoryview] = []
        for _ in range(draw(st.integers(0, 5))):
            if big_left and draw(st.integers(0, 11)) == 7:
                big_left -= 1
                parts.append(random.Random(draw(st.integers(0, 2**32))).randbytes(draw(BIG_SIZES)))
            else:
                parts.append(draw(st.binary(max_size=48)))
        frames.append(Frame(draw(st.sampled_from(Kind)), draw(st.integers(0, U64)), draw(st.integers(0, U64)),
                            parts, draw(st.integers(0, KEYED - 1))))
    return frames


keys = st.sampled_from([None, KEY])


def stream_of(frames: Sequence[Frame], key: bytes | None) -> bytes:
    return b"".join(encode_bytes(f, key) for f in frames)


# --- 1. any split of the stream yields the same frames -----------------------------------------------


@THOROUGH
@given(frames=frame_lists(big=True), key=keys, data=st.data())
def test_any_split_of_the_stream_yields_the_frames_in_order(frames: list[Frame], key: bytes | None,
                                                            data: st.DataObject) -> None:
    stream = stream_of(frames, key)
    near_boundaries = st.sampled_from(boundaries(frames, key)).flatmap(lambda p: st.integers(p - 2, p + 2))
    cuts = data.draw(st.lists(st.one_of(st.integers(0, len(stream)), near_boundaries), max_size=40), "cuts")
    reader = FrameReader(key)
    got = feed(reader, split(stream, cuts))
    assert [shape(f) for f in got] == [shape(f) for f in frames]
    assert not reader.mid_frame


@FAST
@given(frames=frame_lists(max_frames=3), key=keys)
def test_one_byte_at_a_time(frames: list[Frame], key: bytes | None) -> None:
    """Fed a byte at a time, a frame comes out exactly when its last byte arrives, and ``mid_frame`` is
    True everywhere but at frame boundaries."""
    ends = []
    offset = 0
    for frame in frames:
        offset += len(encode_bytes(frame, key))
        ends.append(offset)
    stream = stream_of(frames, key)
    reader = FrameReader(key)
    got: list[Frame] = []
    for position in range(1, len(stream) + 1):
        new = feed(reader, [stream[position - 1 : position]])
        if position in ends:
            assert [shape(f) for f in new] == [shape(frames[ends.index(position)])]
            assert not reader.mid_frame
        else:
            assert new == []
            assert reader.mid_frame
        got += new
    assert len(got) == len(frames)


@pytest.mark.parametrize("chunk", [61, 4093, 65_537, STAGING_SIZE - 1, STAGING_SIZE + 3])
@pytest.mark.parametrize("key", [None, KEY])
def test_a_stream_longer_than_the_staging_buffer(chunk: int, key: bytes | None) -> None:
    """Many small frames, several staging buffers' worth, so that frames straddle the end of the staging
    buffer and unparsed bytes are moved back to its start."""
    rng = random.Random(chunk)
    frames = [Frame(Kind.RESULT, i, rng.getrandbits(64), [rng.randbytes(rng.randrange(0, 400)) for _ in range(3)],
                    i % 7) for i in range(1, 1800)]
    stream = stream_of(frames, key)
    assert len(stream) > 2 * STAGING_SIZE
    reader = FrameReader(key)
    got = feed(reader, every(stream, chunk))
    assert [shape(f) for f in got] == [shape(f) for f in frames]
    assert not reader.mid_frame


def test_a_prefix_longer_than_the_staging_buffer() -> None:
    frame = Frame(Kind.TASK, 1, 2, [b""] * U16)
    assert prefix_size(frame, None) > STAGING_SIZE
    reader = FrameReader(limits=Limits(max_parts=U16))
    got = feed(reader, every(encode_bytes(frame), 65_536))
    assert [shape(f) for f in got] == [shape(frame)]


# --- 5. a truncated stream -----------------------------------------------------------------------------


@FAST
@given(frames=frame_lists(big=True), key=keys, data=st.data())
def test_a_truncated_frame_is_never_returned(frames: list[Frame], key: bytes | None, data: st.DataObject) -> None:
    *whole, last = frames
    head = stream_of(whole, key)
    tail = encode_bytes(last, key)
    cut = data.draw(st.integers(1, len(tail) - 1), "cut")
    cuts = data.draw(st.lists(st.integers(0, len(head) + cut), max_size=10), "cuts")
    reader = FrameReader(key)
    got = feed(reader, split(head + tail[:cut], cuts))
    assert [shape(f) for f in got] == [shape(f) for f in whole]
    assert reader.mid_frame
    assert [shape(f) for f in feed(reader, [tail[cut:]])] == [shape(last)]
    assert not reader.mid_frame


@pytest.mark.parametrize("key", [None, KEY])
def test_the_rest_of_a_truncated_frame_completes_it(key: bytes | None) -> None:
    frame = Frame(Kind.SUBMIT, 5, 6, [b"abc", bytes(DIRECT_READ_THRESHOLD + 10), b"xyz"], 3)
    data = encode_bytes(frame, key)
    for cut in (1, HEADER.size, prefix_size(frame, key), prefix_size(frame, key) + 4, len(data) - 1):
        reader = FrameReader(key)
        assert feed(reader, [data[:cut]]) == []
        assert reader.mid_frame
        assert [shape(f) for f in feed(reader, [data[cut:]])] == [shape(frame)]
        assert not reader.mid_frame


# --- 2. tampering and key mismatches -------------------------------------------------------------------

TAMPER_LIMIT = 1 << 14  # max_frame of the tamper tests: a frame whose extent changed is settled within this


@THOROUGH
@given(frame=frame_lists(max_frames=1), data=st.data())
def test_flipping_any_byte_of_a_keyed_frame_is_rejected(frame: list[Frame], data: st.DataObject) -> None:
    original = encode_bytes(frame[0], KEY)
    index = data.draw(st.integers(0, len(original) - 1), "index")
    tampered = bytearray(original)
    tampered[index] ^= data.draw(st.integers(1, 255), "xor")
    nparts = len(frame[0].parts)
    lengths_end = HEADER.size + 8 * nparts
    cuts = data.draw(st.lists(st.integers(0, len(original)), max_size=5), "cuts")
    reader = FrameReader(KEY, Limits(max_frame=TAMPER_LIMIT))
    out: list[Frame] = []
    if index in (4, 5) or HEADER.size <= index < lengths_end:
        # The part count or a part length changed, so the frame's extent did: the reader may rightly wait
        # for more of the stream. It must raise by the time the (limited) announced size has arrived.
        with pytest.raises(ProtocolError):
            feed(reader, [*split(bytes(tampered), cuts), bytes(TAMPER_LIMIT)], out)
    elif index < 3:  # magic, version: rejected by the header alone
        with pytest.raises(ProtocolError) as raised:
            feed(reader, split(bytes(tampered[: HEADER.size]), cuts), out)
        assert raised.type is ProtocolError
    else:  # kind, flags, a, b, the MAC, a part: the same extent, so the frame itself must be rejected
        with pytest.raises(ProtocolError) as raised:
            feed(reader, split(bytes(tampered), cuts), out)
        if index >= lengths_end:
            assert raised.type is AuthenticationError
    assert out == []


@FAST
@given(frames=frame_lists(big=True), data=st.data())
def test_a_frame_keyed_with_another_key_is_rejected(frames: list[Frame], data: st.DataObject) -> None:
    stream = stream_of(frames, OTHER_KEY)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), "cuts")
    out: list[Frame] = []
    with pytest.raises(AuthenticationError):
        feed(FrameReader(KEY), split(stream, cuts), out)
    assert out == []


@FAST
@given(frame=frame_lists(max_frames=1))
def test_a_keyed_frame_read_without_a_key_is_rejected(frame: list[Frame]) -> None:
    """Read without a key, the MAC looks like the start of the parts and the frame's last MAC_SIZE bytes
    like the next header: received in one piece, the stream is rejected."""
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        feed(FrameReader(None), [encode_bytes(frame[0], KEY)], out)
    assert out == []


def test_a_keyed_frame_read_without_a_key_never_yields_a_frame() -> None:
    frame = Frame(Kind.SUBMIT, 1, 0, [b"a pickled call"])
    data = encode_bytes(frame, KEY)
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        feed(FrameReader(None), split(data, [len(data) - MAC_SIZE]), out)
    assert out == []


@FAST
@given(frame=frame_lists(max_frames=1), data=st.data())
def test_a_keyless_frame_read_with_a_key_is_rejected(frame: list[Frame], data: st.DataObject) -> None:
    """Signed frames say so in their header (the KEYED flag): a keyless frame reaching a reader with a key is
    rejected from its header alone, whatever the split, and nothing is returned (an unsigned REJECT is read
    as the job server refusing our key, which is what it is when it comes first)."""
    single = encode_bytes(frame[0])
    out: list[Frame] = []
    with pytest.raises(ProtocolError, match=r"unsigned frames|rejected our key"):
        feed(FrameReader(KEY), split(single, data.draw(st.lists(st.integers(0, len(single)), max_size=5))), out)
    assert out == []


def test_application_flags_cannot_claim_the_keyed_bit() -> None:
    with pytest.raises(ValueError, match="flag"):
        encode(Frame(Kind.TASK, flags=KEYED))


# --- 3. strict header validation, before the announced bytes ---------------------------------------------


def header(*, magic: bytes = MAGIC, version: int = VERSION, kind: int = Kind.TASK, nparts: int = 0,
           flags: int = 0, a: int = 0, b: int = 0) -> bytes:
    return HEADER.pack(magic, version, kind, nparts, flags, a, b)


BAD_HEADERS = {
    "magic XX": (header(magic=b"XX", nparts=1), Limits()),
    "magic lower case": (header(magic=MAGIC.lower()), Limits()),
    "magic zero": (header(magic=b"\0\0", nparts=2), Limits()),
    "version 0": (header(version=0), Limits()),
    "version next": (header(version=VERSION + 1, nparts=1), Limits()),
    "version 255": (header(version=255), Limits()),
    "kind 0": (header(kind=0), Limits()),
    "kind after the last": (header(kind=max(Kind) + 1, nparts=1), Limits()),
    "kind 255": (header(kind=255), Limits()),
    "parts over a small limit": (header(nparts=4), Limits(max_parts=3)),
    "parts over the default limit": (header(nparts=U16), Limits()),
}


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_bad_header_is_rejected_from_the_header_alone(case: str, key: bytes | None) -> None:
    data, limits = BAD_HEADERS[case]
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        feed(FrameReader(key, limits), every(data, 1), out)
    assert out == []


@pytest.mark.parametrize("key", [None, KEY])
def test_the_same_headers_within_the_limits_are_accepted(key: bytes | None) -> None:
    """The controls of the bad-header test: one field changed back, the header alone raises nothing."""
    flags = KEYED if key is not None else 0
    for data, limits in [(header(nparts=3, flags=flags), Limits(max_parts=3)),
                         (header(kind=max(Kind), nparts=1, flags=flags), Limits()),
                         (header(kind=min(Kind), nparts=1, flags=flags), Limits())]:
        reader = FrameReader(key, limits)
        assert feed(reader, every(data, 1)) == []
        assert reader.mid_frame


MAX_FRAME = 10_000


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("excess", [1, 2, DIRECT_READ_THRESHOLD, 2**63])
def test_a_frame_over_max_frame_is_rejected_from_its_prefix(key: bytes | None, excess: int) -> None:
    """The announced total (prefix and parts) is checked as soon as the prefix is in, before any part."""
    size = prefix_size(Frame(Kind.TASK, parts=[b"", b""]), key)
    prefix = header(nparts=2) + struct.pack("!2Q", 100, MAX_FRAME + excess - size - 100)
    prefix += bytes(MAC_SIZE) if key is not None else b""
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        feed(FrameReader(key, Limits(max_frame=MAX_FRAME)), every(prefix, 3), out)
    assert out == []


@pytest.mark.parametrize("key", [None, KEY])
def test_a_part_announced_as_huge_is_rejected_under_the_default_limit(key: bytes | None) -> None:
    prefix = header(nparts=1) + struct.pack("!Q", U64) + (bytes(MAC_SIZE) if key is not None else b"")
    with pytest.raises(ProtocolError):
        feed(FrameReader(key), [prefix])


@pytest.mark.parametrize("key", [None, KEY])
def test_a_frame_of_exactly_max_frame_is_accepted(key: bytes | None) -> None:
    """The control of the max_frame test: the limit itself is allowed, through the reader and decode_parts."""
    size = MAX_FRAME - prefix_size(Frame(Kind.TASK, parts=[b"", b""]), key)
    frame = Frame(Kind.TASK, 1, 2, [bytes(range(256)) * (size // 256) + bytes(size % 256), b""])
    assert len(encode_bytes(frame, key)) == MAX_FRAME
    limits = Limits(max_frame=MAX_FRAME)
    assert [shape(f) for f in feed(FrameReader(key, limits), every(encode_bytes(frame, key), 999))] == [shape(frame)]
    assert shape(decode_parts(encode(frame, key)[0], frame.parts, key, limits)) == shape(frame)
    with pytest.raises(ProtocolError):
        decode_parts(encode(frame, key)[0], frame.parts, key, Limits(max_frame=MAX_FRAME - 1))


# --- 4. decode_parts: the zmq path, prefix and parts already apart -----------------------------------------


@FAST
@given(frames=frame_lists(max_frames=1, big=True), key=keys)
def test_decode_parts_accepts_what_encode_produced(frames: list[Frame], key: bytes | None) -> None:
    prefix, *parts = encode(frames[0], key)
    decoded = decode_parts(prefix, parts, key)
    assert shape(decoded) == shape(frames[0])
    assert all(got is sent for got, sent in zip(decoded.parts, parts, strict=True))  # handed on as they are


@FAST
@given(frames=frame_lists(max_frames=1), key=keys, data=st.data())
def test_decode_parts_rejects_a_wrong_part_count(frames: list[Frame], key: bytes | None, data: st.DataObject) -> None:
    prefix, *parts = encode(frames[0], key)
    drop = data.draw(st.booleans(), "drop")
    if parts and drop:
        del parts[data.draw(st.integers(0, len(parts) - 1), "dropped")]
    else:
        parts.insert(data.draw(st.integers(0, len(parts)), "at"), data.draw(st.binary(max_size=8), "extra"))
    with pytest.raises(ProtocolError):
        decode_parts(prefix, parts, key)


@FAST
@given(frames=frame_lists(max_frames=1), key=keys, data=st.data())
def test_decode_parts_rejects_parts_of_other_lengths(frames: list[Frame], key: bytes | None,
                                                    data: st.DataObject) -> None:
    prefix, *parts = encode(frames[0], key)
    if not parts:
        parts = [b"x"]  # a part where none was announced
        with pytest.raises(ProtocolError):
            decode_parts(prefix, parts, key)
        return
    i = data.draw(st.integers(0, len(parts) - 1), "part")
    part = bytes(parts[i])
    if part and data.draw(st.booleans(), "shorten"):
        parts[i] = part[: data.draw(st.integers(0, len(part) - 1), "length")]
    else:
        parts[i] = part + data.draw(st.binary(min_size=1, max_size=8), "more")
    with pytest.raises(ProtocolError):
        decode_parts(prefix, parts, key)


@FAST
@given(frames=frame_lists(max_frames=1), key=keys, data=st.data())
def test_decode_parts_rejects_a_truncated_or_padded_prefix(frames: list[Frame], key: bytes | None,
                                                          data: st.DataObject) -> None:
    prefix, *parts = encode(frames[0], key)
    if data.draw(st.booleans(), "truncate"):
        prefix = bytes(prefix)[: data.draw(st.integers(0, len(prefix) - 1), "length")]
    else:
        prefix = bytes(prefix) + data.draw(st.binary(min_size=1, max_size=MAC_SIZE), "more")
    with pytest.raises(ProtocolError):
        decode_parts(prefix, parts, key)


@FAST
@given(frames=frame_lists(max_frames=1), data=st.data())
def test_decode_parts_rejects_a_tampered_keyed_frame(frames: list[Frame], data: st.DataObject) -> None:
    prefix, *parts = encode(frames[0], KEY)
    nonempty = [i for i, p in enumerate(parts) if len(p)]
    in_a_part = data.draw(st.booleans(), "in a part")
    if nonempty and in_a_part:
        i = data.draw(st.sampled_from(nonempty), "part")
        tampered = bytearray(parts[i])
        tampered[data.draw(st.integers(0, len(tampered) - 1), "index")] ^= data.draw(st.integers(1, 255), "xor")
        parts[i] = bytes(tampered)
        with pytest.raises(AuthenticationError):
            decode_parts(prefix, parts, KEY)
    else:
        tampered = bytearray(prefix)
        tampered[data.draw(st.integers(0, len(tampered) - 1), "index")] ^= data.draw(st.integers(1, 255), "xor")
        with pytest.raises(ProtocolError):
            decode_parts(bytes(tampered), parts, KEY)


@FAST
@given(frames=frame_lists(max_frames=1))
def test_decode_parts_rejects_a_key_mismatch(frames: list[Frame]) -> None:
    prefix, *parts = encode(frames[0], OTHER_KEY)
    with pytest.raises(AuthenticationError):
        decode_parts(prefix, parts, KEY)
    with pytest.raises(ProtocolError):
        decode_parts(prefix, parts, None)
    keyless_prefix, *parts = encode(frames[0])
    with pytest.raises(ProtocolError):
        decode_parts(keyless_prefix, parts, KEY)


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_decode_parts_rejects_a_bad_header(case: str, key: bytes | None) -> None:
    data, limits = BAD_HEADERS[case]
    nparts = HEADER.unpack(data)[3]
    prefix = data + bytes(8 * nparts) + (bytes(MAC_SIZE) if key is not None else b"")
    with pytest.raises(ProtocolError):
        decode_parts(prefix, [b""] * nparts, key, limits)


def test_a_large_part_grows_with_the_bytes_that_arrive() -> None:
    """A part announced as 1 GiB makes the reader hold about what arrived, not what was announced."""
    payload = bytes(range(256)) * 8  # 2 KiB actually sent
    prefix = HEADER.pack(MAGIC, VERSION, Kind.SUBMIT, 1, 0, 1, 0) + (1 << 30).to_bytes(8, "big")
    reader = FrameReader(limits=Limits(max_frame=1 << 31))
    assert feed(reader, [prefix + payload]) == []
    assert len(reader.buffer()) <= FIRST_DIRECT_SIZE  # what the next receive may fill: not a gigabyte


def test_a_growing_part_arrives_whole_whatever_the_chunks() -> None:
    big = random.Random(7).randbytes(5 * FIRST_DIRECT_SIZE + 123)
    for key in (None, KEY):
        stream = encode_bytes(Frame(Kind.RESULT, 3, 4, [b"head", big, b"tail"]), key)
        for chunk in (4096, 65536, FIRST_DIRECT_SIZE + 17):
            frames = feed(FrameReader(key), every(stream, chunk))
            assert [shape(f) for f in frames] == [(Kind.RESULT, 3, 4, 0, [b"head", big, b"tail"])]
