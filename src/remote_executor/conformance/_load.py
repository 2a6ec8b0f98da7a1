"""Volume: many small calls, and large payloads each way."""

from __future__ import annotations

import hashlib
from concurrent import futures
from concurrent.futures import Executor

import pytest

from . import tasks
from ._base import ConformanceBase

__all__ = ["LoadTests"]

_CALLS = 2_000
_PAYLOAD = 50 * 2**20
_LOAD_TIMEOUT = 90.0


class LoadTests(ConformanceBase):
    @pytest.mark.slow
    def test_many_small_calls(self, executor: Executor) -> None:
        fs = [executor.submit(tasks.add, i, 1) for i in range(_CALLS)]
        _, not_done = futures.wait(fs, timeout=_LOAD_TIMEOUT)
        assert not not_done, f"{len(not_done)} of {_CALLS} calls unfinished"
        assert [f.result() for f in fs] == [i + 1 for i in range(_CALLS)]

    @pytest.mark.slow
    def test_many_small_calls_through_map(self, executor: Executor) -> None:
        results = executor.map(tasks.square, range(_CALLS), chunksize=50, timeout=_LOAD_TIMEOUT)
        assert list(results) == [i * i for i in range(_CALLS)]

    @pytest.mark.slow
    def test_large_payload_each_way(self, executor: Executor) -> None:
        argument = tasks.make_blob(_PAYLOAD, seed=1)
        future = executor.submit(tasks.digest_and_blob, argument, _PAYLOAD, 2)
        digest, result = future.result(timeout=_LOAD_TIMEOUT)
        assert digest == hashlib.sha256(argument).hexdigest()
        assert len(result) == _PAYLOAD
        assert hashlib.sha256(result).digest() == hashlib.sha256(tasks.make_blob(_PAYLOAD, seed=2)).digest()
