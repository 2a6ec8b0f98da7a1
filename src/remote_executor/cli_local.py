"""``remote-executor cluster start|stop``: a persistent cluster on this machine (a job server and N workers).

``start`` runs it in the background and records it where ``cluster up`` records an SSH cluster
(``$XDG_CONFIG_HOME/remote_executor/cluster.json``, with a fresh key in ``cluster.key``), so that
``cluster status``, ``cluster stop`` and ``remote_executor.connect()`` find it without a URL. Everything
listens on loopback; the workers drain when it stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from .errors import RemoteExecutorError
from .signals import SignalEvent, set_on_signals

log = logging.getLogger("remote_executor.cli")


def add_local_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    start = actions.add_parser("start", help="start a job server and N workers on this machine, in the background")
    start.add_argument("-n", "--processes", type=int, default=os.cpu_count() or 1,
                       help="how many worker processes (default: the number of CPUs)")
    start.add_argument("--transport", choices=("tcp", "zmq", "gearman"), default="tcp",
                       help="the job server: ours over tcp or zmq, or gearmand (default: %(default)s)")
    start.add_argument("--port", type=int, default=0, help="the job server's port on 127.0.0.1 (default: any free one)")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds for every worker to attach")
    start.add_argument("--foreground", action="store_true",
                       help="run in the foreground until SIGTERM or Ctrl-C (for systemd) instead of in the background")
    start.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # how the background run reports
    start.set_defaults(func=_start)
    stop = actions.add_parser("stop", help="stop the cluster (the same as down): drain the workers, stop the server")
    stop.add_argument("--timeout", type=float, default=600.0,
                      help="seconds to let running calls finish before everything is stopped at once")
    from .cli_cluster import _down

    stop.set_defaults(func=_down)


def _start(args: argparse.Namespace) -> int:
    from .cli_cluster import READY_MARGIN, _background, _refuse_if_running

    if args.processes < 1:
        raise ValueError("-n/--processes must be at least 1")
    _refuse_if_running()
    if args.foreground or args.ready_fd is not None:
        return _serve(args)
    report = _background(["cluster", "start", "--foreground", "-n", str(args.processes), "--transport",
                          args.transport, "--port", str(args.port), "--timeout", str(args.timeout)],
                         args.log_level, args.timeout + READY_MARGIN)
    print(f"cluster started: {report['url']}, {args.processes} worker process(es) on this machine\n"
          f"key file:   {report['key_file']}\n"
          f"state:      {report['state_file']} (log: {report['log_file']})\n"
          f"use it:     remote_executor.connect()\n"
          f"stop it:    remote-executor cluster stop", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The cluster in this process until SIGTERM or Ctrl-C: then drain the workers and stop."""
    from .cli_cluster import KEY_NAME, LOG_NAME, _forget, _report
    from .ssh import config_dir, state_path, write_private

    stop = SignalEvent()
    set_on_signals(stop)
    key = secrets.token_hex(32).encode()
    key_file, state_file = config_dir() / KEY_NAME, state_path()
    try:
        server, supervisor = _launch(args, key)
    except Exception as exc:
        _report(args.ready_fd, {"ok": False, "error": str(exc)})
        raise
    try:
        write_private(key_file, key + b"\n")
        state = {"url": server.url, "key_file": str(key_file), "pid": os.getpid(), "hosts": ["localhost"],
                 "options": {}, "failed": {}, "log_file": str(config_dir() / LOG_NAME), "started": time.time(),
                 "local": True}
        write_private(state_file, json.dumps(state, indent=2).encode() + b"\n")
        _report(args.ready_fd, {"ok": True, "url": server.url, "key_file": str(key_file),
                                "state_file": str(state_file), "workers": {"localhost": args.processes}})
        print(f"cluster started at {server.url}; key file {key_file}", flush=True)
        ended = (lambda: not server.is_running()) if args.transport == "gearman" else server.stopping.is_set
        while not stop.wait(0.5):
            if ended():  # `remote-executor stop URL` (or gearmand's own shutdown): the cluster ends with it
                log.warning("the job server %s was stopped; stopping the cluster", server.url)
                break
        log.info("draining the workers and stopping the cluster")
        supervisor.drain(timeout=None)
    finally:
        supervisor.stop()
        server.stop()
        _forget(state_file, key_file, os.getpid())
    return 0


def _launch(args: argparse.Namespace, key: bytes) -> tuple[Any, Any]:
    """Start the job server (or gearmand) and the workers; return once every worker attached."""
    from .security import key_to_env
    from .supervisor import Supervisor

    server = _job_server(args.transport, args.port, key)
    try:
        supervisor = Supervisor(server.url, args.processes, env=key_to_env(key), name="localhost")
        supervisor.start()
        try:
            _wait_attached(server.url, key, args.processes, args.timeout, supervisor)
        except BaseException:
            supervisor.stop()
            raise
    except BaseException:
        server.stop()
        raise
    return server, supervisor


def _job_server(scheme: str, port: int, key: bytes) -> Any:
    if scheme == "gearman":
        from .transports.gearman.gearmand import GearmandProcess

        return GearmandProcess(port=port or None).start()
    from .transports import get_backend
    from .transports.base import ServerSettings

    url = f"{scheme}://127.0.0.1:{port or _free_port()}"
    server = get_backend(scheme).server(url, ServerSettings(key=key))
    server.start()
    return server


def _wait_attached(url: str, key: bytes, count: int, timeout: float, supervisor: Any) -> None:
    from .transports import get_backend, scheme_of
    from .transports.base import Options

    backend, deadline = get_backend(scheme_of(url)), time.monotonic() + timeout
    pause = threading.Event()  # never set: a pause between two looks at the server
    while True:
        if supervisor.refused.is_set():
            raise RemoteExecutorError(f"the job server {url} refused the workers (see the log)")
        info = backend.status(url, Options(key=key, connect_timeout=5.0))
        attached = _attached(info)
        if attached >= count:
            return
        if time.monotonic() > deadline:
            raise RemoteExecutorError(f"{attached} of {count} worker(s) attached to {url} within {timeout:g}s")
        pause.wait(0.1)


def _attached(info: dict[str, Any]) -> int:
    """Worker slots in a job server's status, or workers registered for the pool's function in gearmand's."""
    if "servers" in info:  # gearmand
        return sum(int(entry.get("workers", 0)) for server in info["servers"] for entry in server.get("status", [])
                   if entry.get("function") == info.get("function"))
    return int(info.get("capacity", 0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
