"""Keys by default, handled like secrets: the per-user key file, keyless only by opt-in, key files that
others can read refused, and no key in the environment of the code a worker runs.

Everything runs for real: the ``remote-executor`` command in subprocesses, our job servers and gearmand on
127.0.0.1, and another local user (uid 65534) as a real process, which needs root (as in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import AuthenticationError, ConnectionFailedError, TransportError
from remote_executor.security import (
    KEY_ENV,
    KEY_FILE_ENV,
    SECRET_ENVS,
    _create_key_file,
    check_bind,
    read_key_file,
    resolve_key,
    server_key,
    user_key,
    user_key_path,
)
from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import Options, WorkerCore, WorkerSettings
from remote_executor.transports.gearman.client import GearmanClientTransport
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.worker import GearmanWorker
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer

from ..conftest import FAST_HEARTBEAT

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

CLI = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
NOBODY = 65534


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh per-user key file location (in a directory that does not exist yet); no key elsewhere."""
    path = tmp_path / "config" / "remote_executor" / "key"
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    monkeypatch.delenv(KEY_ENV, raising=False)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def cli(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``remote-executor`` command running in the background, stopped (SIGTERM, then SIGKILL) at exit."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def serving_url(proc: subprocess.Popen[str]) -> str:
    """The URL a ``remote-executor server`` prints once it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving "), f"the server did not start: {line!r} {proc.stderr and proc.stderr.read()}"
    return line.split()[1]


@contextlib.contextmanager
def cluster(scheme: str, *server_args: str) -> Iterator[str]:
    """``remote-executor server`` for tcp and zmq, a gearmand for gearman; yields the URL."""
    if scheme == "gearman":
        with GearmandProcess() as gearmand:
            yield gearmand.url
        return
    with cli("server", f"{scheme}://127.0.0.1:{free_port()}", *server_args, *FAST_HEARTBEAT) as server:
        yield serving_url(server)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released), for a server that needs a fixed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the per-user key file ---------------------------------------------------------------------------------


def test_the_per_user_key_file_is_created_private_and_then_reused(key_file: Path) -> None:
    key = user_key()
    assert key_file.exists() and mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    assert len(key) == 64 and bytes.fromhex(key.decode())  # 32 random bytes, hex
    assert user_key() == key == resolve_key()
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["key"]  # no temporary file left behind


def test_the_per_user_key_file_lives_under_xdg_config_home_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_key_path() == tmp_path / "xdg" / "remote_executor" / "key"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_key_path() == tmp_path / "home" / ".config" / "remote_executor" / "key"
    user_key()
    assert mode(tmp_path / "home" / ".config" / "remote_executor") == 0o700


RACER = ("import sys; from remote_executor.security import user_key; print('ready', flush=True); sys.stdin.read(1); "
         "print(user_key().decode())")


def test_processes_creating_the_key_at_once_agree_on_one_key(key_file: Path) -> None:
    for _ in range(3):
        with contextlib.suppress(FileNotFoundError):
            key_file.unlink()
        racers = [subprocess.Popen([sys.executable, "-c", RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True) for _ in range(8)]
        for racer in racers:
            assert racer.stdin is not None and racer.stdout is not None
            assert racer.stdout.readline() == "ready\n"
        for racer in racers:  # each is past its imports, blocked reading its stdin: release them all at once
            assert racer.stdin is not None
            racer.stdin.write("go")
            racer.stdin.close()
        keys = set()
        for racer in racers:
            assert racer.stdout is not None
            keys.add(racer.stdout.read().strip())
            racer.stdout.close()
            assert racer.wait(timeout=60) == 0
        assert keys == {key_file.read_text().strip()}
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["key"]


def test_a_creator_that_comes_second_keeps_the_first_key(key_file: Path) -> None:
    first = user_key()
    _create_key_file(key_file)  # what a process that lost the race does: it must not replace the key
    assert user_key() == first


@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_server_cli_worker_and_client_of_one_user_share_the_key_with_none_given(key_file: Path, scheme: str) -> None:
    with cluster(scheme) as url, cli("worker", url, "--processes", "1", *FAST_HEARTBEAT):
        with RemoteExecutor(transport=url, **FAST) as ex:
            assert ex.submit(pow, 3, 4).result(timeout=60) == 81
        assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
        if scheme != "gearman":
            status = subprocess.run([*CLI, "status", url], capture_output=True, text=True, timeout=60)
            assert status.returncode == 0 and '"workers"' in status.stdout, status.stderr
        # The key is really in use: a client without it is refused.
        with pytest.raises((AuthenticationError, ConnectionFailedError, BrokenExecutor)):  # noqa: PT012
            keyless = RemoteExecutor(transport=url, insecure=True, connect_timeout=5, **FAST)
            try:
                keyless.submit(pow, 3, 4).result(timeout=60)
            finally:
                keyless.shutdown()


def test_the_embedded_clusters_keep_their_own_secret(key_file: Path) -> None:
    for transport in ("tcp", "gearman"):
        with RemoteExecutor(max_workers=1, transport=transport) as ex:
            assert ex.submit(pow, 2, 5).result(timeout=60) == 32
    assert not key_file.exists()


# --- keyless only by opt-in -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_insecure_opts_in_to_running_without_a_key(key_file: Path, scheme: str) -> None:
    with cluster(scheme, "--insecure") as url, cli("worker", url, "--insecure", "--processes", "1", *FAST_HEARTBEAT):
        with RemoteExecutor(transport=url, insecure=True, **FAST) as ex:
            assert ex.submit(pow, 2, 9).result(timeout=60) == 512
        if scheme != "gearman":
            ping = subprocess.run([*CLI, "ping", url, "--insecure"], capture_output=True, text=True, timeout=60)
            assert ping.returncode == 0 and "answered in" in ping.stdout, ping.stderr
        assert not key_file.exists()  # nobody used the per-user key
        if scheme != "gearman":
            no_opt_in = subprocess.run([*CLI, "ping", url, "--timeout", "3"], capture_output=True, text=True,
                                       timeout=60)
            assert no_opt_in.returncode == 1 and "key" in no_opt_in.stderr  # it brought the per-user key


def test_a_keyless_server_refuses_a_non_loopback_address_the_rule_stays(key_file: Path) -> None:
    with pytest.raises(TransportError, match="without a key"):
        check_bind("0.0.0.0", None, insecure=False)
    check_bind("0.0.0.0", b"k", insecure=False)
    check_bind("0.0.0.0", None, insecure=True)
    assert server_key("127.0.0.1", None, insecure=True) is None  # keyless: only by opt-in
    assert server_key("0.0.0.0", None, insecure=False) == user_key()  # not keyless: the per-user key
    assert server_key("0.0.0.0", b"given", insecure=False) == b"given"


@pytest.mark.parametrize("role", ["client", "worker"])
def test_a_keyless_gearman_client_or_worker_refuses_a_non_loopback_gearmand(role: str) -> None:
    url = "gearman://192.0.2.1:4730"  # TEST-NET-1: never contacted, the refusal comes first

    def make(insecure: bool) -> object:
        if role == "client":
            return GearmanClientTransport(url, Options(insecure=insecure))
        return GearmanWorker(WorkerSettings(url=url, insecure=insecure), WorkerCore())

    with pytest.raises(TransportError, match="without a key"):
        make(insecure=False)
    make(insecure=True)  # accepted (a warning is logged)
    assert isinstance(GearmanClientTransport("gearman://127.0.0.1:4730", Options()), GearmanClientTransport)


# --- key files are secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660], ids=lambda bits: f"{bits:04o}")
def test_a_key_file_others_may_read_or_write_is_refused_with_the_chmod_hint(
    tmp_path: Path, key_file: Path, bits: int
) -> None:
    given = tmp_path / "cluster key"
    given.write_text("s3cret\n")
    given.chmod(bits)
    hint = f"chmod 600 '{given}'"
    with pytest.raises(PermissionError, match="accessible by others") as info:
        resolve_key(key_file=given)
    assert hint in str(info.value)
    with pytest.raises(PermissionError, match="chmod 600"):
        RemoteExecutor(transport="memory", key_file=given)
    result = subprocess.run([*CLI, "status", "tcp://127.0.0.1:9", "--key-file", str(given)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and hint in result.stderr
    user_key()
    key_file.chmod(bits)  # the per-user file alike
    with pytest.raises(PermissionError, match="chmod 600"):
        RemoteExecutor(transport="tcp://127.0.0.1:9")
    given.chmod(0o600)
    assert resolve_key(key_file=given) == b"s3cret"
    given.chmod(0o400)
    assert resolve_key(key_file=given) == b"s3cret"


def test_an_empty_key_file_is_still_an_error_and_a_huge_one_is_not_read_whole(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        read_key_file(empty)
    with pytest.raises(ValueError, match="larger than"):
        read_key_file("/dev/zero")


def test_a_directory_given_as_the_key_file_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=f"a key file is expected, not a directory: '{tmp_path}'"):
        read_key_file(tmp_path)


def need_root() -> None:
    """Tests that act as another user run as root (CI does); elsewhere they skip, and in CI never."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail("this test must run as root in CI: it runs a process as another user")
    pytest.skip("needs root: it runs a process as another user")


def test_a_per_user_key_file_owned_by_another_user_is_refused(key_file: Path) -> None:
    need_root()
    user_key()
    os.chown(key_file, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        user_key()


# --- another local user -----------------------------------------------------------------------------------------


ATTACKER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from remote_executor import RemoteExecutor

    url, theirs = sys.argv[1], sys.argv[2]
    options = dict(heartbeat_interval=0.2, heartbeat_timeout=2.0, connect_timeout=5.0, reconnect_timeout=2.0)

    def attempt(**kwargs):
        try:
            with RemoteExecutor(transport=url, **options, **kwargs) as ex:
                return f"ran: uid {ex.submit(os.getuid).result(timeout=60)}"
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"

    out = {}
    try:
        open(theirs, "rb").read()
        out["read the key file"] = "read it"
    except OSError as exc:
        out["read the key file"] = f"{type(exc).__name__}: {exc}"
    out["client with their key file"] = attempt(key_file=theirs)
    out["client with its own key"] = attempt()
    out["client without a key"] = attempt(insecure=True)
    if not url.startswith("gearman"):
        for name, extra in (("worker with its own key", []), ("worker without a key", ["--insecure"])):
            proc = subprocess.run([sys.executable, "-m", "remote_executor.worker", url, "--reconnect-timeout", "3",
                                   *extra], capture_output=True, text=True, timeout=120)
            out[name] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    print(json.dumps(out))
    """
)


@contextlib.contextmanager
def world_traversable_dir(owner: int | None = None) -> Iterator[Path]:
    """A directory others may enter (so only a file's own mode protects it), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="remote-executor-test-"))
    path.chmod(0o711)
    if owner is not None:
        os.chown(path, owner, owner)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def server_of_this_user(scheme: str) -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """A server with the per-user key and one worker process; yields its URL and who is attached."""
    if scheme == "gearman":
        with GearmandProcess() as gearmand:
            workers = Supervisor(gearmand.url, 1, name="rightful")
            workers.start()
            try:
                yield gearmand.url, lambda: ["rightful"]
            finally:
                workers.stop()
        return
    server = (TcpServer if scheme == "tcp" else ZmqServer)("127.0.0.1", 0, **FAST)
    server.start()
    workers = Supervisor(server.url, 1, worker_args=FAST_HEARTBEAT, name="rightful")
    workers.start()
    try:
        yield server.url, lambda: [w["name"] for w in server.scheduler.status()["workers"]]
    finally:
        workers.stop()
        server.stop()


def run_as_nobody(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` as uid/gid 65534 with no supplementary groups, importing this package and its
    dependencies. This interpreter may live where that user cannot reach (pyenv under a 0700 /root): then a
    system interpreter of the same version (the handshake checks major.minor) runs them from here."""
    import site

    import remote_executor

    path = [str(Path(remote_executor.__file__).parent.parent), *site.getsitepackages()]
    env = {**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(path)}
    version = "python{}.{}".format(*sys.version_info[:2])
    system = (shutil.which(version, path=directory) for directory in ("/usr/bin", "/usr/local/bin"))
    candidates = [sys.executable, *filter(None, system)]
    for python in dict.fromkeys(candidates):
        try:
            return subprocess.run([python, *args], user=NOBODY, group=NOBODY, extra_groups=[], env=env, cwd="/",
                                  capture_output=True, text=True, timeout=timeout)
        except PermissionError:
            continue
    pytest.fail(f"no {version} interpreter that uid {NOBODY} may run: tried {candidates}")


# Slow, so on the main Python only: another uid must run an interpreter of this very version, and only the
# system's Python (Debian's python3.11 in CI) is one it can reach; pyenv's live under a 0700 /root.
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_another_local_user_cannot_get_a_call_run_while_this_user_is_served(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    need_root()
    monkeypatch.delenv(KEY_ENV, raising=False)
    with world_traversable_dir() as mine, world_traversable_dir(owner=NOBODY) as theirs:
        key_path = mine / "key"
        monkeypatch.setenv(KEY_FILE_ENV, str(key_path))
        with server_of_this_user(scheme) as (url, attached), RemoteExecutor(transport=url, **FAST) as ex:
            assert ex.submit(os.getuid).result(timeout=60) == os.getuid()  # the key file exists now
            served: list[object] = []
            stop = threading.Event()

            def rightful_client() -> None:
                while not stop.is_set():
                    try:
                        served.append(ex.submit(os.getuid).result(timeout=60))
                    except Exception as exc:
                        served.append(exc)

            client = threading.Thread(target=rightful_client)
            client.start()
            try:
                attack = run_as_nobody(["-c", ATTACKER, url, str(key_path)],
                                       {"HOME": "/nonexistent", KEY_FILE_ENV: str(theirs / "key")}, timeout=300)
            finally:
                stop.set()
                client.join(90)
            assert attack.returncode == 0, attack.stderr
            outcomes = json.loads(attack.stdout)
            names = attached()
            assert len(names) == 1 and names[0].startswith("rightful"), names  # no rogue worker joined
        assert served and all(uid == os.getuid() for uid in served), [s for s in served if s != os.getuid()][:3]
    assert not any(outcome.startswith("ran") for outcome in outcomes.values()), outcomes
    assert outcomes["read the key file"].startswith("PermissionError")
    assert outcomes["client with their key file"].startswith("PermissionError")
    for name in ("client with its own key", "client without a key"):  # an error that names the cause
        assert "key" in outcomes[name] or "HMAC" in outcomes[name], (name, outcomes[name])
    for name in ("worker with its own key", "worker without a key"):
        if scheme != "gearman":
            assert not outcomes[name].startswith("exit 0"), (name, outcomes[name])


# --- no key in the environment of user code ------------------------------------------------------------------


def snapshot_secrets() -> None:
    """The initializer: what it saw, kept for the calls to report."""
    sys._secrets_at_init = {name: os.environ.get(name) for name in SECRET_ENVS}  # type: ignore[attr-defined]


def secrets_seen() -> dict[str, Any]:
    """What user code on the worker can see: os.environ in the initializer and the call, and the
    environment of a process the call starts."""
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    return {
        "init": getattr(sys, "_secrets_at_init", "the initializer did not run"),
        "call": {name: os.environ.get(name) for name in SECRET_ENVS},
        "child": [name for name in SECRET_ENVS if f"{name}=" in child],
    }


NOTHING = {"init": dict.fromkeys(SECRET_ENVS), "call": dict.fromkeys(SECRET_ENVS), "child": []}


@pytest.mark.parametrize("transport", ["tcp", "zmq", "gearman"])
def test_embedded_workers_do_not_show_the_key_or_token_to_user_code(transport: str) -> None:
    with RemoteExecutor(max_workers=1, transport=transport, initializer=snapshot_secrets) as ex:
        assert ex.submit(secrets_seen).result(timeout=60) == NOTHING


@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_cli_workers_do_not_show_the_key_to_user_code(key_file: Path, scheme: str) -> None:
    with (cluster(scheme) as url, cli("worker", url, "--processes", "1", *FAST_HEARTBEAT),
          RemoteExecutor(transport=url, initializer=snapshot_secrets, **FAST) as ex):
        assert ex.submit(secrets_seen).result(timeout=60) == NOTHING


def test_a_key_from_the_environment_is_not_shown_to_user_code_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "a key in the environment")
    server = TcpServer("127.0.0.1", 0, **FAST)
    server.start()
    workers = Supervisor(server.url, 1, worker_args=FAST_HEARTBEAT)  # they inherit $REMOTE_EXECUTOR_KEY
    workers.start()
    try:
        with RemoteExecutor(transport=server.url, initializer=snapshot_secrets, **FAST) as ex:
            assert ex.submit(secrets_seen).result(timeout=60) == NOTHING
    finally:
        workers.stop()
        server.stop()
