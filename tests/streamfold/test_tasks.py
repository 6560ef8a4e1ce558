"""Stopping tasks for certain: a task that survives a cancel is cancelled again until it ends."""

from __future__ import annotations

import asyncio

from streamfold.tasks import cancel_and_wait


async def loop_that_loses_one_cancel(turns: list[int]) -> None:
    """A background loop whose first cancel is lost, as Python 3.11's wait_for loses one."""
    lost = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if lost:
                raise
            lost = True
        turns.append(1)


def test_a_loop_that_lost_its_cancel_runs_on_and_cancel_and_wait_ends_it() -> None:
    async def go() -> None:
        turns: list[int] = []
        once = asyncio.create_task(loop_that_loses_one_cancel(turns))
        await asyncio.sleep(0.02)
        once.cancel()
        await asyncio.sleep(0.1)
        assert not once.done() and turns  # one cancel was not enough: the loop went on

        again = asyncio.create_task(loop_that_loses_one_cancel([]))
        await asyncio.sleep(0.02)
        async with asyncio.timeout(5):
            await cancel_and_wait(again, None, every=0.05)
        assert again.cancelled()
        await cancel_and_wait(once)

    asyncio.run(go())


def test_what_a_task_raised_is_dropped_and_finished_tasks_are_left_alone() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    async def go() -> None:
        failed, finished = asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(0))
        await asyncio.sleep(0.01)
        await cancel_and_wait(failed, finished)
        assert isinstance(failed.exception(), ValueError) and not finished.cancelled()

    asyncio.run(go())
