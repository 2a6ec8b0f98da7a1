"""Project-wide pytest policy: in CI (``$CI`` set) a skipped test fails the run, and a run whose interpreter
does not exit after the tests fails instead of hanging.

The Gearman tests need a real gearmand and the ZeroMQ tests real sockets; a machine missing either must
not report green by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _per_user_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Clients, servers and workers given no key share the per-user key file: a temporary one for the whole
    session (session-wide, so module-scoped clusters use it too), never the real home directory's.
    Everything else kept under $XDG_CONFIG_HOME (cluster records) goes there too."""
    with pytest.MonkeyPatch.context() as patch:
        config = tmp_path_factory.mktemp("user-config")
        patch.setenv("REMOTE_EXECUTOR_KEY_FILE", str(config / "remote_executor" / "key"))
        patch.setenv("XDG_CONFIG_HOME", str(config))  # a test that unsets the one still misses ~/.config
        yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(sorted({r.nodeid for r in skipped})[:10])
        print(f"\nCI: {len(skipped)} test(s) skipped ({names}); a skip is a failure in CI")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


EXIT_GRACE = 120.0  # seconds the interpreter may take to exit once the tests are over


def pytest_unconfigure(config: pytest.Config) -> None:
    """The tests are over: if the interpreter does not exit within EXIT_GRACE seconds (an executor left with
    a call nobody will answer, a non-daemon thread), dump every thread and end with status 3, so a run fails
    loudly instead of hanging until CI's own limit."""
    import faulthandler
    import sys
    import threading

    def stuck() -> None:
        sys.stderr.write(f"\nthe interpreter did not exit within {EXIT_GRACE:g}s of the end of the tests:\n")
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    watchdog = threading.Timer(EXIT_GRACE, stuck)
    watchdog.daemon = True
    watchdog.start()
