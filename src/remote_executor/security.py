"""Where keys come from, how key files are kept, and which addresses may be used without a key.

One rule (:func:`normalize_key`: surrounding whitespace is never part of a key) holds for every key, however
it enters, and one resolver (:func:`resolve_key`) serves the Python API, the command line and the worker
process. When no key is given anywhere, servers, workers and clients of one user share an automatically
generated key in a file only that user can read (:func:`user_key`, as Jupyter's connection files do), so
another local user can neither attach to a cluster nor feed it pickles. Running without a key takes an
explicit ``insecure``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
import stat
from typing import TYPE_CHECKING, TypeAlias, overload

from .errors import TransportError

if TYPE_CHECKING:  # pathlib and ipaddress: imported where used, not by every executor's start-up (5 ms)
    from pathlib import Path

KEY_ENV = "REMOTE_EXECUTOR_KEY"
KEY_HEX_ENV = "REMOTE_EXECUTOR_KEY_HEX"  # how a parent hands an arbitrary-bytes key to its workers
KEY_FILE_ENV = "REMOTE_EXECUTOR_KEY_FILE"  # where the per-user key lives (default: under $XDG_CONFIG_HOME)
SECRET_ENVS = (KEY_ENV, KEY_HEX_ENV)  # removed from a worker's environment once read

USER_KEY_BYTES = 32
GENERATED_KEY_BYTES = 32  # 256 bits of entropy, hex-encoded (64 characters) by :func:`generate_key`
MAX_KEY_FILE = 1 << 16  # a key file is a few bytes; /dev/zero or a log file by mistake is not read whole


KeyLike: TypeAlias = bytes | bytearray | memoryview | str


@overload
def normalize_key(key: None, *, source: str = ...) -> None: ...
@overload
def normalize_key(key: KeyLike, *, source: str = ...) -> bytes: ...
def normalize_key(key: KeyLike | None, *, source: str = "the key") -> bytes | None:
    """A key as every entry point keeps it: bytes without surrounding ASCII whitespace (a key file, an
    environment variable or a line typed at a prompt ends in a newline, and a key must be the same key
    wherever it is given), ``None`` for no key. A ``str`` is UTF-8 encoded first.

    A key that is empty after stripping is a :class:`ValueError` (never a silent "no key"); ``source`` names
    where it came from in that message. The key itself is never part of a message."""
    if key is None:
        return None
    if isinstance(key, str):
        raw = key.encode()
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    else:
        raise TypeError(f"a key must be bytes or str, not {type(key).__name__}")
    raw = raw.strip()
    if not raw:
        raise ValueError(f"{source} is empty once surrounding whitespace (never part of a key) is removed: "
                         f"an empty key is no key (pass none to run without one)")
    return raw


def generate_key() -> bytes:
    """A fresh random key for a cluster of our own: 256 bits, hex-encoded, so it has no whitespace to lose
    to :func:`normalize_key` and survives a key file, a command's standard input or an environment variable
    unchanged."""
    import secrets  # imported here: only a process that makes a cluster needs it

    return secrets.token_hex(GENERATED_KEY_BYTES).encode()


def resolve_key(
    key: bytes | str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    *,
    insecure: bool = False,
    per_user: bool = True,
) -> bytes | None:
    """The shared HMAC key, the one rule for the Python API, the command line and worker processes: the
    argument, else the key file, else ``$REMOTE_EXECUTOR_KEY``, else the per-user key (:func:`user_key`),
    created on first use. ``insecure`` (or ``per_user=False``, for the embedded clusters, which have a
    secret of their own) turns that last step off: no key given means no key.

    Surrounding whitespace is stripped from every source alike (:func:`normalize_key`); a key or key file
    that is empty after that is an error, never a silent "no key", and so is a ``key`` string that
    names an existing file (``key_file`` reads one). An empty environment variable counts as unset. A key
    file that others may read or write is refused (:func:`read_key_file`)."""
    if key is not None and key_file is not None:
        raise ValueError("pass key or key_file, not both")
    if key is not None:
        if not isinstance(key, (bytes, bytearray, memoryview, str)):
            raise TypeError(f"key must be bytes, str or None, not {type(key).__name__}")
        if isinstance(key, str) and key.strip() and os.path.isfile(key):  # never a file's name taken as the key
            raise ValueError(f"key={key!r} names a file: pass key_file={key!r} to read the key from it "
                             f"(or the key itself, as key=...)")
        return normalize_key(key)
    if key_file is not None:
        return read_key_file(key_file)
    from_env = os.environ.get(KEY_ENV, "").encode()
    if from_env.strip():  # empty or blank: unset
        return normalize_key(from_env)
    return None if insecure or not per_user else user_key()


def read_key_file(path: str | os.PathLike[str], *, own: bool = False) -> bytes:
    """The stripped contents of a key file, refused (as ssh does) if group or others may read or write it,
    and with ``own`` if another user owns it (someone else would know the key). The mode is checked on the
    opened file, so the file that is read is the file that was checked."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, PermissionError) as exc:  # (their own text names no key: "[Errno 2] ... 'k'")
        raise type(exc)(exc.errno, f"cannot read the key file: {exc.strerror}", name) from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # (open() would say "[Errno 21] Is a directory: 3", naming the fd)
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "a key file is expected, not a directory", name)
    with open(fd, "rb") as f:
        info = os.fstat(f.fileno())
        raw = f.read(MAX_KEY_FILE + 1)
    if len(raw) > MAX_KEY_FILE:
        raise ValueError(f"key file {name!r} is larger than {MAX_KEY_FILE} bytes: is it really a key?")
    raw = normalize_key(raw, source=f"key file {name!r}")
    if os.name == "posix" and info.st_mode & 0o077:
        raise PermissionError(f"key file {name!r} is accessible by others (mode {info.st_mode & 0o777:04o}); "
                              f"a key must be secret: chmod 600 {shlex.quote(name)}")
    if os.name == "posix" and own and info.st_uid != os.geteuid():
        raise PermissionError(f"key file {name!r} belongs to uid {info.st_uid}, not to this user "
                              f"({os.geteuid()}): someone else knows it. Remove it, or set ${KEY_FILE_ENV}")
    return raw


