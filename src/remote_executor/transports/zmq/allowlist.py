"""The zmq server's CURVE allow-list: only peers whose public key is listed get a session.

pyzmq's ZAP authenticator (:class:`zmq.auth.thread.ThreadAuthenticator`) runs on a thread of its own beside
the server's ROUTER, in the server's own ZeroMQ context. libzmq asks it about every CURVE handshake before
the handshake completes; a key that is not listed is refused inside libzmq, so such a peer never gets a
session and none of its messages ever reaches the server loop. Refusals are logged, rate-limited: a
refused peer may well retry every couple of seconds, or make up a new key for every attempt.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ...errors import TransportError

log = logging.getLogger("remote_executor.jobserver.server")

REFUSAL_LOG_INTERVAL = 60.0  # a refused key is logged at most once per interval
REFUSAL_LOG_BURST = 10  # and at most this many refusals are logged per interval in all


def load_allowed(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The z85 public keys of every ``*.key`` certificate in ``directory`` (as ``zmq.auth`` reads them).

    An unreadable directory or certificate, or one without any certificate, is an error: an allow-list
    that admits nobody is a mistake, never what was meant."""
    path = os.fspath(directory)
    try:
        keys = frozenset(zmq.auth.load_certificates(path))
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read the CURVE allow-list {path}: {exc}") from exc
    if not keys:
        raise TransportError(f"the CURVE allow-list {path} holds no public certificate (*.key): nobody could "
                             f"connect (copy each client's and worker's .key file there)")
    return keys


class RefusalLog:
    """Logs refused handshakes without letting a peer flood the log: each key at most once per
    ``interval``, and at most ``burst`` lines per interval in all (a count of the rest follows)."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, burst: int = REFUSAL_LOG_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._window = -math.inf  # start of the current interval
        self._logged: dict[bytes, float] = {}  # key -> when it was last logged (at most `burst` entries)
        self._lines = 0
        self._unlogged = 0

    def refused(self, key: bytes, address: str, directory: str) -> None:
        now = self._clock()
        if now - self._window >= self._interval:
            self._new_window(now)
        last = self._logged.get(key)
        if (last is not None and now - last < self._interval) or self._lines >= self._burst:
            self._unlogged += 1
            return
        self._logged[key] = now
        self._lines += 1
        log.warning("refused a CURVE handshake from %s: public key %s is not on the allow-list %s "
                    "(each key is logged at most once every %gs)", address or "?", key.decode(errors="replace"),
                    directory, self._interval)

    def flush(self) -> None:
        """Log how many refusals were left out so far (the server is stopping, or a new interval began)."""
        if self._unlogged:
            log.warning("%d more refused CURVE handshake(s) were not logged (at most one line per key and "
                        "%d in all every %gs)", self._unlogged, self._burst, self._interval)
        self._unlogged = 0

    def _new_window(self, now: float) -> None:
        self.flush()
        self._window = now
        self._lines = 0
        self._logged = {k: t for k, t in self._logged.items() if now - t < self._interval}


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, remembering the address of the request it is answering (for the log)."""

    address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)


class CurveAllowList:
    """Admits a CURVE peer only if its public key is in ``directory`` (read once, at start).

    :meth:`start` before the server socket binds, :meth:`stop` before its context terminates."""

    def __init__(self, ctx: zmq.Context[Any], directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.allowed = load_allowed(self.directory)
        self._refusals = RefusalLog()
        self._auth = _Authenticator(ctx, log=logging.getLogger("remote_executor.jobserver.zap"))

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)
        log.info("CURVE allow-list %s: %d public key(s)", self.directory, len(self.allowed))

    def callback(self, domain: str, key: bytes) -> bool:
        """The authenticator's question for one handshake (``key`` in z85). Never raises: an exception
        here would end the authenticator's thread, and with it every later handshake."""
        try:
            if key in self.allowed:
                return True
            self._refusals.refused(key, self._auth.address, self.directory)
        except Exception:
            log.exception("CURVE allow-list check failed; refusing the handshake")
        return False

    def stop(self) -> None:
        """Stop the authenticator's thread and close its sockets; idempotent."""
        self._auth.stop()
        self._refusals.flush()  # after the thread has ended: nothing else touches the log now

