"""The clients ``streamfold.connection`` builds, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from streamfold.connection import connect_async
from streamfold.settings import Settings

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