def user_key_path() -> Path:
    """``$REMOTE_EXECUTOR_KEY_FILE``, else ``$XDG_CONFIG_HOME/remote_executor/key`` (by default
    ``~/.config/remote_executor/key``)."""
    from pathlib import Path

    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(config):  # the XDG rule: a relative value is ignored
        return Path(config) / "remote_executor" / "key"
    try:
        home = Path.home()
    except RuntimeError as exc:  # no $HOME and no password entry
        raise OSError(f"no home directory for the per-user key file: set ${KEY_FILE_ENV}, or give a key") from exc
    return home / ".config" / "remote_executor" / "key"


def user_key() -> bytes:
    """This user's key: read from :func:`user_key_path`, which is created on first use with 32 random
    bytes, hex-encoded, mode 0600 (its directory 0700). Processes that create it at the same moment all
    end up with the one key that won."""
    path = user_key_path()
    try:
        return read_key_file(path, own=True)
    except FileNotFoundError:
        pass
    try:
        _create_key_file(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the per-user key file {str(path)!r}: {exc.strerror or exc}; "
                                 f"set ${KEY_FILE_ENV} to a writable place, or give a key") from exc
    return read_key_file(path, own=True)


def _create_key_file(path: Path) -> None:
    """Publish a new key at ``path`` unless another process already did (then its key stands).

    The key is written to a private temporary file first and hard-linked into place: the link is atomic
    and fails if ``path`` exists, so a reader never sees a half-written key and two creators never end up
    with two keys."""
    import secrets  # imported here: only the first use of a user's key needs it

    directory = path.parent
    if not directory.is_dir():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    text = (secrets.token_hex(USER_KEY_BYTES) + "\n").encode()
    temporary = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process was first: its key is the key
        except OSError:  # a file system without hard links: create in place, still exclusively
            _create_in_place(path, text, flags)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _create_in_place(path: Path, text: bytes, flags: int) -> None:
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    import ipaddress

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


def server_key(host: str, key: bytes | None, insecure: bool) -> bytes | None:
    """The key a job server of ours listens with: the one given, else the key :func:`resolve_key` finds
    (the per-user key unless ``insecure``), normalized (:func:`normalize_key`) before anything is bound;
    then :func:`check_bind`. (An embedded cluster's server always has a key of its own.)"""
    key = resolve_key(insecure=insecure) if key is None else normalize_key(key)
    check_bind(host, key, insecure)
    return key


def check_connect(hosts: list[str], key: bytes | None, insecure: bool, role: str) -> None:
    """A keyless client or worker of gearmand (which authenticates nobody) trusts everyone who can reach
    it: refused unless every host is loopback, or ``insecure`` says the network is trusted."""
    if key is None and not insecure and not all(is_loopback(host) for host in hosts):
        harm = "make this worker run code" if role == "worker" else "hand this process a pickle to run"
        raise TransportError(
            f"refusing to use gearmand at {', '.join(hosts)} without a key: anyone who can reach it could "
            f"{harm}. Set a key (key=, --key-file or ${KEY_ENV}) or pass insecure on a trusted network."
        )


def key_to_env(key: bytes | None) -> dict[str, str]:
    """Environment that makes :func:`key_from_env` return ``key`` (normalized) in a child process."""
    key = normalize_key(key)
    return {} if key is None else {KEY_HEX_ENV: key.hex()}


def key_from_env(*, insecure: bool = False) -> bytes | None:
    """The key a parent handed down (normalized like any other key: the bytes a parent hex-encodes may
    come from anywhere), else what :func:`resolve_key` finds."""
    hexed = os.environ.get(KEY_HEX_ENV)
    if not hexed:
        return resolve_key(insecure=insecure)
    try:
        raw = bytes.fromhex(hexed)
    except ValueError:  # the message would quote the secret's digits: say only what is wrong
        raise ValueError(f"${KEY_HEX_ENV} is not hexadecimal: it holds a key as hex digits "
                         f"(two per byte)") from None
    return normalize_key(raw, source=f"${KEY_HEX_ENV}")


def take_worker_secrets(*, insecure: bool = False) -> bytes | None:
    """The key of a worker process, from what its parent handed down (else :func:`resolve_key`), then
    removed from ``os.environ``: the calls this process runs, and the processes they start, never see it."""
    try:
        return key_from_env(insecure=insecure)
    finally:
        for name in SECRET_ENVS:
            os.environ.pop(name, None)
