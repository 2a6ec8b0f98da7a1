"""The client side of the SSH tests, run in the client's network namespace by the tests:

    python client_script.py SCENARIO CONFIG.json

It prints one JSON object per line (the last one holds the results). Calls synchronise through files in a
directory every namespace sees (the namespaces share the disk), never through sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remote_executor import RemoteExecutor, RemoteTraceback
from remote_executor.conformance.tasks import CustomError, raise_custom, square
from remote_executor.ssh import SSHCluster, SSHClusterError, SSHHost, running_cluster

TIMEOUT = 90.0


# --- what the workers run (pickled by value: this module is __main__) -------------------------------------


def wait_for_files(directory: str, pattern: str, count: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while (found := len(list(Path(directory).glob(pattern)))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{found} of {count} {pattern} in {directory}")
        time.sleep(0.02)
    return found


def together(directory: str, index: int, count: int) -> str:
    """Mark this call running, wait until ``count`` calls run at once, say which host ran it."""
    host = os.environ["TEST_HOST"]
    Path(directory, f"run-{index}-{host}").touch()
    wait_for_files(directory, "run-*", count)
    return host


def hold_on(directory: str, index: int, stuck_host: str) -> str:
    """Mark this call running; on ``stuck_host`` never return (that host is about to be cut off)."""
    host = os.environ["TEST_HOST"]
    Path(directory, f"run-{index}-{host}").touch()
    if host == stuck_host:
        time.sleep(3600)
    return host


def slow(directory: str, name: str, seconds: float) -> str:
    Path(directory, name).touch()
    time.sleep(seconds)
    return os.environ["TEST_HOST"]


# --- the client side ----------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll the cluster's view (no event announces it), with a deadline."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def cluster(config: dict[str, Any], hosts: list[str | SSHHost] | None = None, **options: Any) -> SSHCluster:
    """An SSH cluster of the lab's hosts, each worker told which host it is (``$TEST_HOST``)."""
    chosen = hosts or [SSHHost(name, env={"TEST_HOST": name}) for name in config["hosts"]]
    settings: dict[str, Any] = {
        "ssh_options": config["ssh_options"], "remote_command": config["remote_command"],
        "env": {"PYTHONPATH": config["src"]}, "heartbeat_interval": 0.5, "heartbeat_timeout": 3.0,
        "start_timeout": 60.0, "transport": config.get("transport", "tcp"), **options}
    if config.get("gearmand_host"):
        settings["gearmand_host"] = config["gearmand_host"]
    return SSHCluster(chosen, config.get("processes", 2), **settings)


