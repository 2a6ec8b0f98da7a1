"""A probe that lives in one namespace for a whole chaos run and answers questions about the others.

``python probe.py KEY_FILE`` prints ``ready``, then answers one line per command read on stdin:

- ``status URL`` -> ``status {json}`` (what ``remote-executor status URL`` prints) or ``error "why"``;
- ``port HOST PORT SECONDS`` -> ``port ok`` once HOST:PORT accepts a connection, ``port fail`` after SECONDS.

One long-lived process instead of a fresh ``remote-executor status`` per poll: no import cost per question.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def _port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def main() -> None:
    from remote_executor.security import resolve_key
    from remote_executor.transports import get_backend, scheme_of
    from remote_executor.transports.base import Options

    key = resolve_key(key_file=sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "status":
            try:
                info = get_backend(scheme_of(args[0])).status(args[0], Options(key=key, connect_timeout=5.0))
                print(f"status {json.dumps(info)}", flush=True)
            except Exception as exc:
                print(f"error {json.dumps(f'{type(exc).__name__}: {exc}')}", flush=True)
        elif command == "port":
            print("port ok" if _port(args[0], int(args[1]), float(args[2])) else "port fail", flush=True)
        else:
            print(f"error {json.dumps('unknown command ' + command)}", flush=True)


if __name__ == "__main__":
    main()
