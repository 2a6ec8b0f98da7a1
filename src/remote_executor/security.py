"""Where keys come from, and which addresses a server may listen on without one."""

from __future__ import annotations

import ipaddress
import os
import socket

from .errors import TransportError

KEY_ENV = "REMOTE_EXECUTOR_KEY"
KEY_HEX_ENV = "REMOTE_EXECUTOR_KEY_HEX"  # how a parent hands an arbitrary-bytes key to its workers


def resolve_key(key: bytes | str | None = None, key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The shared HMAC key, the one rule for the Python API and the command line: the argument, else the
    key file, else ``$REMOTE_EXECUTOR_KEY``, else None (no key).

    Surrounding whitespace is stripped from every source alike, here and nowhere else (a key file ends in
    a newline); a key or key file that is empty after that is an error, never a silent "no key", and so is
    a ``key`` string that names an existing file (``key_file`` reads one). An empty environment variable
    counts as unset."""
    if key is not None and key_file is not None:
        raise ValueError("pass key or key_file, not both")
    if key is not None:
        if not isinstance(key, (bytes, bytearray, memoryview, str)):
            raise TypeError(f"key must be bytes, str or None, not {type(key).__name__}")
        if isinstance(key, str) and key.strip() and os.path.isfile(key):  # never a file's name taken as the key
            raise ValueError(f"key={key!r} names a file: pass key_file={key!r} to read the key from it "
                             f"(or the key itself, as key=...)")
        raw, source = (key.encode() if isinstance(key, str) else bytes(key)), "the key"
    elif key_file is not None:
        with open(key_file, "rb") as f:
            raw, source = f.read(), f"key file {os.fspath(key_file)!r}"
    else:
        raw, source = os.environ.get(KEY_ENV, "").encode(), ""
    raw = raw.strip()
    if not raw and source:
        raise ValueError(f"{source} is empty: an empty key is no key (pass none to run without one)")
    return raw or None


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, key: bytes | None, insecure: bool) -> None:
    """Pickle is code execution: without a key, listen on loopback only unless told ``--insecure``."""
    if key is None and not insecure and not is_loopback(host):
        raise TransportError(
            f"refusing to listen on {host!r} without a key: anyone who can connect could run code as this "
            f"user. Set a key (--key-file or ${KEY_ENV}) or pass --insecure on a trusted network."
        )


def key_to_env(key: bytes | None) -> dict[str, str]:
    """Environment that makes :func:`key_from_env` return ``key`` in a child process."""
    return {} if key is None else {KEY_HEX_ENV: key.hex()}


def key_from_env() -> bytes | None:
    """The key a parent handed down, else ``$REMOTE_EXECUTOR_KEY``."""
    hexed = os.environ.get(KEY_HEX_ENV)
    return bytes.fromhex(hexed) if hexed else resolve_key()
