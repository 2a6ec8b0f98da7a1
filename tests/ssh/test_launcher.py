"""The SSH launcher's parts that need no root: hosts files, the command lines it builds, the worker's stdin
options (real worker processes on loopback), ssh failures on this machine, and ``cluster`` bookkeeping."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor
from remote_executor.cli import main
from remote_executor.conformance import Gate
from remote_executor.conformance.tasks import hold_reporting_sigterm
from remote_executor.errors import TransportError, WorkerLostError
from remote_executor.ssh import (
    SSHCluster,
    SSHClusterError,
    SSHHost,
    SSHJobServer,
    config_dir,
    host_of_worker,
    parse_hosts,
    route_address,
    running_cluster,
    write_private,
)
from remote_executor.transports.tcp.server import TcpServer

from ..conftest import pid_alive, wait_for

SRC = str(Path(__file__).resolve().parents[2] / "src")
# ssh as if the user had no configuration at all, and a host that refuses at once (nothing on port 1).
NO_CONFIG = ["-F", "/dev/null"]
REFUSING = [*NO_CONFIG, "-o", "HostName=127.0.0.1", "-o", "Port=1"]


# --- hosts files -----------------------------------------------------------------------------------------


def test_a_hosts_file_gives_processes_pool_and_per_host_options() -> None:
    hosts = parse_hosts(
        "# the rack\n"
        "node1\n"
        "node2 8            # eight workers\n"
        "user@node3 - gpu command=/opt/venv/bin/remote-executor workdir='/scratch/my jobs' env.OMP_NUM_THREADS=1\n"
        "node1 2 cpu label=node1-cpu\n"
        "\n")
    assert hosts == [
        SSHHost("node1"),
        SSHHost("node2", processes=8),
        SSHHost("user@node3", pool="gpu", remote_command="/opt/venv/bin/remote-executor",
                workdir="/scratch/my jobs", env={"OMP_NUM_THREADS": "1"}),
        SSHHost("node1", processes=2, pool="cpu", label="node1-cpu"),
    ]
    assert [h.name for h in hosts] == ["node1", "node2", "user@node3", "node1-cpu"]


@pytest.mark.parametrize(("line", "error"), [
    ("node1 four", "processes must be a number or -, not 'four'"),
    ("node1 2 gpu extra", "expected `host [processes] [pool]"),
    ("node1 color=blue", "unknown option(s) color"),
    ("node1 2 'gpu pool'", "bad pool name 'gpu pool'"),
    ("node1 0", "processes must be at least 1"),
    ("node1 env.1BAD=x", "not an environment variable name"),
    ("-oProxyCommand=evil", "not a host for ssh"),
    ("node1 'unterminated", "No closing quotation"),
])
def test_a_bad_hosts_line_is_an_error_naming_the_line(line: str, error: str) -> None:
    with pytest.raises(ValueError, match="hosts, line 2: ") as caught:
        parse_hosts(f"node0\n{line}\n")
    assert error in str(caught.value)


def test_hosts_are_checked_when_the_cluster_is_made() -> None:
    with pytest.raises(TypeError, match="list of host names"):
        SSHCluster("node1")
    with pytest.raises(ValueError, match="appears twice"):
        SSHCluster(["node1", "node1"])
    with pytest.raises(ValueError, match="at least one host"):
        SSHCluster([])
    with pytest.raises(ValueError, match="processes must be at least 1"):
        SSHCluster(["node1"], processes=0)
    with pytest.raises(ValueError, match="not an environment variable name"):
        SSHCluster(["node1"], env={"A B": "x"})
    with pytest.raises(TypeError, match="list of arguments"):
        SSHCluster(["node1"], ssh_options="-i key")


# --- the command lines -----------------------------------------------------------------------------------


def test_the_remote_command_quotes_what_it_is_given_and_carries_no_key() -> None:
    cluster = SSHJobServer([SSHHost("node1", 3, env={"B": "it's two words"}, workdir="/tmp/a dir")],
                           env={"A": "1", "B": "overridden"}, remote_command="/opt/venv/bin/remote-executor")
    cluster.url = "tcp://10.0.0.1:5555"
    line = cluster.remote_command_line(cluster.hosts[0])
    assert shlex.split(line) == [
        "cd", "/tmp/a dir", "&&", "env", "A=1", "B=it's two words", "/opt/venv/bin/remote-executor", "worker",
        "tcp://10.0.0.1:5555", "--key-file", "-", "--exit-on-stdin-eof", "--name", "node1",
        "--heartbeat-interval", "1.0", "--heartbeat-timeout", "10.0", "--processes", "3"]
    assert cluster.key not in line.encode()


def test_ssh_runs_in_batch_mode_with_the_users_options_before_ours() -> None:
    cluster = SSHJobServer(["node1"], ssh_options=[*NO_CONFIG, "-i", "/keys/id"])
    argv = cluster.ssh_argv(cluster.hosts[0])
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert argv[3:7] == [*NO_CONFIG, "-i", "/keys/id"]
    assert argv[7:13] == ["-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    assert argv[13:16] == ["-T", "--", "node1"]
    assert not any("StrictHostKeyChecking" in word or "KnownHosts" in word for word in argv)
    assert cluster.key.decode() not in " ".join(argv)


def test_settings_the_users_ssh_configuration_makes_are_left_to_it(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host node1\n    ConnectTimeout 2\n    ServerAliveInterval 30\n")
    cluster = SSHJobServer(["node1", "node2"], ssh_options=["-F", str(config)])
    assert "ConnectTimeout=15" not in cluster.ssh_argv(cluster.hosts[0])
    assert "ServerAliveInterval=5" not in cluster.ssh_argv(cluster.hosts[0])
    assert "ConnectTimeout=15" in cluster.ssh_argv(cluster.hosts[1])


def test_the_default_scheduler_address_is_the_one_that_routes_to_the_host() -> None:
    assert route_address("anything", [*NO_CONFIG, "-o", "HostName=127.0.0.1"]) == "127.0.0.1"
    with pytest.raises(SSHClusterError, match=r"nohost\.invalid: cannot find the local address") as caught:
        route_address("nohost.invalid", NO_CONFIG)
    assert "scheduler_host" in str(caught.value)


@pytest.mark.parametrize(("name", "host"), [("node1-0#3", "node1"), ("gpu-box-12#7", "gpu-box"),
                                            ("odd#1", "odd"), ("user@node3-1#22", "user@node3")])
def test_a_workers_name_tells_its_host(name: str, host: str) -> None:
    assert host_of_worker(name) == host


# --- ssh failing on this machine ---------------------------------------------------------------------------


def test_a_host_ssh_cannot_reach_is_an_error_naming_it() -> None:
    cluster = SSHCluster(["refuser"], scheduler_host="127.0.0.1", ssh_options=REFUSING, start_timeout=30)
    with pytest.raises(SSHClusterError) as caught:
        RemoteExecutor(transport=cluster)
    assert list(caught.value.failures) == ["refuser"]
    assert "refuser: ssh failed: ssh: connect to host 127.0.0.1 port 1: Connection refused" in str(caught.value)
    assert cluster.server is not None and cluster.server.stopping.is_set()  # the job server was stopped too


def test_a_scheduler_address_that_is_not_ours_is_a_clear_error() -> None:
    with pytest.raises(TransportError, match=r"cannot listen on 192\.0\.2\.1"):
        RemoteExecutor(transport=SSHCluster(["refuser"], scheduler_host="192.0.2.1", ssh_options=REFUSING))


# --- the worker command's stdin options, on loopback --------------------------------------------------------


@pytest.fixture
def keyed_server() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1", 0, key=b"k" * 32, heartbeat_interval=0.2, heartbeat_timeout=2.0)
    server.start()
    yield server
    server.stop()


def capacity(server: TcpServer) -> int:
    with server.drive_lock:
        return server.scheduler.capacity


def worker_command(server: TcpServer, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "remote_executor.cli", "worker", server.url, "--key-file", "-",
               "--processes", "2", "--name", "stdin-test", *extra]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})


def attached_worker_command(server: TcpServer, started: list[subprocess.Popen[bytes]],
                            *extra: str) -> subprocess.Popen[bytes]:
    """``worker_command`` given its key on standard input, once both its worker processes have attached."""
    proc = worker_command(server, *extra)
    started.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(b"k" * 32 + b"\n")
    proc.stdin.flush()
    wait_for(lambda: capacity(server) == 2, what="both workers to attach")
    return proc


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_the_key_on_stdin_lets_workers_in_and_the_end_of_stdin_ends_them_all(
        keyed_server: TcpServer, started: list[subprocess.Popen[bytes]]) -> None:
    proc = worker_command(keyed_server, "--exit-on-stdin-eof")
    started.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"k" * 32 + b"\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == f"2 worker process(es) serving {keyed_server.url} (pool default)\n".encode()
    wait_for(lambda: capacity(keyed_server) == 2, what="both workers to attach")
    workers = children_of(proc.pid)
    assert len(workers) == 2
    with keyed_server.drive_lock:
        names = sorted(w["name"].rsplit("#", 1)[0] for w in keyed_server.scheduler.status()["workers"])
    assert names == ["stdin-test-0", "stdin-test-1"]

    proc.stdin.close()  # the SSH session ended
    assert proc.wait(30) == 0
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), what="the worker processes to exit")
    wait_for(lambda: capacity(keyed_server) == 0, what="the server to see them go")


@pytest.mark.parametrize("stuck", ["holding the GIL in C", "stopped"])
def test_the_end_of_stdin_ends_a_worker_process_that_cannot_read_its_lifeline(
        keyed_server: TcpServer, started: list[subprocess.Popen[bytes]], stuck: str) -> None:
    """A worker process in a C call that holds the interpreter lock, or stopped (SIGSTOP), cannot run the
    thread that reads its lifeline. Before, the command exited on the end of its input and left such a process
    running (or stopped) for ever, its parent gone; now the process is killed before the command exits."""
    def hold_the_gil_in_c(address: tuple[str, int]) -> None:
        import ctypes
        import socket

        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(b"stuck\n")
        ctypes.PyDLL(None).sleep(120)  # libc's sleep(), the GIL held: no other thread of this process runs

    proc = attached_worker_command(keyed_server, started, "--exit-on-stdin-eof")
    assert proc.stdin is not None
    workers = children_of(proc.pid)
    with Gate() as gate, RemoteExecutor(transport=keyed_server.url, key=b"k" * 32, max_retries=0) as ex:
        if stuck == "stopped":
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
        else:
            futures = [ex.submit(hold_the_gil_in_c, gate.address) for _ in workers]
            gate.wait_started(len(workers))
        proc.stdin.close()  # the SSH session ended
        assert proc.wait(30) == 0
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), timeout=15,
                 what="the stuck worker processes to be gone")
        if stuck != "stopped":
            for future in futures:
                assert isinstance(future.exception(30), WorkerLostError)


def test_a_drain_does_not_wait_for_ever_on_a_stopped_worker_process(
        keyed_server: TcpServer, started: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM drains: each worker process finishes its call and exits. One stopped (SIGSTOP) never did, and the
    command waited for it for ever; it is continued, and drains like the others."""
    proc = attached_worker_command(keyed_server, started)
    workers = children_of(proc.pid)
    os.kill(workers[0], signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not any(pid_alive(pid) for pid in workers)


def test_a_drain_line_on_stdin_lets_the_running_call_finish(keyed_server: TcpServer,
                                                             started: list[subprocess.Popen[bytes]]) -> None:
    proc = attached_worker_command(keyed_server, started, "--exit-on-stdin-eof")
    assert proc.stdin is not None
    with Gate() as gate, RemoteExecutor(transport=keyed_server.url, key=b"k" * 32) as ex:
        future = ex.submit(hold_reporting_sigterm, gate.address, "call", 42)
        gate.wait_started(1)
        proc.stdin.write(b"drain\n")
        proc.stdin.flush()
        assert gate.wait_started(2)[1] == "call:sigterm"  # the drain reached the worker mid-call
        gate.release()
        assert future.result(30) == 42
    assert proc.wait(30) == 0


def test_without_the_flag_the_end_of_stdin_changes_nothing(keyed_server: TcpServer,
                                                           started: list[subprocess.Popen[bytes]]) -> None:
    proc = worker_command(keyed_server)
    started.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(b"k" * 32 + b"\n")
    proc.stdin.close()
    wait_for(lambda: capacity(keyed_server) == 2, what="both workers to attach")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # still drained the usual way
    assert proc.wait(30) == 0


def test_an_empty_key_on_stdin_is_refused(keyed_server: TcpServer, started: list[subprocess.Popen[bytes]]) -> None:
    proc = worker_command(keyed_server, "--exit-on-stdin-eof")
    started.append(proc)
    _, stderr = proc.communicate(b"\n", timeout=30)
    assert proc.returncode == 1
    assert b"empty" in stderr


# --- where `cluster up` records its cluster ----------------------------------------------------------------


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "remote_executor"


def test_the_config_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_dir() == tmp_path / "remote_executor"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/path")  # not absolute: ignored, as the spec says
    assert config_dir() == Path.home() / ".config" / "remote_executor"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_dir() == Path.home() / ".config" / "remote_executor"


def test_private_files_are_0600_whatever_the_umask(config_home: Path) -> None:
    old = os.umask(0)
    try:
        write_private(config_home / "cluster.key", b"secret\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((config_home / "cluster.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(config_home.stat().st_mode) == 0o700
    assert (config_home / "cluster.key").read_bytes() == b"secret\n"


def run_cli(*argv: str) -> int:
    return main(["cluster", *argv])


def test_status_and_down_without_a_cluster(config_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("status") == 1
    err = capsys.readouterr().err
    assert "no cluster is up" in err and "`remote-executor cluster start` (on this machine)" in err
    for command in ("down", "stop"):  # nothing to stop: done, said as a fact, not as an error line
        assert run_cli(command) == 0
        out, err = capsys.readouterr()
        assert out.startswith("no cluster is up") and err == ""
    config_home.mkdir(parents=True)
    (config_home / "cluster.json").write_text("not json")  # a file that is no cluster's: left, and a failure
    assert run_cli("down") == 1
    assert "is not a cluster file" in capsys.readouterr().err
    assert (config_home / "cluster.json").exists()


def stale_state(config_home: Path) -> dict[str, Any]:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {"url": "tcp://127.0.0.1:1", "key_file": str(config_home / "cluster.key"), "pid": dead.pid,
             "hosts": ["node1"]}
    write_private(config_home / "cluster.json", json.dumps(state).encode())
    write_private(config_home / "cluster.key", b"k\n")
    return state


def test_a_cluster_whose_process_is_gone_is_reported_and_forgotten(config_home: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    state = stale_state(config_home)
    info = running_cluster()
    assert (info.url, info.pid, info.hosts) == (state["url"], state["pid"], ["node1"])
    assert info.executor_options() == {"transport": state["url"], "key_file": state["key_file"]}
    assert run_cli("status") == 1
    assert "is not running" in capsys.readouterr().err
    assert run_cli("down") == 0
    assert not (config_home / "cluster.json").exists()
    assert not (config_home / "cluster.key").exists()


@pytest.mark.parametrize(("argv", "error"), [
    ((), "no hosts: give --hosts"),
    (("--hosts", "node1", "--env", "NOVALUE"), "--env takes NAME=VALUE"),
])
def test_up_refuses_bad_arguments_before_starting_anything(config_home: Path, capsys: pytest.CaptureFixture[str],
                                                           argv: tuple[str, ...], error: str) -> None:
    assert run_cli("run", *argv) == 2  # a mistake in the command line
    assert error in capsys.readouterr().err
    assert not (config_home / "cluster.json").exists()


def test_up_reports_a_bad_hosts_file_with_its_line(config_home: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 2\nnode2 two\n")
    assert run_cli("up", "--hosts-file", str(hosts)) == 1
    assert f"{hosts}, line 2: processes must be a number" in capsys.readouterr().err


def test_up_reports_why_the_cluster_did_not_start(config_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("up", "--hosts", "refuser", "--scheduler-host", "127.0.0.1", "--timeout", "30",
                   *(f"--ssh-option={option}" for option in REFUSING))
    assert code == 1
    err = capsys.readouterr().err
    assert "the cluster did not start" in err
    assert "refuser: ssh failed" in err
    assert not (config_home / "cluster.json").exists()
    assert not (config_home / "cluster.key").exists()


def test_importing_the_package_does_not_import_the_launcher() -> None:
    code = "import sys, remote_executor; assert 'remote_executor.ssh' not in sys.modules; " \
           "assert remote_executor.SSHCluster.__module__ == 'remote_executor.ssh'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=60)


def test_a_lost_session_is_explained_by_its_own_output_not_by_ssh_failing() -> None:
    """A host whose session was up (its workers announced) and ended with ssh's status 255 but no word from
    ssh lost its worker command (killed) or its connection; it said "ssh failed", with the output of every
    earlier session of that host before its own."""
    from remote_executor.ssh import _HostSession

    session = _HostSession(SSHHost("node"), [sys.executable, "-c", "print('2 worker process(es) serving x')"],
                           "remote-executor", [b"key"], restart=False, changed=threading.Event())
    session.tail.append("ssh: connect to host node port 22: Connection refused")  # an earlier session's
    assert session._spawn()
    assert session.proc is not None
    session._read(session.proc)
    session.exit_code = session.proc.wait()
    assert session.proc.stdin is not None
    session.proc.stdin.close()
    assert list(session.tail) == ["2 worker process(es) serving x"]
    session.exit_code = 255
    assert session.describe_exit().startswith("the SSH session ended (status 255: the worker command was killed")
    session.tail.append("ssh: connect to host node port 22: Connection refused")  # ssh's own word: ssh failed
    assert session.describe_exit().startswith("ssh failed: ssh: connect to host node")


def test_the_end_of_stdin_right_after_the_key_ends_the_command_cleanly(
        keyed_server: TcpServer, started: list[subprocess.Popen[bytes]]) -> None:
    """Input that ends while the worker processes are still being started (an SSH session given up at once):
    the command stopped them from its input's thread while the main thread was still starting them, and
    failed on a closed pipe or a thread not yet started."""
    for _ in range(3):
        proc = worker_command(keyed_server, "--exit-on-stdin-eof", "--processes", "12")  # a start that takes a while
        started.append(proc)
        _, stderr = proc.communicate(b"k" * 32 + b"\n", timeout=60)  # the key, then the end of input
        assert proc.returncode == 0, stderr
        assert b"Traceback" not in stderr and b"ERROR" not in stderr, stderr


def test_a_gearman_workers_failed_connection_counts_as_one_for_the_reach_hint() -> None:
    from remote_executor.ssh import _CONNECT_FAILED

    for line in ("worker 12 INFO connecting to tcp://10.0.0.2:9: cannot connect to tcp://10.0.0.2:9: refused",
                 "worker 12 INFO connecting to gearmand 10.0.0.1:4730: [Errno 111] Connection refused"):
        assert _CONNECT_FAILED.search(line), line
    assert not _CONNECT_FAILED.search("worker 12 INFO connecting to tcp://10.0.0.2:9")  # (an attempt, not a failure)
