"""What ``STREAMFOLD_REDIS_WAIT_REPLICAS`` costs the call runner: its Batcher with and without WAIT after each batch.

Run by hand; it starts its own primary and replica (``redis-server``, free ports, nothing saved)::

    python bench/wait_replicas.py

For each setting, 1,000 calls at once push 50 chunks each through one Batcher (as a runner's calls do, with the
runner's default 2 ms flush), each call waiting for its end to be sent; then one call alone pushes 1,000
chunks one at a time, timing each batch's round trip (what a call's start or end waits for). Prints a table; nothing is asserted. The machine's other load moves every
number; compare within one run.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamfold.connection import connect_async  # noqa: E402
from producer.runner.publishing import Batcher, RequestStream  # noqa: E402
from streamfold.keys import Keys  # noqa: E402
from streamfold.settings import Settings  # noqa: E402
from tests.topology import Topology, wait_for  # noqa: E402

CHUNK = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
        b'"delta":{"content":"hello"},"finish_reason":null}]}'
CALLS, CHUNKS, ALONE = 1000, 50, 1000


async def many_calls(settings: Settings, wait: int) -> tuple[float, float]:
    """Seconds for CALLS calls of CHUNKS chunks each, and the batches it took."""
    client = connect_async(settings)
    batcher = Batcher(client, wait_replicas=wait, wait_timeout_ms=500)
    flushing = asyncio.create_task(batcher.run())
    keys = Keys(namespace=f"bench-wait{wait}")

    async def call(number: int) -> None:
        stream = RequestStream(batcher, keys, f"r{number}", token="t", max_age=60)
        await stream.start({}, "auto", "chat")
        for _ in range(CHUNKS):
            await stream.push(CHUNK)
        await stream.end()

    started = time.perf_counter()
    await asyncio.gather(*(call(number) for number in range(CALLS)))
    await batcher.drain()
    elapsed = time.perf_counter() - started
    flushing.cancel()
    await asyncio.gather(flushing, return_exceptions=True)
    await client.aclose()
    return elapsed, batcher.flushes


async def round_trips(settings: Settings, wait: int) -> list[float]:
    """Milliseconds of each of ALONE round trips of one chunk each, the sender waiting for every reply."""
    client = connect_async(settings)
    batcher = Batcher(client, wait_replicas=wait, wait_timeout_ms=500)
    flushing = asyncio.create_task(batcher.run())
    times = []
    for _ in range(ALONE):
        started = time.perf_counter()
        await batcher.send((("XADD", f"bench-wait{wait}:alone", "*", "d", CHUNK),), reply=True)
        times.append((time.perf_counter() - started) * 1000)
    flushing.cancel()
    await asyncio.gather(flushing, return_exceptions=True)
    await client.aclose()
    return times


def main() -> None:
    if not shutil.which("redis-server"):
        sys.exit("redis-server is needed")
    topology = Topology(Path(tempfile.mkdtemp(prefix="bench-wait-")))
    try:
        primary = topology.start("primary")
        replica = topology.start("replica", "--replicaof", "127.0.0.1", str(primary.port))
        wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 15, "the replica")
        settings = Settings(redis_url=f"redis://127.0.0.1:{primary.port}/0")
        print(f"{'WAIT replicas':>13} | {CALLS} calls x {CHUNKS} chunks | batches | chunks/s | "
              "one chunk alone, ms p50 / p99")
        print("-" * 91)
        for wait in (0, 1, 0, 1):
            elapsed, flushes = asyncio.run(many_calls(settings, wait))
            alone = sorted(asyncio.run(round_trips(settings, wait)))
            p99 = alone[min(len(alone) - 1, int(len(alone) * 0.99))]
            print(f"{wait:>13} | {elapsed:>18.2f} s | {flushes:>7} | {CALLS * CHUNKS / elapsed:>8.0f} | "
                  f"{statistics.median(alone):.2f} / {p99:.2f}")
    finally:
        topology.close()


if __name__ == "__main__":
    main()
