"""The pytest plugin installed with the package (entry point ``pytest11``): it registers the markers the
conformance suite (``remote_executor.conformance``) uses, so a project that runs the suite against its own
executor needs no configuration for them, even with ``--strict-markers``."""

from __future__ import annotations

import pytest

MARKERS = (
    "slow: a conformance scenario that takes more than a few seconds (deselect with -m 'not slow')",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