def key_on_any_command_line(key: bytes) -> bool:
    """Whether the key shows on the command line of any process (the namespaces share the pid namespace)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if key in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def where_am_i() -> str:
    return os.environ["TEST_HOST"]


def plain_connection_refused(transport: SSHCluster) -> bool:
    """Whether a client that has the key but not the cluster's TLS CA / CURVE key is kept out: the wire is
    encrypted, not only signed. On gearman (gearmand lets anyone in): whether the workers refuse a call that
    is not sealed with the key."""
    from remote_executor.transports import get_backend, scheme_of
    from remote_executor.transports.base import Options

    if transport.transport == "gearman":
        try:
            with RemoteExecutor(transport=transport.url, max_workers=1, insecure=True) as keyless:
                keyless.submit(where_am_i).result(TIMEOUT)
        except Exception:
            return True
        return False
    try:
        get_backend(scheme_of(transport.url)).status(transport.url, Options(key=transport.key, connect_timeout=3))
    except Exception:
        return True
    return False


def basic(config: dict[str, Any]) -> None:
    markers = config["markers"]
    hosts: list[str | SSHHost] = [SSHHost(name, env={"TEST_HOST": name}) for name in config["hosts"]]
    hosts.append(SSHHost("node3", processes=1, pool="gpu", env={"TEST_HOST": "node3"}))
    with RemoteExecutor(transport=cluster(config, hosts=hosts)) as ex:
        transport = ex.transport
        assert isinstance(transport, SSHCluster)
        out: dict[str, Any] = {"url": transport.url, "square": ex.submit(square, 7).result(TIMEOUT),
                               "map": list(ex.map(square, range(20), chunksize=3, timeout=TIMEOUT))}
        try:
            ex.submit(raise_custom, 7, "boom").result(TIMEOUT)
        except CustomError as exc:
            out["error"] = {"type": type(exc).__name__, "code": exc.code, "message": str(exc),
                            "remote_traceback": isinstance(exc.__cause__, RemoteTraceback)}
        futures = [ex.submit(together, markers, i, 4) for i in range(4)]
        out["where"] = sorted(f.result(TIMEOUT) for f in futures)
        out["key_on_command_line"] = key_on_any_command_line(transport.key)
        out["hosts"] = transport.host_states()
        out["plain_refused"] = plain_connection_refused(transport)
        # A second executor, over the network this time, for the pool "gpu": only node3 serves it.
        with RemoteExecutor(transport=f"{transport.url}/gpu", key=transport.key, **transport.client_options) as gpu:
            out["gpu_where"] = sorted({gpu.submit(where_am_i).result(TIMEOUT) for _ in range(6)})
        out["default_where"] = sorted({ex.submit(where_am_i).result(TIMEOUT) for _ in range(12)})
        out["limited"] = ex.with_options(timeout=30).submit(square, 3).result(TIMEOUT)
        if transport.transport != "gearman":  # our job server can address one worker: broadcast
            out["broadcast"] = sorted(f.result(TIMEOUT) for f in ex.broadcast(where_am_i).values())
    emit(**out)


def sigkill(config: dict[str, Any]) -> None:
    """Start calls that never end on every worker, say so, and wait to be killed."""
    markers = config["markers"]
    ex = RemoteExecutor(transport=cluster(config))
    futures = [ex.submit(slow, markers, f"run-{i}", 3600) for i in range(4)]
    wait_for_files(markers, "run-*", 4)
    emit(ready=True, pid=os.getpid(), running=sum(not f.done() for f in futures))
    time.sleep(3600)


def lose_node2(config: dict[str, Any]) -> None:
    """node2 goes away while it runs calls (the test cuts it off when told): they run again on node1.
    Then the test brings node2 back: it rejoins and runs calls again."""
    markers = config["markers"]
    two = [SSHHost(name, env={"TEST_HOST": name}) for name in ("node1", "node2")]
    with RemoteExecutor(transport=cluster(config, hosts=two)) as ex:
        transport = ex.transport
        assert isinstance(transport, SSHCluster)
        futures = [ex.submit(hold_on, markers, i, "node2") for i in range(4)]
        wait_for_files(markers, "run-*", 4)
        emit(phase="running", on_node2=sorted(p.name for p in Path(markers).glob("run-*-node2")))
        sys.stdin.readline()  # node2 is gone now
        results = [f.result(TIMEOUT) for f in futures]
        # Its SSH session ends too (keepalives unanswered, or sshd gone): only then may node2 come back, so
        # that what is tested is a new session, not the old one surviving a short outage.
        wait_until(lambda: transport.host_states()["node2"]["session"] == "down", "node2's session to end")
        emit(phase="recovered", results=results, reran=sorted(p.name for p in Path(markers).glob("run-*-node1")))
        sys.stdin.readline()  # node2 is back
        wait_until(lambda: transport.host_states()["node2"]["workers"] == 2, "node2 to rejoin")
        again = Path(markers, "again")
        again.mkdir()
        rejoined = [ex.submit(together, str(again), i, 4) for i in range(4)]
        emit(phase="rejoined", where=sorted(f.result(TIMEOUT) for f in rejoined), hosts=transport.host_states())


def errors(config: dict[str, Any]) -> None:
    """Each way a host can fail to start, one cluster each; then a partial cluster that runs anyway."""
    out: dict[str, Any] = {}
    src, shim = config["src"], config["shim"]
    cases: dict[str, list[str | SSHHost]] = {
        "unreachable": [SSHHost("node1", env={"TEST_HOST": "node1"}), "nodeX"],
        "no_command": [SSHHost("node1", env={"TEST_HOST": "node1"}),
                       SSHHost("node2", remote_command="/nonexistent/bin/remote-executor")],
        "version": [SSHHost("node1", env={"TEST_HOST": "node1"}),
                    SSHHost("node2", env={"PYTHONPATH": f"{shim}{os.pathsep}{src}"})],
    }
    for name, hosts in cases.items():
        out[name] = _start_error(config, hosts)
    out["host_key"] = _start_error(config, ["node3"],
                                   ssh_options=[*config["ssh_options"], "-o", "UserKnownHostsFile=/dev/null"])
    # node2's command is still busy before the worker command when the start times out.
    out["slow"] = _start_error(config, [SSHHost("node1", env={"TEST_HOST": "node1"}),
                                        SSHHost("node2", remote_command=f"sleep 20; {config['remote_command']}")],
                               start_timeout=START_TIMEOUT)
    # node2's workers connect to a port where nothing listens (as through a firewall, or a wrong scheduler_host).
    dead = f"tcp://{config['client_address']}:9"
    redirect = f'shift 2; exec {config["remote_command"]} worker {dead} "$@"'
    out["no_reach"] = _start_error(config, [SSHHost("node1", env={"TEST_HOST": "node1"}),
                                            SSHHost("node2", remote_command=f"sh -c {shlex.quote(redirect)} sh")],
                                   start_timeout=START_TIMEOUT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RemoteExecutor(transport=cluster(config, hosts=cases["unreachable"], allow_partial=True)) as ex:
            transport = ex.transport
            assert isinstance(transport, SSHCluster)
            out["partial"] = {"result": ex.submit(square, 9).result(TIMEOUT), "hosts": transport.host_states(),
                              "warnings": [str(w.message) for w in caught]}
    emit(**out)


START_TIMEOUT = 4.0


def _start_error(config: dict[str, Any], hosts: list[str | SSHHost], **options: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        RemoteExecutor(transport=cluster(config, hosts=hosts, **options)).shutdown()
    except SSHClusterError as exc:
        return {"message": str(exc), "failures": exc.failures, "seconds": time.monotonic() - started}
    return {"message": None}


def use_cluster(config: dict[str, Any]) -> None:
    """A client of the cluster `remote-executor cluster up` started: found through its file."""
    info = running_cluster()
    markers = config["markers"]
    with RemoteExecutor(**info.executor_options()) as ex:
        emit(phase="connected", url=info.url, map=list(ex.map(square, range(10), timeout=TIMEOUT)),
             where=sorted(f.result(TIMEOUT) for f in [ex.submit(together, markers, i, 3) for i in range(3)]))
        running = ex.submit(slow, markers, "slow-started", 3.0)
        wait_for_files(markers, "slow-started", 1)
        emit(phase="running")
        emit(phase="finished", result=running.result(TIMEOUT))


if __name__ == "__main__":
    scenario, config_path = sys.argv[1], sys.argv[2]
    # What the cluster did, on stderr: the tests show it when a scenario fails.
    logging.basicConfig(level=logging.DEBUG if os.environ.get("SSH_TEST_DEBUG") else logging.INFO,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    {"basic": basic, "sigkill": sigkill, "lose_node2": lose_node2, "errors": errors,
     "use_cluster": use_cluster}[scenario](json.loads(Path(config_path).read_text()))
