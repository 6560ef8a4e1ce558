"""Where a call runner's CPU goes, part by part: each part timed alone, in this process, by its CPU time.

Run by hand; it starts its own ``redis-server`` (a free port, nothing saved) and mock upstream process::

    python bench/runner_parts.py

- upstream read: ``UpstreamClient`` streaming 200 calls at once from the mock upstream (a process of its own, 5 ms
  between chunks), of a 13-chunk and of a 52-chunk answer; what they differ by per chunk is the cost of reading
  a chunk, the rest the cost of a call;
- Redis batch: the Batcher's round trip (one packed write of XADDs, the replies read back) in batches of 1, 8
  and 64 chunks, over TCP on loopback;
- rq bookkeeping per job: ``RqBridge.take`` one job at a time and eight at a time, then rq's own success handling
  per job against ``succeed_all`` for eight jobs together;
- cancel watch: one look at every call's cancel key, 100 and 1,000 calls watched.

Prints a table; nothing is asserted. The machine's other load moves every number; compare within one run.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hiredis
import redis
import uvloop

from producer import enqueue_chat_completion
from producer.runner.bridge import RqBridge, Taken
from producer.runner.call import CancelWatch
from streamfold.connection import connect_async
from producer.upstream import UpstreamClient
from streamfold.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHUNK = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
        b'"delta":{"content":"hello"},"finish_reason":null}]}'


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    before = cpu()
    await work()
    return cpu() - before


async def upstream_read(port: int) -> list[str]:
    async with UpstreamClient(f"http://127.0.0.1:{port}/v1?mock_latency_ms=5", connections=200) as client:
        async def call(model: str) -> int:
            params = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return sum([1 async for _ in client.stream(params)])

        results = []
        for model in ("openai_refusal", "deepseek_reasoner_tool_call"):
            await asyncio.gather(*(call(model) for _ in range(200)))  # connections made, code warm
            counts: list[int] = []

            async def calls(model: str = model, counts: list[int] = counts) -> None:
                counts.extend(await asyncio.gather(*(call(model) for _ in range(200))))
            spent = await timed(calls)
            results.append((counts[0], spent / 200))
    (short, short_s), (long, long_s) = results
    chunk = (long_s - short_s) / (long - short)
    return [f"| upstream read, per chunk | {chunk * 1e6:.1f} |",
            f"| upstream read, per call (request, answer's head, end) | {(short_s - short * chunk) * 1e6:.0f} |"]


async def redis_batch(url: str) -> list[str]:
    client = redis.asyncio.Redis.from_url(url)
    pool = client.connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)
    rows = []
    for size in (1, 8, 64):
        rounds = 4000 // size

        async def send(size: int = size, rounds: int = rounds) -> None:
            for _ in range(rounds):
                commands: list[tuple[Any, ...]] = [("XADD", "bench:parts", "*", "k", b"chunk", "seq", b"%d" % n, "d", CHUNK)
                            for n in range(size)]
                await connection.send_packed_command(b"".join(map(hiredis.pack_command, commands)))
                for _ in commands:
                    await connection.read_response()
        await send(size, 10)
        rows.append(f"| Redis batch of {size}, per chunk | {await timed(send) / (rounds * size) * 1e6:.1f} |")
    await client.delete("bench:parts")
    await connection.disconnect()
    await client.aclose()
    return rows


def rq_jobs(url: str) -> list[str]:
    client = redis.Redis.from_url(url)
    settings = Settings(redis_url=url, namespace="parts", queue="parts", upstreams={"default": {"base_url": "http://x"}})
    bridge = RqBridge(client, settings.queue, "parts-runner", heartbeat_s=30)
    bridge.join()
    params = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    rows = []
    for at_once in (1, 8):
        jobs = 200
        for _ in range(jobs):
            enqueue_chat_completion(params, client=client, settings=settings)
        before, taken = cpu(), list[Taken]()
        while len(taken) < jobs:
            taken += bridge.take(at_once, None)[0]
        took = cpu() - before
        before = cpu()
        if at_once == 1:
            for item in taken:
                bridge.succeed(item, {"ok": True})
        else:
            for at in range(0, jobs, at_once):
                bridge.succeed_all([(item, {"ok": True}) for item in taken[at:at + at_once]])
        ended = cpu() - before
        how = "rq's own success handling" if at_once == 1 else f"succeed_all, {at_once} together"
        rows.append(f"| rq: take, {at_once} at a time, per job | {took / jobs * 1e6:.0f} |")
        rows.append(f"| rq: end, {how}, per job | {ended / jobs * 1e6:.0f} |")
    bridge.leave()
    client.close()
    return rows


async def cancel_watch(url: str) -> list[str]:
    settings = Settings(redis_url=url, upstreams={"default": {"base_url": "http://x"}})
    client = connect_async(settings)
    rows = []

    class Watched:
        def __init__(self) -> None:
            self.request_id = uuid.uuid4().hex

    for calls in (100, 1000):
        watch = CancelWatch(client, settings.keys)
        for _ in range(calls):
            watch.watch(Watched())  # type: ignore[arg-type]
        await watch.check()

        async def looks(watch: CancelWatch = watch) -> None:
            for _ in range(100):
                await watch.check()
        spent = await timed(looks) / 100
        rows.append(f"| cancel watch, one look at {calls:,} calls (10 a second), per call | {spent / calls * 1e6:.1f} |")
    await client.aclose()
    return rows


def main() -> int:
    redis_port, mock_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    mock = subprocess.Popen([sys.executable, "-m", "producer", "mock-upstream", "--port", str(mock_port)], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                socket.create_connection(("127.0.0.1", mock_port)).close()
                break
            except (redis.ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print("| part | CPU µs |\n| --- | ---: |")
        for row in [*uvloop.run(upstream_read(mock_port)), *uvloop.run(redis_batch(url)), *rq_jobs(url),
                    *uvloop.run(cancel_watch(url))]:
            print(row, flush=True)
    finally:
        for process in (mock, server):
            process.terminate()
            process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
