"""A TCP fault proxy for the chaos tests (``tc netem`` is not available): delay, random resets, reset-all.

Run it inside a namespace; it forwards every connection made to ``--listen`` to ``--target``::

    python proxy.py --listen 10.213.0.1:6000 --target 10.213.0.1:5555 --delay 0.02 --drop 0.002 --seed 7

- ``--delay S``: every chunk read from either side is written to the other ``S`` seconds later (a link's
  latency: chunks stay in order and are pipelined, throughput is not capped);
- ``--drop P``: for each chunk, with probability ``P`` the connection is reset (RST both ways) instead;
- ``--rate B``: at most ``B`` bytes per second in each direction of each connection (0: no cap); reading
  waits, so a fast sender is slowed down as by a slow link (its writes block once the buffers are full);
- commands on stdin, one per line: ``reset`` (reset every open connection now; answers ``reset N``),
  ``stall`` (stop forwarding on every open connection, without closing it: neither side's bytes are read
  any more and nothing reaches either, as with a peer that froze or a path cut with the connections still up;
  later connections are forwarded as usual; answers ``stall N``), ``delay S``, ``drop P``, ``rate B``
  (answers ``rate B``), ``stats`` (answers ``stats {json}``), ``quit``.

It prints ``listening HOST:PORT`` once it accepts connections, and ``stats {json}`` when it exits.
Standard library only (asyncio), so it runs anywhere the tests' Python does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's side and the target's side."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    stalled: bool = False


class FaultProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, delay: float = 0.0, drop: float = 0.0,
                 seed: int | None = None, rate: float = 0.0) -> None:
        self.listen = listen
        self.target = target
        self.delay = delay
        self.drop = drop
        self.rate = rate
        self.random = random.Random(seed)
        self.pairs: set[_Pair] = set()
        self.stalled: list[_Pair] = []  # open, never forwarded again; reset when the proxy closes
        self.stats = {"accepted": 0, "refused": 0, "random_resets": 0, "commanded_resets": 0, "stalled": 0,
                      "chunks": 0, "bytes": 0}
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], reuse_address=True)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target[0], self.target[1]), timeout=10)
        except (OSError, asyncio.TimeoutError):
            self.stats["refused"] += 1
            _abort(client_writer)  # the target is down: the client sees its connection reset
            return
        self.stats["accepted"] += 1
        for writer in (client_writer, target_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client_writer, target_writer)
        self.pairs.add(pair)
        pair.tasks = [asyncio.ensure_future(self._pump(pair, client_reader, target_writer)),
                      asyncio.ensure_future(self._pump(pair, target_reader, client_writer))]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self.pairs.discard(pair)

    async def _pump(self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction: this task reads, a second one writes each chunk when it is due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sender = asyncio.ensure_future(self._send_when_due(pair, queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(65536 if self.rate <= 0 else max(1, int(self.rate / 20)))
                except OSError:
                    data = b""
                if data and self.rate > 0:
                    await asyncio.sleep(len(data) / self.rate)  # before the next read: the sender waits
                if not data:
                    break
                self.stats["chunks"] += 1
                self.stats["bytes"] += len(data)
                if self.drop > 0 and self.random.random() < self.drop:
                    self.stats["random_resets"] += 1
                    self.reset(pair)
                    return
                queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((loop.time() + self.delay, b""))  # EOF, after what is still queued
            await sender
        except (OSError, asyncio.CancelledError):
            if not pair.stalled:
                self.reset(pair)
        finally:
            if not sender.done():
                sender.cancel()

    async def _send_when_due(self, pair: _Pair, queue: asyncio.Queue[tuple[float, bytes]],
                             writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    _write_eof(writer)
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            self.reset(pair)

    def reset(self, pair: _Pair) -> None:
        """Abort both sides with an RST (SO_LINGER 0) and stop their pumps."""
        if pair.closed:
            return
        pair.closed = True
        for writer in (pair.client, pair.target):
            _abort(writer)
        for task in pair.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def reset_all(self) -> int:
        pairs = [p for p in self.pairs if not p.closed]
        for pair in pairs:
            self.reset(pair)
        self.stats["commanded_resets"] += len(pairs)
        return len(pairs)

    def stall_all(self) -> int:
        pairs = [p for p in self.pairs if not p.closed and not p.stalled]
        for pair in pairs:
            pair.stalled = True
            for writer in (pair.client, pair.target):
                writer.transport.pause_reading()  # the kernel buffers fill, then the peer's writes block
            for task in pair.tasks:
                task.cancel()
            self.stalled.append(pair)
        self.stats["stalled"] += len(pairs)
        return len(pairs)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for pair in [*self.pairs, *self.stalled]:
            pair.stalled = False
            self.reset(pair)
        if self.server is not None:  # (after the resets: since 3.12 it waits for every connection to close)
            await self.server.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _write_eof(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    proxy = FaultProxy(_address(args.listen), _address(args.target), delay=args.delay, drop=args.drop,
                       seed=args.seed, rate=args.rate)
    await proxy.start()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:  # a thread: asyncio's pipe readers do not like every kind of stdin
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    print(f"listening {args.listen}", flush=True)
    while True:
        command, _, value = (await commands.get()).partition(" ")
        if command == "reset":
            print(f"reset {proxy.reset_all()}", flush=True)
        elif command == "stall":
            print(f"stall {proxy.stall_all()}", flush=True)
        elif command == "delay":
            proxy.delay = float(value)
        elif command == "drop":
            proxy.drop = float(value)
        elif command == "rate":
            proxy.rate = float(value)
            print(f"rate {proxy.rate:g}", flush=True)
        elif command == "stats":
            print(f"stats {json.dumps(proxy.stats)}", flush=True)
        elif command == "quit":
            break
    await proxy.close()
    print(f"stats {json.dumps(proxy.stats)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward them to")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each chunk is held")
    parser.add_argument("--drop", type=float, default=0.0, help="probability per chunk of a connection reset")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes per second per direction (0: no cap)")
    parser.add_argument("--seed", type=int, default=None)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
