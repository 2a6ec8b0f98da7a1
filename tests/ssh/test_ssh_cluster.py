"""SSHCluster and `remote-executor cluster` on real hosts: network namespaces, each with a real sshd.

The client runs in a namespace of its own (``ip netns exec``), reaches the hosts only through the lab's
bridge, and uses the system's OpenSSH client with the lab's ssh config (host aliases, known_hosts, key).
After every scenario nothing may be left running on any host or in the client's namespace.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from .netlab import CLIENT_ADDRESS, SRC, NetLab, wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = str(Path(__file__).with_name("client_script.py"))
NODES = ("node1", "node2", "node3")


def config(lab: NetLab, tmp_path: Path, markers: Path, **extra: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"ssh_options": lab.ssh_options, "remote_command": lab.remote_command(),
                                "src": SRC, "hosts": ["node1", "node2"], "markers": str(markers),
                                "client_address": CLIENT_ADDRESS, **extra}))
    return path


class Scenario:
    """The client script running one scenario in the client's namespace; its JSON lines, one at a time."""

    def __init__(self, lab: NetLab, name: str, config_path: Path, tmp_path: Path, env: dict[str, str] | None = None):
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
        self.proc = subprocess.Popen(lab.client_command(*prefix, sys.executable, SCRIPT, name, str(config_path)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)

    def next(self) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        line = stdout.readline()
        assert line, f"the client script ended (status {self.proc.wait()}) without a result:\n{self.log()}"
        result: dict[str, Any] = json.loads(line)
        return result

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        code = self.proc.wait(120)
        self._stderr.close()
        return code

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                stream.close()


@contextmanager
def scenario(lab: NetLab, name: str, config_path: Path, tmp_path: Path,
             env: dict[str, str] | None = None) -> Iterator[Scenario]:
    running = Scenario(lab, name, config_path, tmp_path, env)
    try:
        yield running
    finally:
        running.kill()


def assert_nothing_left(lab: NetLab) -> None:
    lab.wait_empty([lab.client, *(lab.hosts[n].namespace for n in NODES)])


@pytest.mark.parametrize("transport", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq),
                                       pytest.param("gearman", marks=pytest.mark.gearman),
                                       pytest.param("gearman@node3", marks=pytest.mark.gearman)])
def test_a_cluster_on_two_hosts_runs_calls_and_leaves_nothing_behind(lab: NetLab, tmp_path: Path,
                                                                     markers: Path, transport: str) -> None:
    """Two hosts in the default pool and a third in the pool "gpu", over tcp (TLS), zmq (CURVE) or gearman
    (sealed jobs; gearmand here, or started over SSH on node3)."""
    scheme, _, gearmand_host = transport.partition("@")
    settings = config(lab, tmp_path, markers, transport=scheme, gearmand_host=gearmand_host)
    with scenario(lab, "basic", settings, tmp_path) as client:
        result = client.next()
        assert client.finish() == 0, client.log()
    address = lab.hosts[gearmand_host].address if gearmand_host else CLIENT_ADDRESS  # routes to node1
    assert result["url"].startswith(f"{scheme}://{address}:")
    assert result["square"] == 49
    assert result["map"] == [x * x for x in range(20)]
    assert result["error"] == {"type": "CustomError", "code": 7, "message": "(7, 'boom')", "remote_traceback": True}
    assert result["where"] == ["node1", "node1", "node2", "node2"]  # four calls at once: two per host
    assert result["key_on_command_line"] is False
    assert {h: s["workers"] for h, s in result["hosts"].items()} == {"node1": 2, "node2": 2, "node3": 1}
    assert result["plain_refused"] is True  # the key alone does not get a session: the wire is encrypted
    assert result["gpu_where"] == ["node3"]
    # Never node3: it serves the pool "gpu" only (which default-pool worker takes a call is gearmand's choice).
    assert result["default_where"] and set(result["default_where"]) <= {"node1", "node2"}
    assert result["limited"] == 9  # a call with a time limit
    if scheme != "gearman":
        assert result["broadcast"] == ["node1", "node1", "node2", "node2"]  # every default-pool worker, once
    assert_nothing_left(lab)


