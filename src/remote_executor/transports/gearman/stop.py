"""``remote-executor stop gearman://HOST:PORT``: a graceful stop of one gearmand.

gearmand's own graceful shutdown closes its listening socket, lets every job it has finish (queued ones
too, as long as workers take them) and then exits; its clients and workers see the connection close and
reconnect elsewhere or give up, as after any loss of a job server. It is asked for with the admin command
``shutdown graceful``. Some builds leave that command out (Debian's answers ``UNKNOWN_COMMAND``): then a
gearmand on this machine is sent SIGUSR1, which its signal handler treats as the same graceful shutdown,
after checking that the pid its admin ``getpid`` names is a gearmand process; one on another machine cannot
be stopped from here, and the error says how to do it there.
"""

from __future__ import annotations

import os
import signal
import ssl
from typing import Any

from ...errors import TransportError
from ...security import is_loopback
from .codec import AdminError, GearmanError, parse_status
from .connection import admin_command


def stop_gearmand(host: str, port: int, *, timeout: float, tls: ssl.SSLContext | None) -> dict[str, Any]:
    """Ask the gearmand at ``host:port`` to stop gracefully; its answer as ``remote-executor stop`` prints it
    (``running`` and ``queued``: the jobs it finishes first). Raises :class:`TransportError` if it cannot."""
    address = f"{host}:{port}"
    try:
        functions = parse_status(admin_command(host, port, "status", timeout=timeout, tls=tls))
        answer: dict[str, Any] = {"server": f"gearman://{address}",
                                  "running": sum(f.running for f in functions),
                                  "queued": sum(f.total - f.running for f in functions)}
        try:
            admin_command(host, port, "shutdown graceful", timeout=timeout, tls=tls)
            answer["how"] = "admin shutdown graceful"
        except AdminError as exc:
            if "UNKNOWN_COMMAND" not in str(exc):
                raise
            answer["how"] = _signal_local(host, port, timeout, tls)
    except (GearmanError, OSError) as exc:
        raise TransportError(f"could not stop gearmand at {address}: {exc}") from exc
    return answer


def _signal_local(host: str, port: int, timeout: float, tls: ssl.SSLContext | None) -> str:
    """This gearmand has no admin ``shutdown``: SIGUSR1 (graceful) if it runs on this machine."""
    address = f"{host}:{port}"
    if not is_loopback(host):
        raise TransportError(
            f"the gearmand at {address} does not accept 'shutdown' on its admin port (its build leaves the "
            f"command out), and it is not on this machine: on its machine, run `remote-executor stop "
            f"gearman://127.0.0.1:{port}` or send it SIGUSR1 (a graceful stop)")
    (line,) = admin_command(host, port, "getpid", timeout=timeout, tls=tls)
    fields = line.split()
    if len(fields) != 2 or fields[0] != "OK" or not fields[1].isdigit():
        raise TransportError(f"the gearmand at {address} answered 'getpid' with {line!r}")
    pid = int(fields[1])
    try:
        with open(f"/proc/{pid}/comm") as comm:
            name = comm.read().strip()
    except OSError as exc:
        raise TransportError(f"the gearmand at {address} names pid {pid}, which this machine does not show "
                             f"({exc}): it runs in another namespace or container; stop it there") from exc
    if not name.startswith("gearmand"):
        raise TransportError(f"the gearmand at {address} names pid {pid}, which is {name!r}, not a gearmand: "
                             f"not stopping it")
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError as exc:
        raise TransportError(f"the gearmand at {address} (pid {pid}) belongs to another user: stop it as "
                             f"that user (SIGUSR1 is a graceful stop)") from exc
    return f"SIGUSR1 to pid {pid} (its build has no admin shutdown)"
