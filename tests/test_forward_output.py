"""``forward_output=True``: what a call prints on its worker is written in the client, each line prefixed
with the worker's name, in order, before the future settles; on real worker processes over every transport.
Without the option nothing changes on the wire."""

from __future__ import annotations

import io
import os
import queue
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire import output as wire_output
from remote_executor.wire import serialization as s

ROOT = Path(__file__).resolve().parents[1]


def chatty(n: int) -> int:
    print(f"out {n}.1")
    print(f"err {n}", file=sys.stderr)
    print(f"out {n}.2", end="")  # no newline: the client still ends the line
    return n * 10


def chatty_then_fail(n: int) -> int:
    print(f"about to fail {n}")
    raise ValueError(n)


class Console:
    """This process's stdout and stderr, as one ordered record (each write tagged with its stream)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def stream(self, name: str) -> io.StringIO:
        console = self

        class Stream(io.StringIO):
            def write(self, text: str) -> int:
                console.writes.append((name, text))
                return len(text)

        return Stream()

    def lines(self) -> list[tuple[str, str]]:
        return [(name, line) for name, text in self.writes for line in text.splitlines()]


def install_console(monkeypatch: pytest.MonkeyPatch) -> Console:
    """Replace sys.stdout and sys.stderr from inside a test (pytest sets its own between setup and call)."""
    record = Console()
    monkeypatch.setattr(sys, "stdout", record.stream("stdout"))
    monkeypatch.setattr(sys, "stderr", record.stream("stderr"))
    return record


@pytest.fixture(params=["default", "zmq", pytest.param("gearman", marks=pytest.mark.gearman), "tcp"])
def transport(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "tcp":  # workers started apart from the client, as on other machines
        server: TcpServer = request.getfixturevalue("tcp_server")
        start_workers: Callable[..., Supervisor] = request.getfixturevalue("start_workers")
        start_workers(1)
        yield server.url
    else:
        yield None if request.param == "default" else request.param


def test_output_arrives_prefixed_in_order_before_the_future_settles(
        transport: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    console = install_console(monkeypatch)
    seen_at_settle: queue.SimpleQueue[list[tuple[str, str]]] = queue.SimpleQueue()
    with RemoteExecutor(1, transport=transport, forward_output=True) as executor:
        future = executor.submit(chatty, 1)
        future.add_done_callback(lambda _: seen_at_settle.put(console.lines()))
        assert future.result(timeout=60) == 10
        lines = console.lines()
        assert seen_at_settle.get(timeout=60) == lines  # all of it was written before the future settled
        assert [(name, re.sub(r"^\[[^\]]+\] ", "", line)) for name, line in lines] == [
            ("stdout", "out 1.1"), ("stderr", "err 1"), ("stdout", "out 1.2")]
        workers = {re.match(r"^\[([^\]]+)\] ", line)[1] for _, line in lines}  # type: ignore[index]
        assert len(workers) == 1 and workers.pop()

        del console.writes[:]
        with pytest.raises(ValueError, match=r"^2$"):
            executor.submit(chatty_then_fail, 2).result(timeout=60)
        assert [re.sub(r"^\[[^\]]+\] ", "", line) for _, line in console.lines()] == ["about to fail 2"]

        del console.writes[:]
        assert list(executor.map(chatty, [3, 4, 5], chunksize=2)) == [30, 40, 50]
        printed = [re.sub(r"^\[[^\]]+\] ", "", line) for name, line in console.lines() if name == "stdout"]
        # One chunk is one call's output: 3 and 4 ran in one, 5 in the other.
        assert sorted(printed) == ["out 3.1", "out 3.2out 4.1", "out 4.2", "out 5.1", "out 5.2"]


def test_without_the_option_nothing_is_captured_and_the_wire_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    console = install_console(monkeypatch)
    call = s.encode_call(chatty, (1,), {})
    assert len(s.loads(call)) == 4 and len(s.loads(s.encode_chunk(chatty, [(1,)]))) == 3
    with RemoteExecutor(1) as executor:
        assert executor.submit(chatty, 1).result(timeout=60) == 10
    assert console.lines() == []  # it went to the worker's own stdout and stderr


def test_worker_side_capture_keeps_order_and_names_the_worker(capfd: pytest.CaptureFixture[str]) -> None:
    outcome = s.run_task(s.encode_call(chatty, (7,), {}, output=True), "w-1")
    envelope = s.loads(outcome)
    assert envelope[:2] == ("ok", 70)
    assert envelope[2] == ("w-1", [(1, "out 7.1\n"), (2, "err 7\n"), (1, "out 7.2")])
    # In the caller's own process (the memory transport), output is already where it belongs: not captured.
    assert len(s.loads(s.run_task(s.encode_call(chatty, (7,), {}, output=True)))) == 2
    assert "out 7.1" in capfd.readouterr().out


def test_a_result_that_cannot_be_pickled_still_brings_its_output() -> None:
    import threading

    def lock_maker() -> object:
        print("made a lock")
        return threading.Lock()

    forwarded: list[wire_output.Output] = []
    ok, exc = s.decode_outcome(s.run_task(s.encode_call(lock_maker, (), {}, output=True), "w"), forwarded.append)
    assert not ok and "cannot pickle the result" in str(exc)
    assert forwarded == [("w", [(1, "made a lock\n")])]


def test_output_beyond_the_limit_is_counted_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire_output, "MAX_OUTPUT", 10)
    with wire_output.captured() as pieces:
        print("0123456789abcdef")
    assert pieces[0] == (1, "0123456789")
    assert pieces[-1][0] == 2 and "7 more characters of output were not forwarded" in pieces[-1][1]
    out, err = io.StringIO(), io.StringIO()
    wire_output.write_output(("w", pieces), out, err)
    assert out.getvalue() == "[w] 0123456789\n"  # the last line cut short still ends
    assert err.getvalue() == "[w] [remote_executor: 7 more characters of output were not forwarded]\n"  # one line


def uses_the_stream_api() -> str:
    """What code does with a standard stream besides write(): bytes to its buffer, its encoding, its
    descriptor (a child process's output, faulthandler)."""
    sys.stdout.buffer.write("bytes é\n".encode(sys.stdout.encoding))
    sys.stdout.buffer.flush()
    print("text", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", "pass"], stdout=sys.stdout, stderr=sys.stderr, check=True)
    return f"{sys.stdout.encoding} {sys.stdout.errors} {sys.stdout.isatty()} {sys.stdout.fileno() >= 0}"


def test_captured_streams_answer_what_code_asks_of_a_standard_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """(buffer and fileno raised, encoding was None: code that printed with them failed only when its output
    was forwarded.)"""
    console = install_console(monkeypatch)
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 1, raising=False)  # (a StringIO has no descriptor)
    with RemoteExecutor(1, forward_output=True) as executor:
        described = executor.submit(uses_the_stream_api).result(timeout=60)
    encoding, errors, tty, has_fd = described.split()
    assert encoding and errors and (tty, has_fd) == ("False", "True")
    assert [(name, re.sub(r"^\[[^\]]+\] ", "", line)) for name, line in console.lines()] == [
        ("stdout", "bytes é"), ("stderr", "text")]


def test_bytes_written_a_few_at_a_time_are_decoded_across_writes() -> None:
    with wire_output.captured() as pieces:
        for byte in "é€ and a cut one: ".encode() + "€".encode()[:2]:
            sys.stdout.buffer.write(bytes([byte]))
    assert pieces == [(1, "é€ and a cut one: \ufffd")]  # the incomplete last character, once, at the end


def test_many_writes_keep_their_order_one_piece_per_run_of_a_stream() -> None:
    with wire_output.captured() as pieces:
        for i in range(5000):
            print(i)
            if i % 1000 == 999:
                print("err", file=sys.stderr)
    assert [stream for stream, _ in pieces] == [1, 2] * 5
    assert "".join(text for stream, text in pieces if stream == 1) == "".join(f"{i}\n" for i in range(5000))


def test_prefixed_ends_every_line() -> None:
    assert wire_output.prefixed("w", "a\nb") == "[w] a\n[w] b\n"
    assert wire_output.prefixed("w", "") == ""


def test_the_documented_example_runs() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "forward_output.py")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True)
    assert re.search(r"^\[local-worker-\d\] working on 3$", done.stdout, flags=re.M), done.stdout
    assert re.search(r"^\[local-worker-\d\] warning: 3 is odd$", done.stderr, flags=re.M), done.stderr
    assert "results: [0, 1, 4, 9]" in done.stdout