@pytest.mark.parametrize("fault", ["link_down", "sshd_down"])
def test_a_host_lost_mid_run_has_its_calls_run_elsewhere_and_rejoins(lab: NetLab, tmp_path: Path, markers: Path,
                                                                     fault: str) -> None:
    try:
        with scenario(lab, "lose_node2", config(lab, tmp_path, markers), tmp_path) as client:
            running = client.next()
            assert running["on_node2"], "no call ran on node2 before it went away"
            if fault == "link_down":
                lab.set_link("node2", up=False)
            else:
                lab.stop_sshd("node2")
            client.go()
            recovered = client.next()
            assert recovered["results"] == ["node1"] * 4, client.log()
            rerun = {name.split("-")[1] for name in recovered["reran"]}
            assert {name.split("-")[1] for name in running["on_node2"]} <= rerun  # node2's calls ran on node1
            if fault == "link_down":
                lab.set_link("node2", up=True)
            else:
                lab.start_sshd("node2")
            client.go()
            rejoined = client.next()
            assert client.finish() == 0, client.log()
    finally:
        lab.set_link("node2", up=True)
        if lab.hosts["node2"].sshd is None or lab.hosts["node2"].sshd.poll() is not None:
            lab.start_sshd("node2")
    assert rejoined["where"] == ["node1", "node1", "node2", "node2"]
    assert rejoined["hosts"]["node2"]["sessions"] >= 2
    assert_nothing_left(lab)


def test_a_killed_client_leaves_nothing_running_on_any_host(lab: NetLab, tmp_path: Path, markers: Path) -> None:
    with scenario(lab, "sigkill", config(lab, tmp_path, markers), tmp_path) as client:
        ready = client.next()
        assert ready["running"] == 4
        for node in ("node1", "node2"):
            assert len(lab.workers_in(lab.hosts[node].namespace)) >= 3  # the worker command and two workers
        os.kill(client.proc.pid, signal.SIGKILL)
        client.proc.wait()
    assert_nothing_left(lab)


