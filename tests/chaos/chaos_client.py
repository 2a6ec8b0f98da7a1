"""A chaos client: ``python chaos_client.py CONFIG.json`` submits calls of :func:`chaos_task.work` through a
``RemoteExecutor`` and writes a JSON summary of what became of every future.

CONFIG holds ``url``, ``key_file``, ``calls``, ``seconds`` (per call), ``prefix`` (call ids are
``<prefix>-<i>``), ``exec_log``, ``summary``, ``max_retries``, ``heartbeat_interval``, ``heartbeat_timeout``,
``reconnect_timeout``, ``connect_timeout``, ``deadline`` (seconds after the last submission within which
every future must resolve), ``progress_every``, and optionally ``duration`` (stop submitting after this
many seconds, even if fewer than ``calls`` were submitted) and ``window`` (at most this many unresolved
futures at a time; by default every call is submitted at once).

Stdout, for the test to wait on: ``connected`` once the executor is up, ``progress N`` every
``progress_every`` resolved futures (and at the last), ``done`` once the summary file exists. The summary:
``ok``, ``wrong`` (a result that is not this call's), ``exceptions`` (count by type name), ``failed`` (call
id -> type name), ``unresolved`` (still pending at the deadline), ``shutdown`` (``ok`` or ``hung``).
A client whose futures did not all resolve exits with ``os._exit`` after writing the summary: the
interpreter's exit would wait for them for ever.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import BrokenExecutor, Future, wait
from typing import Any


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg: dict[str, Any] = json.load(f)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s client %(process)d %(name)s %(levelname)s %(message)s")
    from chaos_task import expected, work

    from remote_executor import RemoteExecutor

    started = time.monotonic()
    executor = RemoteExecutor(
        transport=cfg["url"], key_file=cfg["key_file"], max_retries=cfg["max_retries"],
        heartbeat_interval=cfg["heartbeat_interval"], heartbeat_timeout=cfg["heartbeat_timeout"],
        reconnect_timeout=cfg["reconnect_timeout"], connect_timeout=cfg["connect_timeout"],
    )
    out_lock = threading.Lock()
    resolved = 0

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_done(_: Future[Any]) -> None:
        nonlocal resolved
        with out_lock:
            resolved += 1
            count = resolved
        if count % cfg["progress_every"] == 0:
            say(f"progress {count}")

    say("connected")
    futures: dict[str, Future[Any]] = {}
    submit_errors: dict[str, BaseException] = {}
    duration = cfg.get("duration")
    window = threading.BoundedSemaphore(cfg["window"]) if cfg.get("window") else None
    stalled = False
    for i in range(cfg["calls"]):
        if duration is not None and time.monotonic() - started > duration:
            break
        if window is not None and not window.acquire(timeout=cfg["deadline"]):
            stalled = True  # nothing resolved for a whole deadline: the summary shows what hangs
            break
        call_id = f"{cfg['prefix']}-{i}"
        try:
            future = executor.submit(work, cfg["exec_log"], call_id, cfg["seconds"])
        except BrokenExecutor as exc:  # the executor broke (server gone for good): a clear error, counted
            submit_errors[call_id] = exc
            on_done(Future())
            if window is not None:
                window.release()
            continue
        futures[call_id] = future
        if window is not None:
            future.add_done_callback(lambda _: window.release())
        future.add_done_callback(on_done)

    wait(list(futures.values()), timeout=cfg["deadline"])
    elapsed = time.monotonic() - started

    ok = 0
    wrong: list[str] = []
    failed: dict[str, str] = {}
    examples: dict[str, str] = {}
    unresolved: list[str] = []
    for call_id, future in futures.items():
        if not future.done():
            unresolved.append(call_id)
            continue
        exc = future.exception()
        if exc is not None:
            failed[call_id] = type(exc).__name__
            examples.setdefault(type(exc).__name__, f"{exc}"[:500])
            continue
        value = future.result()
        if isinstance(value, list) and value[:2] == [call_id, expected(call_id)]:
            ok += 1
        else:
            wrong.append(f"{call_id}: {value!r}"[:200])
    for call_id, exc in submit_errors.items():
        failed[call_id] = type(exc).__name__
        examples.setdefault(type(exc).__name__, f"{exc}"[:500])

    shutdown = "skipped (unresolved futures)"
    if not unresolved:
        closer = threading.Thread(target=executor.shutdown, daemon=True)
        closer.start()
        closer.join(30.0)
        shutdown = "hung" if closer.is_alive() else "ok"

    summary = {
        "prefix": cfg["prefix"],
        "pid": os.getpid(),
        "calls": len(futures) + len(submit_errors),
        "stalled": stalled,
        "ok": ok,
        "wrong": len(wrong),
        "wrong_examples": wrong[:20],
        "exceptions": dict(Counter(failed.values())),
        "exception_examples": examples,
        "failed": failed,
        "unresolved": len(unresolved),
        "unresolved_ids": unresolved[:50],
        "elapsed": round(elapsed, 3),
        "shutdown": shutdown,
    }
    tmp = cfg["summary"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, cfg["summary"])
    say("done")
    if shutdown != "ok":
        os._exit(0)  # interpreter exit would wait for the pending futures
    return 0


if __name__ == "__main__":
    sys.exit(main())
