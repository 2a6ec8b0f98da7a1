"""The Gearman codec alone: encoding, strict incremental decoding, admin reply parsing."""

from __future__ import annotations

import itertools
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_executor.transports.gearman.codec import (
    ARG_COUNTS,
    REQ,
    RES,
    AdminError,
    FunctionStatus,
    GearmanProtocolError,
    Packet,
    PacketDecoder,
    PacketType,
    WorkerInfo,
    encode,
    encode_parts,
    parse_admin_ok,
    parse_status,
    parse_workers,
)


def header(type_: int, length: int, magic: bytes = RES) -> bytes:
    return struct.pack(">4sII", magic, type_, length)


def decode_all(data: bytes, **kwargs: object) -> list[Packet]:
    return PacketDecoder(**kwargs).feed(data)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- encode


def test_packet_numbers_match_the_protocol() -> None:
    assert (PacketType.SUBMIT_JOB, PacketType.JOB_CREATED, PacketType.WORK_COMPLETE) == (7, 8, 13)
    assert (PacketType.GRAB_JOB_UNIQ, PacketType.JOB_ASSIGN_UNIQ, PacketType.SUBMIT_JOB_LOW) == (30, 31, 33)
    assert set(ARG_COUNTS) == set(PacketType)


def test_encode_submit_job_bytes() -> None:
    packet = encode(REQ, PacketType.SUBMIT_JOB, b"fn", b"", b"pay\0load")
    assert packet == b"\0REQ" + struct.pack(">II", 7, 12) + b"fn\0\0pay\0load"


def test_encode_no_args_has_empty_body() -> None:
    assert encode(REQ, PacketType.GRAB_JOB_UNIQ) == b"\0REQ" + struct.pack(">II", 30, 0)


def test_encode_parts_keeps_a_big_payload_uncopied() -> None:
    payload = bytearray(1 << 20)
    parts = encode_parts(REQ, PacketType.WORK_COMPLETE, b"H:x:1", payload)
    assert len(parts) == 2
    assert parts[1] is payload
    assert parts[0] == header(13, len(payload) + 6, REQ) + b"H:x:1\0"


def test_encode_parts_joins_a_small_packet() -> None:
    assert encode_parts(REQ, PacketType.CAN_DO, b"fn") == [header(1, 2, REQ) + b"fn"]


def test_encode_accepts_memoryview() -> None:
    assert encode(RES, PacketType.ECHO_RES, memoryview(b"abc")) == header(17, 3) + b"abc"


@pytest.mark.parametrize(
    ("magic", "type_", "args", "message"),
    [
        (b"\0XYZ", PacketType.NOOP, (), "magic"),
        (REQ, PacketType.SUBMIT_JOB, (b"fn", b""), "takes 3 argument"),
        (REQ, PacketType.NOOP, (b"x",), "takes 0 argument"),
        (REQ, PacketType.SUBMIT_JOB, (b"f\0n", b"", b"x"), "NUL"),
    ],
)
def test_encode_rejects_bad_input(magic: bytes, type_: PacketType, args: tuple[bytes, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(magic, type_, *args)


# ---------------------------------------------------------------------------------------------- decode


def test_decode_round_trip_every_type() -> None:
    for type_, count in ARG_COUNTS.items():
        args = tuple(f"arg{i}".encode() for i in range(count))
        (packet,) = decode_all(encode(RES, type_, *args))
        assert packet == Packet(RES, type_, args)


def test_last_argument_keeps_its_nuls() -> None:
    (packet,) = decode_all(encode(RES, PacketType.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"u", b"\0a\0\0"))
    assert packet.args == (b"H:1", b"fn", b"u", b"\0a\0\0")


def test_empty_arguments() -> None:
    (packet,) = decode_all(encode(RES, PacketType.WORK_COMPLETE, b"H:1", b""))
    assert packet.args == (b"H:1", b"")
    (packet,) = decode_all(encode(RES, PacketType.ECHO_RES, b""))
    assert packet.args == (b"",)


def test_byte_at_a_time_and_several_per_feed() -> None:
    stream = b"".join(encode(RES, PacketType.JOB_CREATED, f"H:{i}".encode()) for i in range(5))
    decoder = PacketDecoder()
    one_by_one = [p for i in range(len(stream)) for p in decoder.feed(stream[i : i + 1])]
    assert [p.args[0] for p in one_by_one] == [f"H:{i}".encode() for i in range(5)]
    assert decoder.buffered == 0
    assert len(PacketDecoder().feed(stream)) == 5


def test_partial_packet_is_buffered() -> None:
    data = encode(RES, PacketType.WORK_COMPLETE, b"H:1", b"result")
    decoder = PacketDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:])[0].args == (b"H:1", b"result")


def test_request_magic_decoder() -> None:
    (packet,) = decode_all(encode(REQ, PacketType.GRAB_JOB_UNIQ), expect_magic=REQ)
    assert packet.magic == REQ


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (header(8, 1, magic=REQ) + b"H", "bad packet magic"),
        (b"HTTP/1.1 200 OK\r\n", "bad packet magic"),
        (header(999, 0), "unknown or unsupported Gearman packet type 999"),
        (header(5, 0), "unknown or unsupported Gearman packet type 5"),
        (header(6, 1) + b"x", "NOOP takes no arguments"),
        (header(13, 3) + b"H:1", "WORK_COMPLETE needs 2 arguments, packet has 1"),
        (header(31, 6) + b"H\0fn\0u", "JOB_ASSIGN_UNIQ needs 4 arguments, packet has 3"),
        (header(13, 1001) + b"H", "exceeds the limit of 1000 bytes"),
    ],
)
def test_malformed_input_is_rejected(data: bytes, message: str) -> None:
    decoder = PacketDecoder(max_packet_size=1000)
    with pytest.raises(GearmanProtocolError, match=message):
        decoder.feed(data)
    with pytest.raises(GearmanProtocolError, match="already failed"):
        decoder.feed(encode(RES, PacketType.NOOP))


