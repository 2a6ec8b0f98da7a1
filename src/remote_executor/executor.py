"""Implements RemoteExecutor: a concurrent.futures.Executor whose calls run in other processes.

The following diagram describes the data-flow through the client side:

  caller threads          _Core (one lock)                        transport            transport threads
 +----------------+    +---------------------------+          +-------------+       +------------------+
 | submit()/map() | => | pending: deque of items   |          |             |       |                  |
 |  pickles the   |    |   (PENDING, cancellable)  |  batch   |  submit()   |  ==>  |  workers run the |
 |  call here     |    | window: min(max_workers,  | =======> |  (never     |       |  calls elsewhere |
 +----------------+    |         capacity)         |          |   blocks)   |       |                  |
                       | in_flight: task_id -> item|          +-------------+       |                  |
 +----------------+    |   (RUNNING)               |      on_result / on_capacity / |                  |
 | Future.result()| <= | settles futures outside   | <==================================  on_broken      |
 +----------------+    |   the lock                |                                +------------------+
                       +---------------------------+

RemoteExecutor.submit()/map() (caller threads):
- pickle the call (or a chunk of map calls) in the caller's thread; a pickling error fails that future only
- append a work item to "pending" and dispatch: under the lock, move every item that fits the window to
  "in_flight" (the moment its future turns RUNNING) and hand them to the transport in one submit(); a
  cancelled item is dropped (its waiters were notified when it was cancelled)

Transport threads (the listener, _Core.on_*):
- on_result: take the item out of "in_flight", dispatch more, decode the outcome, settle the future
- on_capacity: the window follows the attached workers; dispatch more
- on_broken: fail every pending and in-flight future with the error; submit() raises it from then on
- on_started: a worker took a call with a time limit; if no result comes long after the limit (the worker
  stops the call itself, the server reports it), the deadline thread fails the future itself

Shutdown:
- shutdown(wait=True) waits until every accepted call settled, then closes the transport
- shutdown(wait=False) returns at once; whoever settles the last call starts a short-lived closer thread
- at interpreter exit every live executor finishes its outstanding calls first, then closes (as
  ThreadPoolExecutor does); a garbage-collected executor behaves as after shutdown(wait=False)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import operator
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

from . import interrupts
from .errors import BrokenRemoteExecutor, CallTimeoutError, SerializationError
from .security import resolve_key
from .transports.base import Call, ClientTransport, Options, Session, Status, check_heartbeats, decode_result
from .wire.messages import check_limit
from .wire.output import write_output
from .wire.serialization import Parts, encode_call, encode_chunk, encode_initializer

_TASK_ID = operator.attrgetter("task_id")

if TYPE_CHECKING:  # imported when status() is called: not on every start-up's path
    from .status import ClusterStatus

__all__ = ["RemoteExecutor"]

logger = logging.getLogger("remote_executor")
_futures_log = logging.getLogger("concurrent.futures")  # where ThreadPoolExecutor logs a callback's error
_Later = tuple["Future[Any]", list["Callable[[Future[Any]], object]"]]  # a settled future and its callbacks
# Threads that run the caller's done-callbacks, started as callbacks wait, up to max_workers (as many as
# ThreadPoolExecutor has workers, which run a call's callbacks), or this many where that is not known: one
# slow callback does not hold up the others', and with max_workers=1 they run one by one, in order.
MAX_CALLBACK_THREADS = min(32, (os.cpu_count() or 1) + 4)

P = ParamSpec("P")
T = TypeVar("T")

# Interpreter exit: as in concurrent.futures.thread, the global flag is written under the global lock and
# submit() checks it (and enqueues) under the same lock, so the exit hook never misses a late call.
_live_cores: weakref.WeakSet[_Core] = weakref.WeakSet()
_global_shutdown = False
_global_shutdown_lock = threading.Lock()
_in_listener = threading.local()  # .core: the _Core whose futures this thread is settling


def _python_exit() -> None:
    global _global_shutdown
    with _global_shutdown_lock:
        _global_shutdown = True
    for core in list(_live_cores):
        if core.abandoned:
            core.abandon()
        else:
            core.drain_and_close()


# Runs before non-daemon threads are joined (unlike atexit), as ThreadPoolExecutor's hook does.
threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


def _forget_after_fork() -> None:
    """In a process forked from this one (``os.fork()``, multiprocessing's "fork"): the executors' objects
    are copied, but not their threads, and their workers, job servers and sockets are the parent's. The
    child must neither use them (its frames would interleave with the parent's on shared sockets) nor stop
    them when it exits (it would kill the parent's workers): they are orphaned, and forgotten."""
    global _global_shutdown_lock
    _global_shutdown_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for core in list(_live_cores):
        core.orphaned = True
    _live_cores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class _WorkItem:
    __slots__ = ("deadline", "future", "limit", "parts", "starts")

    def __init__(self, future: Future[Any], parts: Parts, limit: float | None) -> None:
        self.future = future
        self.parts = parts
        self.limit = limit
        self.starts = 0  # how often a worker took it (a retry starts its clock again)
        self.deadline: _Deadline | None = None  # armed when a worker takes a call with a limit


class _PinnedItem(_WorkItem):
    """A broadcast's call, for the one worker it must run on."""

    __slots__ = ("worker",)

    def __init__(self, future: Future[Any], parts: Parts, limit: float | None, worker: str) -> None:
        super().__init__(future, parts, limit)
        self.worker = worker


# An armed deadline: [when, sequence number, callback or None once disarmed]; a list, so that disarming is
# O(1) (the heap keeps the entry until it comes up, or until a compaction drops it).
_Deadline = list[Any]
COMPACT_AT = 256  # disarmed entries are dropped from the heap once there are this many and they are half of it


class _Deadlines:
    """One lazily started thread that runs callbacks at the times they were armed for."""

    def __init__(self) -> None:
        self._heap: list[_Deadline] = []
        self._seq = itertools.count()  # ties never compare the callbacks
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._disarmed = 0  # entries of the heap whose callback is gone

    def arm(self, when: float, callback: Callable[[], None]) -> _Deadline | None:
        """Run ``callback`` at ``when`` (monotonic clock); the handle :meth:`disarm` takes (None if closed)."""
        with self._changed:
            if self._closed:
                return None
            entry: _Deadline = [when, next(self._seq), callback]
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="remote_executor-deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()
            return entry

    def disarm(self, entry: _Deadline) -> None:
        """Forget a deadline that is no longer needed (its call settled), with what its callback holds: a
        long time limit must not keep every finished call's bookkeeping until it comes up."""
        with self._changed:
            if entry[2] is None:
                return
            entry[2] = None
            self._disarmed += 1
            if self._disarmed >= COMPACT_AT and 2 * self._disarmed >= len(self._heap):
                self._heap = [kept for kept in self._heap if kept[2] is not None]
                heapq.heapify(self._heap)
                self._disarmed = 0

    def __len__(self) -> int:
        """How many entries the heap holds, disarmed ones included (for tests)."""
        with self._changed:
            return len(self._heap)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                entry = heapq.heappop(self._heap)
                callback, entry[2] = entry[2], None  # run once: a later disarm() of it does nothing
                if callback is None:
                    self._disarmed -= 1
                    continue
            try:
                callback()
            except Exception:  # a bug in one callback must not stop the others
                logger.exception("a deadline callback failed")


class _Core:
    """The executor's state and the transport's listener, apart from the user-facing object.

    The transport's threads reference this object, never the :class:`RemoteExecutor`, so an executor that
    is dropped without ``shutdown()`` can be garbage-collected (which finishes its work and closes).
    Futures are never settled while ``lock`` is held: done-callbacks may call ``submit()``.
    """

    def __init__(self, transport: ClientTransport, max_workers: int | None, heartbeat_timeout: float = 10.0,
                 starved_warning: float | None = None, prefetch: int = 0) -> None:
        self.transport = transport
        # transport.submit, or (once started) that of the transport it forwards every call to: one layer
        # less on every call.
        self.submit_calls: Callable[[Sequence[Call]], None] = transport.submit
        self.max_workers = max_workers
        # Calls per worker slot handed out beyond the one it runs: RUNNING (no longer cancellable) while
        # they wait at the job server, so a freed worker gets its next call without a round trip to us.
        self.prefetch = prefetch
        # How long after its limit a started call may stay silent before it is failed here: the worker and
        # the job server each act well before this; this is for when neither can.
        self.limit_slack = 2 * heartbeat_timeout
        self.deadlines = _Deadlines()
        self.starved_warning = starved_warning  # warn when calls waited this long with no worker attached
        self.starved_since: float | None = None
        self.lock = threading.RLock()
        self.capacity_changed = threading.Condition(self.lock)
        self.idle = threading.Condition(self.lock)
        self.closed = threading.Event()
        self.pending: deque[_WorkItem] = deque()
        # Whatever removes a call from in_flight (or widens the window) must call dispatch() afterwards:
        # enqueue() does not dispatch when it finds the window full, relying on that.
        self.in_flight: dict[int, _WorkItem] = {}
        # A broadcast's calls, one per worker: outside the window (they neither wait in "pending" nor take a
        # place of "in_flight"), but outstanding like any call, so shutdown waits for them.
        self.broadcasting: dict[int, _WorkItem] = {}
        self.unclaimed: set[Future[Any]] = set()  # futures of "pending" nobody has moved out of PENDING
        self.task_ids = itertools.count(1)
        self.capacity = 0
        self.window = 0  # how many calls may be in flight: _window(), kept up to date with capacity
        self.outstanding = 0  # accepted calls whose future is neither settled nor cancelled
        self.waiters = 0  # threads blocked in shutdown(wait=True) or the exit hook
        self.shutdown_requested = False
        self.closing = False
        self.broken: BrokenRemoteExecutor | None = None
        self.pid = os.getpid()
        # The caller's done-callbacks, run off the thread that brings results (see on_result), by threads
        # started as they are needed (see _run_later).
        self.callback_queue: SimpleQueue[_Later | None] = SimpleQueue()
        self.callback_threads = 0
        self.callback_idle = threading.Semaphore(0)  # released by a callback thread that waits for work
        self.orphaned = False  # True in a process forked from this one's (see _forget_after_fork)
        self.abandoned = False  # a Ctrl-C interrupted shutdown(wait=True): exit does not wait again

    # --- caller side ---------------------------------------------------------------------------------

    def check_owner(self) -> None:
        """Raise in a process forked from the one that made this executor (see ``_forget_after_fork``),
        before any lock is taken: a thread of the parent may have held it at the fork."""
        if self.orphaned:
            raise RuntimeError(f"this RemoteExecutor belongs to the process that created it (pid {self.pid}); a "
                               f"process forked from it cannot use it: create an executor in this process")

    def check_open(self) -> None:
        """Raise as ThreadPoolExecutor.submit does when no new call can be accepted."""
        if self.broken is not None:
            raise _fresh(self.broken)
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def enqueue(self, parts: Parts, limit: float | None = None) -> Future[Any]:
        if self.orphaned:
            self.check_owner()
        future: Future[Any] = Future()
        future.add_done_callback(self._on_done)
        item = _WorkItem(future, parts, limit)
        with self.lock, _global_shutdown_lock:
            self.check_open()
            before = self.outstanding
            try:
                self.outstanding = before + 1
                self.pending.append(item)
                self.unclaimed.add(future)
                if self.capacity <= 0 or self.starved_since is not None:  # else _check_starved has nothing to do
                    self._check_starved()
                # A full window: whoever frees a place next (a result, more capacity) dispatches after that,
                # under this lock, and finds this call pending then.
                full = len(self.in_flight) >= self.window
            except BaseException:  # a signal handler's exception (Ctrl-C) cut in: the call was not submitted
                self._withdraw(item, before)
                raise
        if not full:
            self.dispatch()
        return future

    def _withdraw(self, item: _WorkItem, outstanding: int) -> None:
        """Undo a half-done :meth:`enqueue` (lock held; nothing else saw the item meanwhile)."""
        if self.pending and self.pending[-1] is item:
            self.pending.pop()
        self.unclaimed.discard(item.future)
        self.outstanding = outstanding

    def dispatch(self) -> None:
        """Hand every pending call that fits the window to the transport, in FIFO order.

        ``transport.submit`` is called under the lock: it keeps the calls in order and bounds the work of
        each caller to one batch. That is safe because the contract says it never blocks, and the lock is
        reentrant in case a transport reports a result from inside ``submit``.
        """
        with self.lock:
            try:
                calls, dropped = self._take_batch()
                rejected = self._hand_over(calls) if calls else []
            except BaseException:
                # A signal handler's exception (Ctrl-C on the main thread) cut the hand-over short, at a
                # point nobody can know: the calls in flight may or may not have reached the transport.
                self._recover()
                raise
        for item, exc in rejected:
            item.future.set_exception(exc)
        if dropped or rejected:
            self._settled(len(rejected))  # (the dropped ones were counted as they were dropped)

    def _take_batch(self) -> tuple[list[Call], bool]:
        """The calls that fit the window, now RUNNING and in flight; and whether it dropped cancelled ones
        (already taken off ``outstanding``: the caller wakes the waiters)."""
        calls: list[Call] = []
        dropped = False
        free = self.window - len(self.in_flight)
        while self.pending and self.broken is None:
            head = self.pending[0]
            if len(calls) >= free:
                break  # a cancelled head was already settled by _on_done; it is dropped when reached
            # The head leaves "pending" only once it is recorded elsewhere: an interruption at any point
            # leaves it where _mend_batch finds it.
            claimed = self._claim(head.future)
            if claimed is not True:
                if claimed is False:
                    self.outstanding -= 1
                    dropped = True
                self.pending.popleft()
                continue
            task_id = next(self.task_ids)
            self.in_flight[task_id] = head
            self.pending.popleft()
            calls.append(Call(task_id, head.parts, head.limit))
        return calls, dropped

    def _mend_batch(self) -> None:
        """After an interrupted :meth:`_take_batch` (lock held): finish moving the head of "pending" that
        it was moving. (A cancelled head whose claim was cut short between its waiters being told and its
        count being taken stays counted: the one case left, a few bytecodes wide.)"""
        if not self.pending:
            return
        head = self.pending[0]
        future = head.future
        if future in self.unclaimed:
            return  # not touched yet
        state = future._state
        if state == "PENDING":  # its claim was cut short before it moved
            self.unclaimed.add(future)
            return
        if state == "RUNNING":
            if not any(item is head for item in self.in_flight.values()):
                self.in_flight[next(self.task_ids)] = head  # _recover hands it over
            self.pending.popleft()
            return
        if state == "CANCELLED":  # cancelled, its waiters not yet told: tell them, and count it
            future.set_running_or_notify_cancel()
            self.outstanding -= 1
            self.deadlines.arm(0.0, lambda: self._settled(0))  # (wakes shutdown if that was the last)
        self.pending.popleft()  # (else cancelled and counted, by _on_done or by _take_batch)

    def _recover(self) -> None:
        """After a hand-over cut short by a signal handler's exception (lock held, Ctrl-C held off): mend
        the queue, then have the transport submit every call in flight it never received, leaving those it
        did as they are. Now, under the lock that numbers calls: the calls it never received are the newest
        it was given, which is how it tells them from calls settled meanwhile."""
        held = interrupts.hold()
        try:
            self._mend_batch()
            calls = [Call(task_id, item.parts, item.limit) for task_id, item in self.in_flight.items()]
            calls += [Call(task_id, item.parts, item.limit, worker=item.worker)
                      for task_id, item in self.broadcasting.items() if isinstance(item, _PinnedItem)]
            calls.sort(key=_TASK_ID)  # (in the order they were numbered, as submit() gets them)
            if calls and self.broken is None:
                try:
                    self.transport.reconcile(calls)
                except Exception:  # a transport bug: log it; the calls' futures stay as they are
                    logger.exception("transport %r failed to reconcile %d call(s)", self.transport, len(calls))
        finally:
            if held is not None:
                held.restore()  # (a second Ctrl-C meanwhile is dropped: the first is on its way)

    def _claim(self, future: Future[Any]) -> bool | None:
        """Move a pending future out of PENDING, exactly once (lock held): True if it is RUNNING now,
        False if it was cancelled (its waiters are notified now), None if that happened before."""
        if future not in self.unclaimed:
            return None
        self.unclaimed.discard(future)
        return future.set_running_or_notify_cancel()

    def _on_done(self, future: Future[Any]) -> None:
        """Done-callback of every future, always its first. While :meth:`on_result` settles the future, it
        takes the caller's callbacks (those after it) off the list ``set_result`` is going through, for the
        callback threads: looked at here, once the future is done, no callback can be added to the list
        any more (one added later runs at once, on the adding thread). And a call cancelled while pending
        is notified at once, so ``wait()`` and ``as_completed()`` return without waiting for the dispatcher
        to reach it."""
        callbacks: list[Callable[[Future[Any]], object]] = future._done_callbacks  # type: ignore[attr-defined]
        if len(callbacks) > 1 and getattr(_in_listener, "settling", None) is future:
            _in_listener.later = callbacks[1:]
            del callbacks[1:]  # (the list set_result iterates: it stops after this one)
            return
        # A future that got its outcome was claimed (taken out of "unclaimed", under the lock) before its
        # call was sent: one set lookup spares every result the lock of ``cancelled()``.
        if future not in self.unclaimed or not future.cancelled():
            return
        with self.lock:
            claimed = self._claim(future)
        if claimed is False:
            self._settled(1)

    def _window(self) -> int:
        if self.capacity <= 0:
            return 0
        slots = self.capacity if self.max_workers is None else min(self.max_workers, self.capacity)
        return slots * (1 + self.prefetch)

    def _hand_over(self, calls: list[Call]) -> list[tuple[_WorkItem, Exception]]:
        try:
            self.submit_calls(calls)
        except Exception as exc:  # a transport bug: fail these calls, not the caller that dispatched
            logger.exception("transport %r failed to accept %d call(s)", self.transport, len(calls))
            items = [self.in_flight.pop(call.task_id, None) for call in calls]
            return [(item, exc) for item in items if item is not None]
        return []

    # --- listener (transport threads) ----------------------------------------------------------------

    def broadcast(self, parts: Parts, workers: list[str], limit: float | None) -> dict[str, Future[Any]]:
        """One call per named worker, pinned to it; their futures (RUNNING already: they cannot be cancelled)."""
        futures: dict[str, Future[Any]] = {}
        with self.lock, _global_shutdown_lock:
            self.check_open()
            calls = []
            items: dict[int, _WorkItem] = {}
            for name in workers:
                future: Future[Any] = Future()
                future.add_done_callback(self._on_done)  # (it passes the caller's callbacks on: see there)
                future.set_running_or_notify_cancel()
                task_id = next(self.task_ids)
                items[task_id] = _PinnedItem(future, parts, limit, name)
                calls.append(Call(task_id, parts, limit, worker=name))
                futures[name] = future
            before = self.outstanding
            try:  # accepted all at once, or (Ctrl-C) not at all
                self.outstanding = before + len(calls)
                self.broadcasting.update(items)
            except BaseException:
                for task_id in items:
                    self.broadcasting.pop(task_id, None)
                self.outstanding = before
                raise
            try:
                if calls:
                    self.transport.submit(calls)
                rejected: Exception | None = None
            except Exception as exc:  # a transport bug: fail these calls, not the caller
                logger.exception("transport %r failed to accept a broadcast", self.transport)
                for call in calls:
                    self.broadcasting.pop(call.task_id, None)
                rejected = exc
            except BaseException:  # Ctrl-C: as in dispatch()
                self._recover()
                raise
        if rejected is not None:
            for future in futures.values():
                future.set_exception(rejected)
            self._settled(len(futures))
        return futures

    def on_result(self, task_id: int, status: Status, parts: Parts) -> None:
        with self.lock:
            item = self.in_flight.pop(task_id, None) or self.broadcasting.pop(task_id, None)
        if item is None:
            return  # already failed by on_broken, or a duplicate
        self.dispatch()
        if item.deadline is not None:
            self.deadlines.disarm(item.deadline)
        try:
            ok, value = decode_result(status, parts, write_output)  # printed before the future settles
        except Exception as exc:  # (what a result's unpickling raises, even a BaseException, is handled inside)
            ok, value = False, exc
        # What _settling does, inline: this runs once per call, and a generator-based context manager
        # costs four Python calls.
        future = item.future
        # Done-callbacks of the caller's (any besides _on_done) run on the callback threads, not this one:
        # this thread brings every result (and, embedded, runs the job server), so a callback that waits
        # for another future of this executor, or just takes long, would hold up everything. _on_done
        # takes them off the future as set_result runs it (see there).
        previous = getattr(_in_listener, "core", None)
        _in_listener.core, _in_listener.settling = self, future
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        finally:
            _in_listener.core, _in_listener.settling = previous, None
        later = getattr(_in_listener, "later", None)
        if later:
            _in_listener.later = None
            self._run_later(future, later)  # settled (counted) once its callbacks have run
        else:
            self._settled(1)

    def _run_later(self, future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]) -> None:
        """Have a callback thread run ``callbacks``: an idle one, else a new one (up to max_workers, then
        the first to finish), as ThreadPoolExecutor runs calls."""
        self.callback_queue.put((future, callbacks))
        if self.callback_idle.acquire(blocking=False):
            return
        with self.lock:
            if self.callback_threads >= min(self.max_workers or MAX_CALLBACK_THREADS, MAX_CALLBACK_THREADS):
                return
            try:
                threading.Thread(target=self._run_callbacks, name="remote_executor-callbacks", daemon=True).start()
            except RuntimeError:  # no new thread at interpreter exit (3.12+)
                if self.callback_threads:
                    return  # one that runs will get to it
            else:
                self.callback_threads += 1
                return
        self._run_queued_here()  # none runs and none can start (interpreter exit): on this thread

    def _run_queued_here(self) -> None:
        previous = getattr(_in_listener, "core", None)
        _in_listener.core = self
        try:
            while True:
                try:
                    item = self.callback_queue.get_nowait()
                except Empty:
                    return
                if item is not None:
                    self._invoke(*item)
                    self._settled(1)
        finally:
            _in_listener.core = previous

    def _run_callbacks(self) -> None:
        """A callback thread: as ThreadPoolExecutor's worker threads do after a call, run the callbacks of
        a settled future, log what they raise, then count the call settled (shutdown(wait=True) waits for
        the callbacks, as it does for a thread pool's)."""
        _in_listener.core = self  # shutdown(wait=True) here would wait for this very thread: an error
        while (item := self.callback_queue.get()) is not None:
            try:
                self._invoke(*item)
            finally:
                # Not kept while this thread waits for the next: the future holds its result (a thread pool's
                # worker drops its work item likewise).
                del item
                self._settled(1)
                self.callback_idle.release()

    @staticmethod
    def _invoke(future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]) -> None:
        for callback in callbacks:
            try:
                callback(future)
            except BaseException:  # SystemExit too: the other callbacks, and this thread, go on
                _futures_log.exception("exception calling callback for %r", future)

    def on_started(self, task_id: int) -> None:
        with self.lock:
            item = self.in_flight.get(task_id) or self.broadcasting.get(task_id)
            if item is None or item.limit is None:
                return
            item.starts += 1
            start = item.starts
            previous, item.deadline = item.deadline, None
        if previous is not None:  # a retry: its clock starts again
            self.deadlines.disarm(previous)
        deadline = self.deadlines.arm(time.monotonic() + item.limit + self.limit_slack,
                                      lambda: self._expire(task_id, start))
        with self.lock:
            if item.starts == start and (task_id in self.in_flight or task_id in self.broadcasting):
                item.deadline = deadline
                deadline = None
        if deadline is not None:  # it settled (or started again) meanwhile
            self.deadlines.disarm(deadline)

    def _expire(self, task_id: int, start: int) -> None:
        """No result long after a call's limit: neither its worker nor the job server reported it."""
        with self.lock:
            item = self.in_flight.get(task_id) or self.broadcasting.get(task_id)
            if item is None or item.starts != start:
                return  # it settled in time, or it was started again (a retry) and runs on a new clock
            self.in_flight.pop(task_id, None) or self.broadcasting.pop(task_id, None)
        assert item.limit is not None
        self.dispatch()
        error = CallTimeoutError(f"the call ran past its time limit of {item.limit:g}s and no worker answered "
                                 f"for {self.limit_slack:g}s more; it was not retried", item.limit)
        with _settling(self):
            item.future.set_exception(error)
        self._settled(1)

    def on_capacity(self, slots: int) -> None:
        with self.lock:
            self.capacity = slots
            self.window = self._window()
            self.capacity_changed.notify_all()
            self._check_starved()
        self.dispatch()

    # --- calls waiting with no worker ----------------------------------------------------------------

    def _check_starved(self) -> None:
        """Lock held: start (or stop) timing how long calls wait with no worker attached."""
        starved = self.capacity <= 0 and bool(self.pending)
        if not starved:
            self.starved_since = None
        elif self.starved_since is None and self.starved_warning is not None:
            since = self.starved_since = time.monotonic()
            self.deadlines.arm(since + self.starved_warning, lambda: self._warn_starved(since))

    def _warn_starved(self, since: float) -> None:
        with self.lock:
            # Cancelled calls stay queued until dispatch skips them: they are not waiting. (The state, not
            # cancelled(): no future's lock under ours.)
            waiting = sum(item.future._state == "PENDING" for item in self.pending)
            if not waiting:
                self.starved_since = None
            if self.starved_since != since or self.broken is not None or self.closing:
                return  # a worker came, the calls were cancelled, or the executor ended meanwhile
            assert self.starved_warning is not None
            self.deadlines.arm(time.monotonic() + self.starved_warning, lambda: self._warn_starved(since))
        logger.warning("0 workers attached to %s, %d call(s) waiting for %.0fs", self.transport.url or "the transport",
                       waiting, time.monotonic() - since)

    def wait_for_workers(self, n: int, timeout: float | None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while self.capacity < n:
                if self.broken is not None:
                    raise _fresh(self.broken)
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.capacity} of {n} worker(s) attached to "
                                       f"{self.transport.url or 'the transport'} after {timeout:g}s")
                self.capacity_changed.wait(remaining)
            return self.capacity

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        with self.lock:
            if self.broken is not None:
                return
            self.broken = error
            self.capacity_changed.notify_all()
            failed, dropped = self._take_unfinished()
        logger.error("RemoteExecutor is broken: %s", error, exc_info=error)
        self._fail(failed, dropped, error)

    def _take_unfinished(self) -> tuple[list[_WorkItem], int]:
        """Every call not settled yet, to fail, and how many pending ones were cancelled meanwhile (lock
        held)."""
        claims = [(item, self._claim(item.future)) for item in self.pending]
        failed = [item for item, claimed in claims if claimed] + list(self.in_flight.values())
        failed += self.broadcasting.values()
        self.pending.clear()
        self.in_flight.clear()
        self.broadcasting.clear()
        return failed, sum(claimed is False for _, claimed in claims)

    def _fail(self, failed: list[_WorkItem], dropped: int, error: BaseException) -> None:
        with _settling(self):
            for item in failed:
                item.future.set_exception(error)
        self._settled(len(failed) + dropped)

    # --- shutdown ------------------------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if self.orphaned:  # (in a forked child) the parent's to shut down, not ours
            return
        with self.lock:
            self.shutdown_requested = True
            cancelled = list(self.pending) if cancel_futures else []
            if cancel_futures:
                self.pending.clear()
        for item in cancelled:
            item.future.cancel()  # _on_done notifies its waiters and counts it settled
        if not wait:
            self._settled(0)  # closes now (in the background) if nothing is outstanding
        elif getattr(_in_listener, "core", None) is self:
            # Its own call is still outstanding: waiting would deadlock (ThreadPoolExecutor raises too).
            # The transport is closed once the last call settled, as after shutdown(wait=False).
            raise RuntimeError("cannot wait for a RemoteExecutor from its own result callback")
        else:
            try:
                self.drain_and_close()
            except KeyboardInterrupt:
                # Ctrl-C while waiting for the running calls: the user gave up on them, so the exit hook
                # does not wait for them a second time (one more Ctrl-C each time, otherwise).
                self.abandoned = True
                raise

    def abandon(self) -> None:
        """At exit, after the user interrupted a wait for this executor: close it now, running calls and
        all (the embedded cluster's workers are stopped), instead of waiting for them again. Its unfinished
        futures fail (a thread still waiting for one must not hang the exit)."""
        error = BrokenRemoteExecutor("the program exited after Ctrl-C interrupted shutdown(wait=True): the "
                                     "calls that had not finished were abandoned")
        with self.lock:
            failed, dropped = self._take_unfinished()
            claimed = not self.closing
            self.closing = True  # before settling them: no closer thread (none may start at exit)
        self._fail(failed, dropped, error)
        if claimed:
            self._close()
        else:
            self.closed.wait()

    def drain_and_close(self) -> None:
        """Block until every accepted call settled, then close the transport (or wait for its closer)."""
        with self.lock:
            self.waiters += 1
            try:
                while self.outstanding:
                    self.idle.wait()
            finally:
                self.waiters -= 1
            claimed = not self.closing
            self.closing = True
        if claimed:
            self._close()
        else:
            self.closed.wait()

    def _settled(self, count: int) -> None:
        """``count`` futures were settled (or dropped as cancelled): wake waiters, close when done."""
        with self.lock:
            self.outstanding -= count
            if self.outstanding:
                return
            self.idle.notify_all()
            claimed = self.shutdown_requested and not self.closing and not self.waiters
            if claimed:
                self.closing = True
        if claimed:
            # The transport may be joining this very thread in close(): never close from here directly.
            threading.Thread(target=self._close, name="remote_executor-closer").start()

    def _close(self) -> None:
        self.deadlines.close()
        with self.lock:
            threads = self.callback_threads
        for _ in range(threads):
            self.callback_queue.put(None)  # (every call has settled: nothing is queued before them)
        try:
            self.transport.close()
        except Exception:
            logger.exception("closing transport %r failed", self.transport)
        finally:
            self.closed.set()
            _live_cores.discard(self)


