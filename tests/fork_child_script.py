"""Run by tests/test_forked_child.py: a child forked while an executor runs tries it, then exits normally."""

from __future__ import annotations

import os
import sys

from remote_executor import RemoteExecutor

with RemoteExecutor(2, transport=sys.argv[1]) as ex:
    assert ex.submit(pow, 2, 3).result(timeout=60) == 8
    pid = os.fork()
    if pid == 0:  # the child: not ex's process
        try:
            ex.submit(pow, 2, 3)
            print("child: submitted", flush=True)
        except RuntimeError as exc:
            print(f"child: {exc}", flush=True)
        sys.exit(7)  # a normal exit: exit hooks and finalizers run, and must leave the parent's executor be
    _, status = os.waitpid(pid, 0)
    print(f"parent: child exited {os.waitstatus_to_exitcode(status)}", flush=True)
    print(f"parent: {[f.result(timeout=60) for f in [ex.submit(pow, 3, i) for i in range(4)]]}", flush=True)
