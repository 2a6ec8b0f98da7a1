"""Private temporary directories that a killed process does not leave behind.

A private gearmand's log, an SSH cluster's certificates, a supervisor's start records: each lives in a
directory of mode 0700 under ``$TMPDIR``, named ``remote-executor-KIND-PID-RANDOM``, that its owner removes
when it is done with it. An owner killed with SIGKILL (or by the out-of-memory killer) never gets to, so
making a directory first removes the ones of the same kind that this user's dead processes left.

"Dead" is decided twice, so that a live directory is never taken (one is locked before it gets its name):

- the pid in its name no longer runs, and
- nobody holds the lock (``flock``) its owner takes on it for as long as the directory is in use. The
  kernel drops that lock when the owner's last descriptor closes, whatever killed it; and it protects a
  directory whose owner runs in another pid namespace sharing ``$TMPDIR`` (a container), where the pid
  alone says nothing.

Not :mod:`tempfile` and :mod:`shutil`: 20 ms of imports before the first worker starts.
"""

from __future__ import annotations

import contextlib
import logging
import os

try:
    import fcntl
except ImportError:  # not POSIX: the pid alone decides
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PREFIX = "remote-executor-"


class PrivateDir:
    """A directory made by :func:`make`, locked while this object is open; :meth:`remove` deletes it."""

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    def remove(self) -> None:
        """Delete the directory and everything in it, then release the lock. Idempotent."""
        if self._lock_fd < 0:
            return
        _remove_tree(self.path)
        fd, self._lock_fd = self._lock_fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)

    def __repr__(self) -> str:
        return f"<PrivateDir {self.path}{'' if self._lock_fd >= 0 else ' removed'}>"


def base() -> str:
    """Where the directories go: ``$TMPDIR``, else ``/tmp``; absolute, since a call may ``chdir``."""
    return os.path.abspath(os.environ.get("TMPDIR") or "/tmp")


def make(kind: str) -> PrivateDir:
    """A new private directory for ``kind`` (after removing the abandoned ones of that kind); ``OSError`` if
    it cannot be made."""
    where = base()
    sweep(where, kind)
    name = f"{PREFIX}{kind}-{os.getpid()}-{os.urandom(8).hex()}"
    # Made and locked under a name no sweep looks at, then renamed: a sweeper (in another pid namespace,
    # where our pid means nothing) never sees it unlocked.
    making, path = os.path.join(where, f".{name}"), os.path.join(where, name)
    os.mkdir(making, 0o700)
    try:
        fd = os.open(making, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by an exec'd program (PEP 446)
    except OSError:
        _remove_tree(making)
        raise
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # shared: a sweeper asks for exclusive, which any holder refuses
        os.rename(making, path)
    except OSError:
        os.close(fd)
        _remove_tree(making)
        raise
    return PrivateDir(path, fd)


def sweep(where: str, kind: str) -> None:
    """Remove ``kind``'s directories under ``where`` that belong to this user and whose owner is gone."""
    prefix = f"{PREFIX}{kind}-"
    with contextlib.suppress(OSError), os.scandir(where) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].partition("-")[0]
            with contextlib.suppress(OSError, ValueError):
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid() \
                        and not _running(int(pid)):
                    _remove_abandoned(entry.path)


def _remove_abandoned(path: str) -> None:
    """Remove ``path`` if no live process holds its lock (checked while holding it ourselves, so an owner
    cannot appear in between: none would lock a directory it did not just make)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # in use, by a process this pid namespace does not show
        log.debug("removing %s, left by a process that no longer runs", path)
        _remove_tree(path)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has that pid now
        return True
    return True


def _remove_tree(path: str) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` without the import; symbolic links are removed, not
    followed."""
    with contextlib.suppress(OSError):
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(entry.path)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        os.rmdir(path)
