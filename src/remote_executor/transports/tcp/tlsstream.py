"""Frames over TLS: the server loop's :class:`TlsConnection` and the client/worker :class:`TlsChannel`.

The same frames as :mod:`.stream`, through an ``ssl.SSLSocket``, which changes three things: there is no
``sendmsg`` (buffers go out in order, small ones joined into one record and one write), a read or a write
may have to wait for the socket to be ready the other way (``SSLWantReadError`` / ``SSLWantWriteError``),
and decrypted bytes can wait inside the SSL object where ``select`` does not see them (so a read goes on
until :meth:`ssl.SSLSocket.pending` is 0). The plaintext classes are untouched by any of it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from ...errors import ConnectionFailedError
from ...netio import Waker, connect
from ...tls import TlsError
from ...wire.frames import MAGIC, Frame, Limits
from .stream import Connection, NotTlsError, TcpChannel

MAX_RECORD = 16 * 1024  # the most plaintext one TLS record carries (and one recv returns)
COALESCE = MAX_RECORD  # small buffers up to one record's worth are joined into one write
READ_BUDGET = 4 * 1024 * 1024  # bytes one read() takes before it lets the loop serve others
TLS_RECORD = 0x16  # the first byte a TLS client sends (a handshake record)


class TlsConnection(Connection):
    """A :class:`Connection` over TLS.

    Given ``server_context``, it is the server's side of a connection just accepted: the first read looks
    at the first byte without taking it (a TLS client starts with a handshake record; anything else is
    refused with :class:`NotTlsError`), then wraps the socket and runs the handshake step by step, as the
    loop sees the socket ready. A client's side is handed a socket whose handshake is done."""

    def __init__(self, sock: socket.socket, key: bytes | None, limits: Limits, peer: str,
                 server_context: ssl.SSLContext | None = None) -> None:
        super().__init__(sock, key, limits, peer)
        self._server_context = server_context  # until the socket is wrapped
        self.handshaking = server_context is not None
        self.read_needs_write = False
        self._chunk: memoryview | None = None  # what the last send() that could not finish was given
        self._eof = False

    @property
    def wants_write(self) -> bool:
        return bool(self._out) or self.read_needs_write

    def read(self) -> list[Frame] | None:
        """Frames now complete (maybe none); ``None`` at end of stream. Raises ProtocolError on bad input
        (NotTlsError for a peer that does not speak TLS) and ``ssl.SSLError`` for a failed handshake."""
        self.read_needs_write = False
        if self._eof:
            return None
        if self.handshaking:
            started = self._start_tls()
            if started is None:
                return None
            if not started or not self._handshake():
                return []
        frames: list[Frame] = []
        budget = READ_BUDGET
        while True:
            try:
                n = self.sock.recv_into(self.reader.buffer())
            except ssl.SSLWantReadError:
                return frames
            except ssl.SSLWantWriteError:
                self.read_needs_write = True
                return frames
            except (BlockingIOError, InterruptedError):
                return frames
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
                n = 0
            if n == 0:
                if frames:  # hand these over first; the next read reports the end
                    self._eof = True
                    return frames
                return None
            frames.extend(self.reader.feed(n))
            budget -= n
            # Never stop with decrypted bytes left inside the SSL object: select() would not say they are
            # there. Otherwise go on while full records come (a big frame), or up to the budget; a short
            # record is most likely a write's last, and select() says so if more follows.
            if (n < MAX_RECORD or budget <= 0) and not self.sock.pending():  # type: ignore[attr-defined]
                return frames

    def _start_tls(self) -> bool | None:
        """Wrap the accepted socket once its first byte says TLS; False: nothing arrived yet; None: closed."""
        context = self._server_context
        if context is None:
            return True
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionError:
            return None
        if not first:
            return None
        if first[0] != TLS_RECORD:
            ours = first == MAGIC[:1]
            raise NotTlsError("speaks plaintext to this TLS server (a client or worker without TLS options?)"
                              if ours else f"does not speak TLS (first byte {first!r})", ours)
        self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self._server_context = None
        return True

    def _handshake(self) -> bool:
        """One step of the handshake; True once it is complete."""
        try:
            self.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            self.read_needs_write = True
            return False
        self.handshaking = False
        return True

    def read_plaintext(self) -> list[Frame]:
        """What a plaintext peer has sent so far (before the socket was wrapped), as plaintext frames."""
        if self._server_context is None:  # wrapped: TLS after all
            return []
        return Connection.read(self) or []

    def refuse_plaintext(self, frame: Frame) -> None:
        """Answer a plaintext peer in plaintext (it cannot read anything else), before it is closed."""
        super().queue(frame)
        with contextlib.suppress(OSError):
            super().flush()
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(65536):  # what it sent, so that closing does not reset the connection
                pass

    def flush(self) -> bool:
        """Send as much as the socket takes; True when everything queued is sent (and no read waits for
        the socket to be writable)."""
        if self.handshaking:  # nothing goes out before the handshake is complete
            return not self.read_needs_write
        while self._out:
            chunk = self._chunk if self._chunk is not None else self._next_chunk()
            try:
                sent = self.sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                # SSL_write must be called again with the same bytes (renegotiation, the only way it could
                # wait for a read, is off).
                self._chunk = chunk
                return False
            self._advance(sent)
            self._chunk = chunk[sent:] if sent < len(chunk) else None
        return not self.read_needs_write

    def _next_chunk(self) -> memoryview:
        """The next buffer to send: a big one as it is, else small ones joined (one record, one write)."""
        head = self._out[0]
        if len(head) >= COALESCE or len(self._out) == 1:
            return head
        pieces: list[memoryview] = []
        size = 0
        for buf in self._out:
            if size + len(buf) > COALESCE:
                break
            pieces.append(buf)
            size += len(buf)
        return head if len(pieces) == 1 else memoryview(b"".join(pieces))


