"""Functions the broadcast tests run on workers, imported there by reference (their state lives in the
worker process: a cache, a counter)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_CACHE: dict[str, Any] = {}
_RUNS = {"count": 0}


def warm(key: str, value: Any) -> int:
    _CACHE[key] = value
    return os.getpid()


def cached(key: str) -> Any:
    return _CACHE.get(key)


def count_run() -> int:
    _RUNS["count"] += 1
    return _RUNS["count"]


def runs() -> int:
    return _RUNS["count"]


def set_level(name: str, level: int) -> None:
    logging.getLogger(name).setLevel(level)


def level(name: str) -> int:
    return logging.getLogger(name).level


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def exit_if(pid: int) -> int:
    """Die (as a crashed worker does) in the process ``pid``; elsewhere return the pid."""
    if os.getpid() == pid:
        os._exit(1)
    return os.getpid()


def add_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def fail(message: str) -> None:
    raise ValueError(message)
