"""Every exception the documentation names can be caught as written: a builtin, one of
``concurrent.futures``, or importable from ``remote_executor`` (or, for the conformance suite's own,
``remote_executor.conformance``)."""

from __future__ import annotations

import builtins
import concurrent.futures
import re
from pathlib import Path

import pytest

import remote_executor
import remote_executor.conformance

DOCS = Path(__file__).resolve().parents[2] / "docs"
# `SomethingError` or `InitializerFailed` in backticks, not qualified by a module (`zmq.ZMQError` is zmq's).
NAME = re.compile(r"`(?<![.\w])([A-Z]\w*(?:Error|Failed))\b")


def named_in(path: Path) -> set[str]:
    return set(NAME.findall(path.read_text()))


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_exception_a_page_names_can_be_imported(page: Path) -> None:
    homes = (builtins, concurrent.futures, remote_executor, remote_executor.conformance)
    missing = sorted(name for name in named_in(page) if not any(hasattr(home, name) for home in homes))
    assert not missing, f"{page.name} names exceptions that `from remote_executor import ...` cannot: {missing}"


def test_the_pages_do_name_exceptions() -> None:
    assert {"WorkerLostError", "KeyRejectedError", "TlsError"} <= set().union(*map(named_in, DOCS.glob("*.md")))