class TlsChannel(TcpChannel):
    """A :class:`TcpChannel` over TLS. The handshake happens in :meth:`connect`, blocking (with the connect
    timeout); afterwards the socket is non-blocking like a plain one."""

    connection_class = TlsConnection
    kernel_waits = False

    @classmethod
    def connect_tls(cls, address: tuple[str, int], key: bytes | None, limits: Limits, url: str,
                    timeout: float, context: ssl.SSLContext) -> TlsChannel:
        sock = connect(address, timeout, url)
        try:
            # The host of the URL is what the certificate must name; an IP address must be in it as one.
            tls = context.wrap_socket(sock, server_hostname=address[0])
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(f"cannot verify the TLS certificate of {url}: {exc.verify_message}; the server's "
                           f"certificate must be signed by the CA this side trusts (tls_ca / --tls-ca, else the "
                           f"system's CAs) and name {address[0]!r}") from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ConnectionError) as exc:
            raise ConnectionFailedError(f"{url} closed the connection during the TLS handshake ({exc}): is it a "
                                        f"TLS server (remote-executor server --tls-cert ...)?") from exc
        except ssl.SSLError as exc:
            raise TlsError(f"the TLS handshake with {url} failed: {exc.reason or exc}") from exc
        except OSError as exc:  # a timeout among them
            raise ConnectionFailedError(f"the TLS handshake with {url} failed: {exc}") from exc
        finally:
            sock.close()  # detached by wrap_socket when it succeeds: then this does nothing
        return cls(tls, key, limits, url)

    def flush(self) -> bool:
        try:
            return super().flush()
        except ConnectionFailedError as exc:
            self._raise_refusal(exc)
            raise

    def receive(self) -> list[Frame]:
        try:
            return super().receive()
        except ConnectionFailedError as exc:
            self._raise_refusal(exc)
            raise

    def _raise_refusal(self, lost: ConnectionFailedError) -> None:
        """Raise :class:`TlsError` if the server refused this side's certificate before it closed.

        With TLS 1.3 the server checks the client's certificate after the client has finished its
        handshake: its refusal is an alert that only a read sees (a write just finds the connection gone)."""
        cause = lost.__cause__
        if not (isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or "")):
            try:
                self._conn.sock.recv(1)  # non-blocking: an alert that arrived is raised, else nothing
                return
            except ssl.SSLError as exc:
                cause = exc
            except OSError:
                return
        reason = cause.reason or ""
        if "ALERT" not in reason:
            return
        if any(word in reason for word in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")):
            raise TlsError(f"{self.peer} refused this side's TLS certificate ({reason}): it requires a client "
                           f"certificate (tls_cert/tls_key, --tls-cert/--tls-key) signed by the CA it trusts, "
                           f"and valid now") from cause
        raise TlsError(f"{self.peer} ended the TLS session with an alert ({reason})") from cause

    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        if self._conn.sock.pending():  # type: ignore[attr-defined]  # decrypted already: select cannot see it
            return
        super().wait(timeout, waker)
