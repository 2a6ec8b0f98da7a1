"""TLS for our gearman connections, shared by a reading thread and writing threads.

A gearman connection is read by one thread (the client's reader, the worker's grab loop) while others write
(submits, results, "alive" reports). OpenSSL forbids using one ``SSL`` object from two threads at once, so
:class:`SharedTlsSocket` makes every TLS call under one lock, on a non-blocking socket, and waits for the
network (``poll``) without holding it: a reader waiting for gearmand never delays a writer.

It offers the part of the socket API the connections use: ``recv``, ``sendall``, ``shutdown``, ``close``,
``fileno`` and ``pending`` (bytes TLS has decrypted but nobody has read yet, which ``poll`` cannot see).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any

from ...tls import TlsConfig
from ...wire.serialization import Buffer


def tls_context(options: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The client context of the ``tls_*`` options (a gearmand serving TLS, or a TLS terminator in front of
    one), None without them. A worker presents ``tls_cert`` too when given (a gearmand asking for one)."""
    config = TlsConfig.from_options({k: v for k, v in options.items() if k.startswith("tls")})
    return None if config is None else config.client_context()


class SharedTlsSocket:
    """An established TLS connection (``wrap`` it after the handshake) usable from several threads."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        tls.setblocking(False)
        self._tls = tls
        self._lock = threading.Lock()
        self._shut = False
        # While set (monotonic time), recv gives up then with TimeoutError: a peer that sends part of a TLS
        # record and stops would otherwise hold a reader that needs the whole record (the connect probe).
        self.recv_deadline: float | None = None

    @classmethod
    def connect(cls, sock: socket.socket, context: ssl.SSLContext, server_hostname: str,
                timeout: float) -> SharedTlsSocket:
        """The TLS handshake on a connected socket (bounded by ``timeout``), then shared use."""
        sock.settimeout(timeout)
        tls = context.wrap_socket(sock, server_hostname=server_hostname)
        return cls(tls)

    def fileno(self) -> int:
        return self._tls.fileno()

    def pending(self) -> int:
        with self._lock:
            return self._tls.pending()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at the end of the stream (or after :meth:`shutdown`)."""
        while True:
            with self._lock:
                if self._shut:
                    return b""
                try:
                    return self._tls.recv(size)
                except ssl.SSLWantReadError:
                    want_write = False
                except ssl.SSLWantWriteError:
                    want_write = True
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
            if self.recv_deadline is not None and time.monotonic() >= self.recv_deadline:
                raise TimeoutError("no whole TLS record in time")
            self._wait(want_write)

    def sendall(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view:
            with self._lock:
                if self._shut:
                    raise BrokenPipeError("the connection was shut down")
                try:
                    sent = self._tls.send(view)
                except ssl.SSLWantWriteError:
                    want_write = True
                except ssl.SSLWantReadError:
                    want_write = False
                else:
                    view = view[sent:]
                    continue
            self._wait(want_write)

    def shutdown(self, how: int) -> None:
        """Wake every thread waiting on this connection; the descriptor stays valid until :meth:`close`."""
        self._shut = True
        # The plain socket's shutdown: SSLSocket.shutdown would also drop the TLS object under a reader's feet.
        socket.socket.shutdown(self._tls, how)

    def close(self) -> None:
        with self._lock:
            self._shut = True
            self._tls.close()

    def _wait(self, want_write: bool) -> None:
        """Until the socket is ready in the direction TLS asked for (or shut down, which makes it ready)."""
        fd = self._tls.fileno()
        if fd < 0:
            return
        # poll, not select: select fails on descriptors of 1024 and above, which a busy process reaches.
        poller = select.poll()
        poller.register(fd, select.POLLOUT if want_write else select.POLLIN)
        deadline = self.recv_deadline
        poller.poll(1000 if deadline is None else max(0, min(1000, int((deadline - time.monotonic()) * 1000) + 1)))
