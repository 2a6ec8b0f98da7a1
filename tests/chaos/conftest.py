"""Fixtures of the chaos suite: whole clusters on network namespaces, torn down whatever happens.

The suite needs root and ``ip netns``. Without them it is skipped on a developer's machine, but it fails
with a clear message where ``$CI`` is set: CI runs as root, and a chaos suite that silently stopped running
would look green for ever.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..netns import cleanup_stale, unavailable_reason
from .cluster import ChaosCluster, find_gearmand


def cannot_run(reason: str) -> None:
    """Skip, or fail in CI (where a skipped chaos test would hide a machine that lost a capability)."""
    if os.environ.get("CI"):
        pytest.fail(f"the chaos suite cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def namespaces_ready() -> Iterator[None]:
    """Namespaces work here; stale ``rexc-<dead pid>-*`` namespaces of a crashed run are deleted before
    the suite, and every one of this run's after it (even those a failed finalizer missed)."""
    reason = unavailable_reason()
    if reason is not None:
        cannot_run(reason)
    cleanup_stale()
    yield
    cleanup_stale(include_own=True)


def require(transport: str) -> None:
    if transport == "gearman" and find_gearmand() is None:
        cannot_run("gearmand is not installed (apt-get install -y --no-install-recommends gearman-job-server)")
    if transport == "zmq" and importlib.util.find_spec("zmq") is None:
        cannot_run("pyzmq is not installed (pip install -e '.[zmq]')")


@pytest.fixture
def chaos(namespaces_ready: None, tmp_path: Path) -> Iterator[Callable[..., ChaosCluster]]:
    """``chaos(transport, **options)``: a started :class:`ChaosCluster`; killed and deleted at teardown."""
    made: list[ChaosCluster] = []

    def make(transport: str, **options: Any) -> ChaosCluster:
        require(transport)
        cluster = ChaosCluster(transport, tmp_path / f"cluster{len(made)}", **options)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.close()