def test_hosts_that_cannot_run_workers_are_named(lab: NetLab, tmp_path: Path, markers: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    # node2's Python reports another cloudpickle version: the job server's version check refuses it.
    (shim / "sitecustomize.py").write_text("import cloudpickle\ncloudpickle.__version__ = '0.0.0+other'\n")
    with scenario(lab, "errors", config(lab, tmp_path, markers, shim=str(shim)), tmp_path) as client:
        result = client.next()
        assert client.finish() == 0, client.log()

    unreachable = result["unreachable"]
    assert list(unreachable["failures"]) == ["nodeX"]
    assert "nodeX: ssh failed" in unreachable["message"]
    assert "10.214.0.99" in unreachable["message"]

    no_command = result["no_command"]
    assert list(no_command["failures"]) == ["node2"]
    assert "/nonexistent/bin/remote-executor" in no_command["message"]
    assert "not found" in no_command["message"]

    version = result["version"]
    assert list(version["failures"]) == ["node2"]
    assert "version mismatch" in version["message"]
    assert "cloudpickle 0.0.0+other" in version["message"]

    slow = result["slow"]  # given up at its start timeout (4 s), not 10 s later
    assert list(slow["failures"]) == ["node2"]
    assert "did not start within 4s" in slow["message"]
    assert slow["seconds"] < 4 + 5, slow  # (it took 13-15 s: each session was given 10 s more to end)

    no_reach = result["no_reach"]  # the question to ask, not "did not start"
    assert list(no_reach["failures"]) == ["node2"]
    assert "could not connect within 4s; can the host reach tcp://" in no_reach["message"]

    host_key = result["host_key"]  # an unknown host key is refused, never accepted silently
    assert list(host_key["failures"]) == ["node3"]
    assert "Host key verification failed" in host_key["message"]

    partial = result["partial"]
    assert partial["result"] == 81
    assert partial["hosts"]["node1"]["workers"] == 2
    assert partial["hosts"]["nodeX"]["session"] == "failed"
    assert any("nodeX" in w for w in partial["warnings"]), partial["warnings"]
    assert_nothing_left(lab)


def test_cluster_up_status_down_from_the_command_line(lab: NetLab, tmp_path: Path, markers: Path) -> None:
    home = tmp_path / "config-home"
    env = {"XDG_CONFIG_HOME": str(home)}
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("# the lab\n"
                          "node1 2 label=alpha env.TEST_HOST=node1\n"
                          "node2 1 env.TEST_HOST=node2   # one worker here\n")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        command = lab.client_command("env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m",
                                     "remote_executor.cli", "cluster", *argv)
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    launch = ["--hosts-file", str(hosts_file), f"--ssh-option=-F {lab.ssh_config}",
              "--remote-command", lab.remote_command(), "--env", f"PYTHONPATH={SRC}",
              "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]
    try:
        up = cli("up", *launch)
        assert up.returncode == 0, up.stderr
        directory = home / "remote_executor"
        state = json.loads((directory / "cluster.json").read_text())
        assert state["url"].startswith(f"tcp://{CLIENT_ADDRESS}:")
        assert state["url"] in up.stdout
        assert Path(state["key_file"]) == directory / "cluster.key"
        for path in (directory / "cluster.json", directory / "cluster.key"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700

        again = cli("up", *launch)
        assert again.returncode == 1
        assert "already up" in again.stderr

        status = cli("status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["workers"] == {"alpha": 2, "node2": 1}

        with scenario(lab, "use_cluster", config(lab, tmp_path, markers), tmp_path, env) as client:
            connected = client.next()
            assert connected["url"] == state["url"]
            assert connected["map"] == [x * x for x in range(10)]
            assert connected["where"] == ["node1", "node1", "node2"]
            assert client.next()["phase"] == "running"
            down = cli("down")  # drains: the running call finishes and its result arrives
            assert down.returncode == 0, down.stderr
            finished = client.next()
            assert finished["phase"] == "finished"
            assert finished["result"] in ("node1", "node2")
            assert client.finish() == 0, client.log()
        assert not (directory / "cluster.json").exists()
        assert not (directory / "cluster.key").exists()
        status = cli("status")
        assert status.returncode == 1
        assert "no cluster is up" in status.stderr
    finally:
        cli("down")
    assert_nothing_left(lab)


def test_stopping_the_job_server_takes_the_cluster_down(lab: NetLab, tmp_path: Path) -> None:
    # `remote-executor stop URL` with the cluster's key, from any machine: the `cluster up` process notices
    # that its job server is gone, ends its hosts' sessions (and with them the workers) and forgets the cluster.
    from tests.conftest import pid_alive, wait_for

    home = tmp_path / "config-home"

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        command = lab.client_command("env", f"XDG_CONFIG_HOME={home}", sys.executable, "-m",
                                     "remote_executor.cli", *argv)
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    try:
        up = cli("cluster", "up", "--hosts", "node1", "--processes", "1", f"--ssh-option=-F {lab.ssh_config}",
                 "--remote-command", lab.remote_command(), "--env", f"PYTHONPATH={SRC}",
                 "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3")
        assert up.returncode == 0, up.stderr
        record = home / "remote_executor" / "cluster.json"
        state = json.loads(record.read_text())
        verify = [f"--{name.replace('_', '-')}={value}" for name, value in state["options"].items()]  # its TLS
        stopped = cli("stop", state["url"], "--key-file", state["key_file"], *verify)
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: not pid_alive(state["pid"]) and not record.exists(), timeout=60,
                 what="the cluster to go down with its job server")
    finally:
        cli("cluster", "down")
    assert_nothing_left(lab)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cluster_up_interrupted_while_starting_leaves_no_cluster_to_come_up_later(lab: NetLab, tmp_path: Path,
                                                                                signum: int) -> None:
    """Ctrl-C (or SIGTERM) on `cluster up` while its hosts are still starting. Before, `up` exited at once and
    silently, and its background process went on: the cluster came up unseen, seconds later, and took over the
    record of whatever cluster had been started meanwhile."""
    home = tmp_path / "config-home"
    command = lab.client_command(
        "env", f"XDG_CONFIG_HOME={home}", sys.executable, "-m", "remote_executor.cli", "cluster", "up",
        "--hosts", "node1", "--processes", "1", f"--ssh-option=-F {lab.ssh_config}",
        "--remote-command", f"sleep 5; {lab.remote_command()}",  # a host slow to start its workers
        "--env", f"PYTHONPATH={SRC}", "--timeout", "60")
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        node1 = lab.hosts["node1"].namespace
        wait_until(lambda: any("sleep 5" in line for line in lab.leftovers(node1).values()), 30,
                   "the host to start its command")
        up.send_signal(signum)
        _, stderr = up.communicate(timeout=60)
        assert up.returncode == 128 + signum if signum != signal.SIGINT else up.returncode == 130, stderr
        assert "interrupted; stopping the cluster that was starting" in stderr
        assert_nothing_left(lab)  # (the host's command ends within its sleep: its session is gone)
        assert not (home / "remote_executor" / "cluster.json").exists()
        assert not (home / "remote_executor" / "cluster.key").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        subprocess.run(lab.client_command("env", f"XDG_CONFIG_HOME={home}", sys.executable, "-m",
                                          "remote_executor.cli", "cluster", "down"), capture_output=True, timeout=300)
