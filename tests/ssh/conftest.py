"""The SSH tests' hosts: network namespaces with real sshd, built once per session and always removed.

They need root (namespaces, sshd). Not root: skipped, unless ``$CI`` is set, where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netlab import NetLab, missing_tools

MARKER = "ssh: starts real sshd in Linux network namespaces (root; openssh-server and openssh-client)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the SSH tests need root (network namespaces, sshd)"
    missing = missing_tools()
    if missing:
        return f"the SSH tests need {', '.join(missing)} (apt-get install openssh-server openssh-client iproute2)"
    return None


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetLab]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run them")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("netlab")
    with_lab = NetLab(tmp).build()
    try:
        yield with_lab
    finally:
        with_lab.destroy()


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """A directory the calls mark their progress in (every namespace sees the same disk)."""
    path = tmp_path / "markers"
    path.mkdir()
    path.chmod(0o777)
    return path
