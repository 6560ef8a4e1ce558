"""The clients ``streamfold.connection`` builds, against a real Redis."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio

from streamfold.connection import connect_async
from streamfold.settings import Settings
from streamfold.tasks import cancel_and_wait

pytestmark = pytest.mark.redis


def test_an_async_client_with_every_connection_busy_waits_for_one_instead_of_failing(real_redis_url: str,
                                                                                     namespace: str) -> None:
    async def main() -> list[object]:
        client = connect_async(Settings(redis_url=real_redis_url, socket_timeout=5), connections=2)
        try:
            # Ten commands that each hold a connection for 0.2 s, on a pool of two.
            return await asyncio.gather(*(client.blpop([f"{namespace}:empty:{n}"], timeout=0.2) for n in range(10)))
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [None] * 10


def test_a_task_cancelled_in_the_middle_of_redis_commands_ends_at_its_first_cancel(real_redis_url: str,
                                                                                    namespace: str) -> None:
    """Python 3.11's wait_for, which redis-py writes through, loses nearly every cancel that lands during a
    write; a task cancelled once must end all the same, every time."""
    async def busy(client: redis.asyncio.Redis, key: str) -> None:
        while True:
            await client.set(key, "v")
            await client.get(key)

    async def main() -> None:
        client = connect_async(Settings(redis_url=real_redis_url), connections=8)
        keys = [f"{namespace}:busy:{n}" for n in range(20)]
        tasks = [asyncio.create_task(busy(client, key)) for key in keys]
        try:
            for turn in range(200):
                await asyncio.sleep(random.uniform(0, 0.003))
                at = random.randrange(len(tasks))
                tasks[at].cancel()
                done, _ = await asyncio.wait([tasks[at]], timeout=5)
                assert done, f"a cancelled task ran on (turn {turn})"
                tasks[at] = asyncio.create_task(busy(client, keys[at]))
        finally:
            await cancel_and_wait(*tasks)
            await client.delete(*keys)
            await client.aclose()

    asyncio.run(main())
