"""Project-wide pytest policy: in CI (``$CI`` set) a skipped test fails the run.

The Gearman tests need a real gearmand and the ZeroMQ tests real sockets; a machine missing either must
not report green by skipping them.
"""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(sorted({r.nodeid for r in skipped})[:10])
        print(f"\nCI: {len(skipped)} test(s) skipped ({names}); a skip is a failure in CI")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
