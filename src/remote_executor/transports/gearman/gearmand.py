"""Start and stop a private gearmand (the Gearman job server) on a loopback port.

Used by tests and by the embedded local cluster. gearmand runs in the foreground as our direct child,
with its log, pid file and stdout/stderr in a temporary directory of its own, and (on Linux) is
killed by the kernel if the thread that started it dies, so a crashed parent leaves no orphan.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from ... import deathsig, privatedirs
from .codec import GearmanError

__all__ = ["GearmandError", "GearmandNotFoundError", "GearmandProcess", "find_gearmand"]

INSTALL_HINT: Final = (
    "install it with `apt-get install -y --no-install-recommends gearman-job-server` on Debian/Ubuntu "
    "(without the flag apt also installs and starts memcached), or put a gearmand binary on PATH"
)
# Debian installs gearmand in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")
_POLL_INTERVAL: Final = 0.005
_PORT_ATTEMPTS: Final = 3  # a port we picked can be taken by someone else before gearmand binds it


class GearmandError(GearmanError):
    """gearmand could not be started or stopped; the message carries the tail of its log."""


class GearmandNotFoundError(GearmandError, FileNotFoundError):
    """No gearmand binary was found; the message says how to install one."""


def find_gearmand() -> str:
    """Return the path of the gearmand binary, searching PATH then the sbin directories."""
    path = os.environ.get("PATH", os.defpath)
    found = shutil.which("gearmand", path=os.pathsep.join([path, *SBIN_DIRS]))
    if found is None:
        raise GearmandNotFoundError(f"gearmand was not found on PATH or in {', '.join(SBIN_DIRS)}: {INSTALL_HINT}")
    return found


def _free_loopback_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class GearmandProcess:
    """A private gearmand on ``host``:``port`` (a free port unless given); a context manager.

    Caveat of PR_SET_PDEATHSIG: the kernel kills gearmand when the *thread* that started it exits, so
    call :meth:`start` (and :meth:`restart`) from a thread that lives as long as gearmand should.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        threads: int = 4,
        job_retries: int | None = None,
        worker_wakeup: int | None = None,
        extra_args: Sequence[str] = (),
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else 0
        self._threads = threads
        self._job_retries = job_retries
        self._worker_wakeup = worker_wakeup
        self._extra_args = tuple(extra_args)
        self._executable = executable
        self._startup_timeout = startup_timeout
        self._dir: Path | None = None
        self._private: privatedirs.PrivateDir | None = None  # where _dir is (its log, its pid file)
        self._proc: subprocess.Popen[bytes] | None = None
        self._port_taken = False  # why the last launch failed, to retry on another free port

    # ---------------------------------------------------------------------------------- public API

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"gearman://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "gearmand.log" if self._dir is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """gearmand's exit status once it has exited by itself (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def start(self, on_launch: Callable[[str], None] | None = None) -> GearmandProcess:
        """Start gearmand and return once it accepts connections; raise :class:`GearmandError` if not.

        ``on_launch(url)`` is called as soon as gearmand has been launched on a port, before it accepts
        connections (again with the new URL if that port turns out to be taken), so that whatever will
        connect to it can start meanwhile."""
        if self.is_running():
            raise GearmandError(f"gearmand is already running on {self.url}")
        executable = self._executable or find_gearmand()
        if self._dir is None:
            self._private = privatedirs.make("gearmand")
            self._dir = Path(self._private.path)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if not self._fixed_port:
                self.port = _free_loopback_port(self.host)
            try:
                self._launch(executable, on_launch)
                return self
            except GearmandError:
                self.stop(cleanup=False)  # one that lost its port would retry bind() for ever
                if self._fixed_port or attempt == _PORT_ATTEMPTS or not self._port_taken:
                    self.stop()  # the log tail is in the error already
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0, *, cleanup: bool = True) -> None:
        """SIGTERM gearmand, SIGKILL it after ``timeout`` seconds; idempotent. Removes the temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, timeout)
        if cleanup and self._private is not None:
            self._private.remove()
            self._private = self._dir = None

    def restart(self, timeout: float = 5.0) -> None:
        """Stop gearmand and start a fresh one on the same port (its queue is lost: memory backend)."""
        self.stop(timeout, cleanup=False)
        fixed, self._fixed_port = self._fixed_port, True
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of gearmand's log and stderr, for error messages."""
        if self._dir is None:
            return ""
        parts = []
        for name in ("gearmand.log", "stderr.log"):
            with contextlib.suppress(OSError):
                text = (self._dir / name).read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def __enter__(self) -> GearmandProcess:
        return self if self.is_running() else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<GearmandProcess {self.url} {state}>"

    # ---------------------------------------------------------------------------------- internals

    def _command(self, executable: str) -> list[str]:
        assert self._dir is not None
        cmd = [
            executable,
            f"--listen={self.host}",
            f"--port={self.port}",
            f"--threads={self._threads}",
            f"--log-file={self._dir / 'gearmand.log'}",
            f"--pid-file={self._dir / 'gearmand.pid'}",
        ]
        if self._job_retries is not None:
            cmd.append(f"--job-retries={self._job_retries}")
        if self._worker_wakeup is not None:
            cmd.append(f"--worker-wakeup={self._worker_wakeup}")
        return [*cmd, *self._extra_args]

    def _launch(self, executable: str, on_launch: Callable[[str], None] | None = None) -> None:
        assert self._dir is not None
        self._port_taken = False
        with open(self._dir / "stderr.log", "ab") as err:
            try:
                self._proc = subprocess.Popen(
                    self._command(executable),
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    preexec_fn=deathsig.prepare(),
                    cwd=self._dir,
                )
            except OSError as exc:
                raise GearmandError(f"cannot run {executable}: {exc}") from exc
        if on_launch is not None:
            on_launch(self.url)
        self._wait_until_accepting(self._proc)

    def _wait_until_accepting(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GearmandError(
                    f"gearmand exited with status {proc.returncode} while starting on {self.url}\n" + self.log_tail()
                )
            owner = _listener_pid(self.address)
            if owner == proc.pid:
                return
            if owner is not None:
                # gearmand does not exit when its port is taken: it keeps retrying bind() quietly.
                self._port_taken = True
                raise GearmandError(f"port {self.port} of {self.host} is already in use (by pid {owner})")
            time.sleep(_POLL_INTERVAL)  # nothing to wait on: gearmand does not signal readiness
        raise GearmandError(
            f"gearmand did not accept connections on {self.url} within {self._startup_timeout} s\n" + self.log_tail()
        )


def _listener_pid(address: tuple[str, int]) -> int | None:
    """The pid of whatever listens on ``address`` per admin ``getpid``: None if nothing, -1 if unknown.

    Connecting alone is not proof that *our* gearmand is up: the port may belong to someone else.
    """
    try:
        with socket.create_connection(address, timeout=1.0) as sock:
            sock.sendall(b"getpid\n")
            reply = sock.recv(64)
    except ConnectionRefusedError:
        return None
    except OSError:
        return -1
    fields = reply.split()
    return int(fields[1]) if len(fields) == 2 and fields[0] == b"OK" and fields[1].isdigit() else -1


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