class RemoteExecutor(Executor):
    """An Executor that runs each call in a worker process reached through a transport.

    A drop-in for ``ThreadPoolExecutor``: ``submit``, ``map``, ``shutdown`` and ``with`` behave alike;
    functions, lambdas and closures travel by value (cloudpickle).

    Where the calls run:

    - ``transport``: ``None`` (the default) starts an embedded local cluster: a job server in this process
      and ``max_workers`` worker processes, stopped at shutdown. A bare scheme (``"tcp"``, ``"zmq"``,
      ``"gearman"``) does the same over that transport. A URL (``"tcp://host:5555"``, ``"zmq://h1:5555,
      h2:5555"``, ``"gearman://gm:4730"``; ``/POOL`` at the end for a worker pool) uses a cluster started
      elsewhere. An ``SSHCluster`` or any ``ClientTransport`` object is used as it is.
      ``remote_executor.connect()`` finds a running cluster without a URL.
    - ``max_workers``: the number of worker processes of an embedded cluster (default: the number of
      CPUs); for a URL, the most calls of this executor in flight at once (default: as many as the
      workers attached can take).
    - ``start_method``: how an embedded cluster starts its workers: ``"forkserver"`` (the default: forked
      from a clean process of ours that imported the worker once), ``"spawn"`` (a fresh interpreter each)
      or ``"fork"`` (the first workers forked from this very process where that is safe, as
      ``multiprocessing``'s "fork" does: the fastest cold start, and the workers start with a copy of this
      process's state; ``docs/architecture.md``). Not for a URL.
    - ``initializer`` and ``initargs``: ``initializer(*initargs)`` runs once in every worker process before
      its first call of this executor; if it raises, the executor is broken (``InitializerFailed``), as a
      thread pool's is.
    - ``thread_name_prefix`` (keyword; as ``ThreadPoolExecutor``'s, whose threads these processes stand for):
      an embedded cluster's worker processes are named ``PREFIX-0``, ``PREFIX-1``, ... (default
      ``local-worker``) in logs, forwarded output and ``WorkerLostError.workers``. Not for a URL (the workers
      there named themselves).

    Security (a running cluster):

    - ``key`` (bytes or str) or ``key_file`` (a path, mode 600; surrounding whitespace is stripped): the
      shared key that authenticates every frame (HMAC). Default: ``$REMOTE_EXECUTOR_KEY``, else, for a URL,
      this user's key file (``$REMOTE_EXECUTOR_KEY_FILE``, by default ``~/.config/remote_executor/key``,
      made on first use). ``insecure`` (True): no key when none is given (a server started ``--insecure``).
      The embedded cluster makes a key of its own.

    Reliability and timing (seconds):

    - ``max_retries`` (default 2): how often a call whose worker died, hung or lost its connection is
      resubmitted before its future fails with ``WorkerLostError``. Calls that raise are never retried.
    - ``heartbeat_interval`` (1.0) and ``heartbeat_timeout`` (10.0): how often each side says it is alive,
      and the silence after which the other side counts as lost.
    - ``connect_timeout`` (10.0): how long the constructor waits for the job server (and for the workers of
      an embedded cluster) before it raises.
    - ``reconnect_timeout`` (30.0): how long the executor keeps reconnecting to a lost job server before it
      is broken (``ServerUnavailableError``) and every pending future fails.
    - ``call_timeout`` (default None: no limit) limits how long each call may run: past it, the call's
      future fails with ``CallTimeoutError`` (a ``concurrent.futures.TimeoutError``), the worker process
      running it is stopped and replaced, and the call is not retried (tcp and zmq).
      :meth:`with_options` sets another limit for some calls only.
    - ``no_workers_warning`` (30.0; None for never): log a warning when calls have waited that long with
      no worker attached to take them, and again every as long while it lasts.

    Throughput: ``prefetch`` (default 0) hands each worker slot that many calls more than it runs, queued
    at the job server so a worker that finishes a call starts the next without waiting for this process.
    Those calls are RUNNING as soon as they are handed out, so ``cancel()`` and
    ``shutdown(cancel_futures=True)`` no longer stop them: the one deliberate difference from
    ``ThreadPoolExecutor`` (``ProcessPoolExecutor`` queues one such call too). 0 keeps exact semantics.

    Output: ``forward_output`` (default False): what each call prints to ``sys.stdout``/``sys.stderr`` on its worker is
    written to this process's stdout/stderr, each line prefixed with the worker's name, before its future
    settles (``docs/observing.md``).

    Transport options (other keyword arguments): ``pool="gpu"`` (the worker pool, like the URL's
    ``/POOL``); tcp and gearman: ``tls=True`` or ``tls_ca``, ``tls_cert``, ``tls_key`` (file paths); zmq:
    ``curve_server_key``, ``curve_client_key`` (CURVE certificate files); gearman: ``job_ttl``.

    Errors: the constructor raises ``ValueError``/``TypeError`` for bad arguments (a misspelt scheme says
    "did you mean"), ``TransportError`` when the job server cannot be reached or a needed extra is not
    installed (the message names the ``pip install``), ``AuthenticationError`` for a wrong key and
    ``VersionMismatchError`` for other Python or cloudpickle versions. A call's future raises the call's
    own exception (with the remote traceback as ``__cause__``), ``SerializationError`` (an argument or
    result that cannot be pickled), ``FrameTooLargeError`` (larger than the job server accepts),
    ``WorkerLostError``, ``CallTimeoutError``, or ``BrokenRemoteExecutor`` once the executor is broken,
    which ``submit`` raises from then on too. All of them are in ``remote_executor``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        transport: str | ClientTransport | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        thread_name_prefix: str = "",
        key: bytes | str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        max_retries: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        call_timeout: float | None = None,
        no_workers_warning: float | None = 30.0,
        forward_output: bool = False,
        prefetch: int = 0,
        start_method: str | None = None,
        **transport_options: Any,
    ) -> None:
        if max_workers is not None:
            max_workers = _integer(max_workers, "max_workers", "an int or None")
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, not {type(thread_name_prefix).__name__}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        for name, seconds in (("heartbeat_interval", heartbeat_interval), ("heartbeat_timeout", heartbeat_timeout),
                              ("connect_timeout", connect_timeout)):
            if not 0 < seconds < float("inf"):  # (NaN too) else every peer is refused, or the loops spin
                raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
        check_heartbeats(heartbeat_interval, heartbeat_timeout)
        if not reconnect_timeout >= 0:
            raise ValueError(f"reconnect_timeout must be >= 0, not {reconnect_timeout!r}")
        if no_workers_warning is not None and not no_workers_warning > 0:
            raise ValueError("no_workers_warning must be None or a positive number of seconds")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int):
            raise TypeError(f"prefetch must be an int, not {type(prefetch).__name__}")
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self._max_workers = max_workers
        self._call_timeout = check_limit(call_timeout)
        self._request_timeout = connect_timeout + heartbeat_timeout  # broadcast's and status()'s questions
        self._parent: RemoteExecutor | None = None  # a view (with_options) holds the executor it views
        self._forward_output = bool(forward_output)
        init_parts = encode_initializer(initializer, tuple(initargs)) if initializer is not None else None
        options = Options(
            max_workers=max_workers,
            # A running cluster (a URL) shares the per-user key unless given one; an embedded cluster
            # makes a secret of its own.
            key=resolve_key(key, key_file, insecure=insecure,
                            per_user=isinstance(transport, str) and "://" in transport),
            insecure=insecure,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout,
            extra=dict(transport_options),
            start_method=start_method,
            worker_name=thread_name_prefix or "local-worker",
        )
        from .cluster import make_transport  # the embedded cluster's machinery, only when it is needed

        client = make_transport(transport, options)
        self._core = core = _Core(client, max_workers, heartbeat_timeout, no_workers_warning, prefetch)
        session = Session(executor_id=_random_id(), initializer=init_parts, max_retries=max_retries)
        try:
            client.start(session, core)
            submitter = getattr(client, "submitter", None)  # (a transport not derived from ClientTransport)
            if submitter is not None:
                core.submit_calls = submitter()
            if self._call_timeout is not None:
                self._check_time_limits()
        except BaseException:
            client.close()  # release whatever it started before failing
            raise
        _live_cores.add(core)
        # Dropped without shutdown(): finish the queued calls, then close (as shutdown(wait=False) does).
        weakref.finalize(self, core.shutdown, False, False).atexit = False

    def __reduce__(self) -> NoReturn:
        # A call that captured its executor (to submit more from a worker) would otherwise fail on a socket
        # or a lock deep inside, naming neither.
        raise TypeError("a RemoteExecutor cannot be sent to a worker (a call that uses its own executor?): "
                        "submit the follow-up calls from this process, with the results the calls return")

    def __repr__(self) -> str:
        core = self._core
        with core.lock:
            state = ("broken" if core.broken is not None else "shutdown" if core.shutdown_requested
                     else "running")
            capacity = core.capacity
        cluster = getattr(core.transport, "cluster", None)  # an embedded one: show where its server listens
        url = getattr(cluster, "url", None) or core.transport.url or type(core.transport).__name__
        limits = "" if self._max_workers is None else f" max_workers={self._max_workers}"
        timeout = "" if self._call_timeout is None else f" call_timeout={self._call_timeout:g}"
        prefetch = f" prefetch={core.prefetch}" if core.prefetch else ""
        return f"<{type(self).__name__} {url} workers={capacity}{limits}{timeout}{prefetch} {state}>"

    @property
    def transport(self) -> ClientTransport:
        """The client transport this executor talks to."""
        return self._core.transport

    def with_options(self, *, timeout: float | None) -> RemoteExecutor:
        """A view of this executor whose calls have another time limit (None: none).

        ``executor.with_options(timeout=5).submit(fn, *args, **kwargs)`` passes every argument on to
        ``fn`` untouched. The view shares everything else with this executor (workers, queue, shutdown),
        and has ``submit`` and ``map`` like it; keep it as long as you like.
        """
        limit = check_limit(timeout)
        if limit is not None:
            self._check_time_limits()
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._call_timeout = limit
        view._parent = self  # keeps the executor (and its clean-up when dropped) alive as long as the view
        return view

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> int:
        """Block until at least ``n`` workers (worker slots) are attached; return how many are.

        Raises ``TimeoutError`` (the built-in) naming how many came if they are not there within ``timeout``
        seconds, and the executor's error if it breaks meanwhile. The embedded cluster is ready when its
        constructor returns; this is for a cluster started elsewhere.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        self._not_from_a_callback("wait_for_workers")
        return self._core.wait_for_workers(n, timeout)

    def broadcast(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> dict[str, Future[T]]:
        """Run ``fn(*args, **kwargs)`` once on every worker process attached now; return a future per worker.

        The result maps each worker's name (as ``status()`` shows it) to the future of its call, already
        running: it resolves with that worker's result, or fails with its exception. A worker lost before or
        while it runs the call fails its future with :class:`~remote_executor.errors.WorkerLostError`; the
        call is never run on another worker instead, and never retried. Workers that attach later do not run
        it (give the executor an ``initializer`` for that); with no worker attached the dict is empty (see
        :meth:`wait_for_workers`). Only workers of this executor's pool take part. Every argument goes to
        ``fn`` untouched; a view from :meth:`with_options` applies its time limit to each call.

        Broadcast calls do not count against ``max_workers``: they do not wait behind queued calls, though on
        each worker the call waits for a free slot. Raises ``NotImplementedError`` on a transport that cannot
        address one worker (gearman://: gearmand hands a job to whichever worker asks first), and a
        :class:`~remote_executor.errors.SerializationError` if the call cannot be pickled.
        """
        core = self._core
        self._not_from_a_callback("broadcast")
        core.check_open()
        parts = encode_call(fn, args, kwargs, self._forward_output)
        workers = core.transport.broadcast_targets(self._request_timeout)
        return core.broadcast(parts, workers, self._call_timeout)

    def status(self) -> ClusterStatus:
        """The cluster as the job server sees it now: workers, clients and queues, typed.

        The same data ``remote-executor status URL`` prints; :func:`remote_executor.cluster_status` asks a
        URL without an executor. Raises ``NotImplementedError`` on a transport without a job server of ours
        (gearman://: use ``cluster_status`` on its URL, which asks gearmand).
        """
        from .status import ClusterStatus

        self._not_from_a_callback("status")
        return ClusterStatus.from_dict(self._core.transport.query_status(self._request_timeout))

    def _not_from_a_callback(self, what: str) -> None:
        """The thread that runs done-callbacks is the one that would bring the answer: waiting there for it
        would wait for ever (or until a timeout), so it is an error at once, as ``shutdown(wait=True)`` is."""
        self._core.check_owner()
        if getattr(_in_listener, "core", None) is self._core:
            raise RuntimeError(f"cannot call {what}() from a done-callback of this executor's futures: "
                               f"its answer comes on the thread that runs the callback")

    @property
    def call_timeout(self) -> float | None:
        """The time limit of this executor's (or view's) calls, in seconds; None for no limit."""
        return self._call_timeout

    def _check_time_limits(self) -> None:
        transport = self._core.transport
        if not transport.time_limits:
            raise ValueError(f"the transport {transport.url or type(transport).__name__!r} does not support call "
                             f"time limits (tcp, zmq and gearman do)")

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        core = self._core
        if core.broken is not None or core.shutdown_requested or _global_shutdown:
            core.check_open()  # raises, before the call is pickled for nothing (enqueue checks again)
        return self._submit_limited(fn, args, self._call_timeout, kwargs)

    submit.__doc__ = Executor.submit.__doc__

    def _submit_limited(self, fn: Callable[..., Any], args: tuple[Any, ...], limit: float | None,
                        kwargs: dict[str, Any] | None = None) -> Future[Any]:
        if type(fn) is tuple:  # type: ignore[comparison-overlap]  # (a by-value function's wire form)
            return _failed(TypeError("'tuple' object is not callable"))  # type: ignore[unreachable]
        try:
            parts = encode_call(fn, args, kwargs or {}, self._forward_output)
        except SerializationError as exc:
            return _failed(exc)
        return self._core.enqueue(parts, limit)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Returns an iterator equivalent to map(fn, iter), run remotely.

        ``chunksize > 1`` sends that many calls as one message; ``buffersize`` (as in Python 3.14) bounds
        how many calls (or chunks) are outstanding, consuming the input lazily. ``timeout`` counts from
        this call. Closing the iterator early cancels the calls not started yet.
        """
        chunksize = _integer(chunksize, "chunksize", "an int")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        args: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        units: Iterator[Any] = args if chunksize == 1 else _chunks(args, chunksize)
        # Held weakly, as in Python 3.14, so that a dropped executor is not kept alive by a map's iterator;
        # the executor itself, not a view of it (``with_options(...).map``: nothing else holds the view),
        # with the view's time limit kept here.
        owner = self
        while owner._parent is not None:
            owner = owner._parent
        ref, limit = weakref.ref(owner), self._call_timeout

        def submit_next() -> Future[Any] | None:
            executor, unit = ref(), next(units, None)
            if executor is None or unit is None:
                return None
            if chunksize != 1:
                return executor._submit_chunk(fn, unit, limit)
            if limit == executor._call_timeout:
                return executor.submit(fn, *unit)
            return executor._submit_limited(fn, unit, limit)

        fs: deque[Future[Any]] = deque()
        for _ in range(buffersize) if buffersize else itertools.count():
            future = submit_next()
            if future is None:
                break
            fs.append(future)
        return _map_results(fs, submit_next if buffersize else None, chunksize > 1, end_time)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._core.shutdown(wait, cancel_futures)

    shutdown.__doc__ = Executor.shutdown.__doc__

    def _submit_chunk(self, fn: Callable[..., Any], items: list[tuple[Any, ...]], limit: float | None) -> Future[Any]:
        """One call on the wire for many map calls; its value is ``(values, exception_or_None)``."""
        self._core.check_open()
        if type(fn) is tuple:  # type: ignore[comparison-overlap]  # (a by-value function's wire form)
            return _failed(TypeError("'tuple' object is not callable"))  # type: ignore[unreachable]
        try:
            parts = encode_chunk(fn, items, self._forward_output)
        except SerializationError as exc:
            return _failed(exc)
        return self._core.enqueue(parts, limit)


def _map_results(fs: deque[Future[Any]], submit_next: Callable[[], Future[Any] | None] | None, chunked: bool,
                 end_time: float | None) -> Generator[Any, None, None]:
    """The generator ``map`` returns, as ``ThreadPoolExecutor``'s is one (``close()``, ``send()``,
    ``throw()``, "generator already executing" from another thread): results in input order; once started,
    closing it (or dropping it) cancels the calls not started yet. One never started cancels nothing:
    ``executor.map(side_effect, items)`` runs every call.

    ``submit_next`` (lazy input, ``buffersize``) submits one call per result taken, after its wait, so at
    most ``buffersize`` calls are outstanding; an error doing so (the input raised, the executor was shut
    down) is raised at that element, after the results of the calls already submitted: none is lost."""
    pending: list[BaseException] = []  # the error submit_next raised, once

    def refill() -> None:
        nonlocal submit_next
        if submit_next is None:
            return
        try:
            future = submit_next()
        except BaseException as exc:
            submit_next = None
            pending.append(exc)
            return
        if future is None:
            submit_next = None
        else:
            fs.append(future)

    try:
        while fs:
            # Through a helper, so that this frame holds no result while suspended at the yield.
            if not chunked:
                yield _next_result(fs, end_time, refill)
                continue
            values, error = _next_result(fs, end_time, refill)
            values = deque(values)
            while values:
                yield values.popleft()
            if error is not None:
                raise error
        if pending:
            raise pending.pop()
    finally:
        for future in fs:
            future.cancel()


def _next_result(fs: deque[Future[Any]], end_time: float | None, refill: Callable[[], None]) -> Any:
    """The oldest call's result (the one to yield next), then the next call of lazy input submitted."""
    outcome = _result_or_cancel(fs.popleft(), None if end_time is None else end_time - time.monotonic())
    refill()  # after the wait: at most ``buffersize`` calls are ever outstanding
    return outcome


@contextlib.contextmanager
def _settling(core: _Core) -> Iterator[None]:
    """Mark this thread as running ``core``'s done-callbacks (where waiting for ``core`` would deadlock)."""
    previous = getattr(_in_listener, "core", None)
    _in_listener.core = core
    try:
        yield
    finally:
        _in_listener.core = previous


def _result_or_cancel(future: Future[Any], timeout: float | None) -> Any:
    try:
        return future.result(timeout)
    finally:
        future.cancel()
        del future  # break the reference cycle through the exception's traceback


def _integer(value: object, name: str, what: str) -> int:
    """``value`` as an int if it is one (numpy's integers too: ``operator.index``), else a TypeError."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}") from None


def _random_id() -> int:
    """A random 63-bit executor id (``secrets.randbits(63)`` without importing ``random`` and ``base64``)."""
    return int.from_bytes(os.urandom(8), "big") >> 1


def _chunks(args: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(args, size)):
        yield chunk


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def _fresh(error: BrokenRemoteExecutor) -> BrokenRemoteExecutor:
    """A new instance to raise (raising one shared instance would grow its traceback on every raise)."""
    try:
        fresh = type(error)(*error.args)
    except Exception:
        return error
    fresh.__cause__ = error.__cause__
    return fresh
