"""A result, or a remote exception, whose unpickling in the caller's process raises: that future fails alone.

Whatever the unpickling raises is the payload's doing, ``KeyboardInterrupt`` and ``SystemExit`` included
(ThreadPoolExecutor never unpickles, so it just returns such an object). It used to escape the thread that
brings every result: that future stayed RUNNING, no later one resolved, and the interpreter never exited.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import cloudpickle
import pytest

from remote_executor import RemoteError, RemoteExecutor, SerializationError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

RAISED = {"interrupt": KeyboardInterrupt, "exit": SystemExit, "error": RuntimeError}


def explode(kind: str) -> NoReturn:
    raise RAISED[kind](f"raised while unpickling ({kind})")


class Bomb:
    """Pickles fine; unpickling it raises ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return explode, (self.kind,)


class BombError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return explode, (self.kind,)


def return_bomb(kind: str) -> Bomb:
    return Bomb(kind)


def raise_bomb(kind: str) -> NoReturn:
    raise BombError(kind)


@pytest.mark.parametrize("kind", list(RAISED))
@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_a_result_or_exception_that_raises_when_unpickled_fails_its_future_alone(scheme: str, kind: str) -> None:
    with RemoteExecutor(1, transport=scheme) as ex:
        returned = ex.submit(return_bomb, kind)
        error = returned.exception(timeout=60)
        assert isinstance(error, SerializationError), repr(error)
        assert f"cannot unpickle the result: {RAISED[kind].__name__}: raised while unpickling ({kind})" in str(error)
        raised = ex.submit(raise_bomb, kind).exception(timeout=60)
        assert isinstance(raised, RemoteError) and "BombError" in str(raised), repr(raised)
        chunks = list(ex.map(abs, [-1, -2], chunksize=2))  # and the executor goes on
        assert chunks == [1, 2]
        assert ex.submit(pow, 2, 5).result(timeout=60) == 32
