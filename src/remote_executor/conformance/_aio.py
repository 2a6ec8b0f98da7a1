"""asyncio interoperation: ``loop.run_in_executor`` and ``asyncio.wrap_future``."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase
from .gate import Gate

__all__ = ["AsyncioTests"]


class AsyncioTests(ConformanceBase):
    def test_run_in_executor(self, executor: Executor) -> None:
        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            calls = [loop.run_in_executor(executor, tasks.square, i) for i in range(10)]
            return list(await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT))

        assert asyncio.run(main()) == [i * i for i in range(10)]

    def test_run_in_executor_propagates_exceptions(self, executor: Executor) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(executor, tasks.raise_custom, 3, "async"), TIMEOUT)

        with pytest.raises(tasks.CustomError) as caught:
            asyncio.run(main())
        assert caught.value.args == (3, "async")

    def test_wrap_future(self, executor: Executor) -> None:
        async def main() -> int:
            return await asyncio.wait_for(asyncio.wrap_future(executor.submit(tasks.add, 40, 2)), TIMEOUT)

        assert asyncio.run(main()) == 42

    def test_asyncio_timeout_while_the_call_is_held(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "finished")

        async def main() -> None:
            await asyncio.wait_for(asyncio.wrap_future(held), 0.1)

        gate.wait_started(1)
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(main())
        assert not held.cancelled()  # it was running: asyncio's cancel could not stop it
        gate.release()
        assert held.result(timeout=TIMEOUT) == "finished"