def test_bad_header_is_rejected_before_the_body_arrives() -> None:
    with pytest.raises(GearmanProtocolError, match="exceeds the limit"):
        PacketDecoder(max_packet_size=10).feed(header(13, 0xFFFFFFFF))


def test_valid_packets_before_a_bad_one_are_not_returned_after_the_error() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(encode(RES, PacketType.NOOP)) == [Packet(RES, PacketType.NOOP, ())]
    with pytest.raises(GearmanProtocolError):
        decoder.feed(header(77, 0))


def test_invalid_expect_magic() -> None:
    with pytest.raises(ValueError, match="expect_magic"):
        PacketDecoder(expect_magic=b"\0FOO")


def test_100_mb_packet_decodes_in_linear_time() -> None:
    payload = b"x" * (100 * 1024 * 1024)
    data = b"".join(encode_parts(RES, PacketType.WORK_COMPLETE, b"H:big:1", payload))
    decoder = PacketDecoder()
    chunk = 64 * 1024  # what a socket hands over at a time
    started = time.perf_counter()
    packets = [p for i in range(0, len(data), chunk) for p in decoder.feed(data[i : i + chunk])]
    elapsed = time.perf_counter() - started
    assert len(packets) == 1
    assert packets[0].args[0] == b"H:big:1"
    assert packets[0].args[1] == payload
    # Quadratic copying (1,600 chunks, each re-copying ~50 MB on average) would take minutes; linear takes about
    # a second. The bound only tells those apart, with room for a loaded CI machine.
    assert elapsed < 30.0, f"decoding 100 MB took {elapsed:.1f} s"


args_strategy = st.lists(st.binary(max_size=50).filter(lambda b: b"\0" not in b), max_size=4)


@settings(deadline=None)  # a shared CI machine can stall any single example past the default 200 ms
@given(
    type_=st.sampled_from(list(PacketType)),
    leading=args_strategy,
    last=st.binary(max_size=300),
    splits=st.lists(st.integers(min_value=0, max_value=500), max_size=5),
)
def test_round_trip_any_split(type_: PacketType, leading: list[bytes], last: bytes, splits: list[int]) -> None:
    count = ARG_COUNTS[type_]
    args = (*[*leading, *[b""] * count][: count - 1], last) if count else ()
    data = encode(RES, type_, *args) * 2
    decoder = PacketDecoder()
    cuts = sorted({0, len(data), *(s for s in splits if s < len(data))})
    packets = [p for a, b in itertools.pairwise(cuts) for p in decoder.feed(data[a:b])]
    assert packets == [Packet(RES, type_, args)] * 2


# ----------------------------------------------------------------------------------------------- admin


def test_parse_status() -> None:
    assert parse_status(["fn\t2\t1\t3", "other\t0\t0\t0"]) == [
        FunctionStatus("fn", 2, 1, 3),
        FunctionStatus("other", 0, 0, 0),
    ]
    assert parse_status([]) == []


@pytest.mark.parametrize("line", ["fn\t2\t1", "fn\t2\tx\t3", "fn 2 1 3"])
def test_parse_status_malformed(line: str) -> None:
    with pytest.raises(GearmanProtocolError, match="malformed admin status line"):
        parse_status([line])


def test_parse_workers() -> None:
    lines = ["27 127.0.0.1 wid : f g", "26 127.0.0.1 - :"]
    assert parse_workers(lines) == [
        WorkerInfo(27, "127.0.0.1", "wid", ("f", "g")),
        WorkerInfo(26, "127.0.0.1", "-", ()),
    ]


def test_parse_workers_leaves_out_connections_gearmand_is_closing() -> None:
    # gearmand lists a connection it is closing with the descriptor -1 (seen in a CI run right after a
    # client disconnected): not malformed, and no longer a worker.
    assert parse_workers(["-1 127.0.0.1 - :", "27 127.0.0.1 wid : f"]) == [WorkerInfo(27, "127.0.0.1", "wid", ("f",))]


@pytest.mark.parametrize("line", ["27 127.0.0.1 wid f g", "x 127.0.0.1 - :", "27 - :", "- 127.0.0.1 - :"])
def test_parse_workers_malformed(line: str) -> None:
    with pytest.raises(GearmanProtocolError, match="malformed admin workers line"):
        parse_workers([line])


def test_parse_admin_ok() -> None:
    assert parse_admin_ok("OK") == ""
    assert parse_admin_ok("OK 1.1.20+ds") == "1.1.20+ds"
    with pytest.raises(AdminError, match="UNKNOWN_COMMAND Unknown server command"):
        parse_admin_ok("ERR UNKNOWN_COMMAND Unknown+server+command")
    with pytest.raises(GearmanProtocolError, match="malformed admin reply"):
        parse_admin_ok("maybe")


def test_errors_fit_the_package_hierarchy() -> None:
    from remote_executor.errors import ProtocolError, TransportError

    assert issubclass(GearmanProtocolError, ProtocolError)
    assert issubclass(GearmanProtocolError, TransportError)
    assert issubclass(AdminError, TransportError)
