"""``python bench/pipeline.py --cluster``: the worker pool's throughput on Redis Clusters of 1, 2 and 3 masters
with as many workers, next to one standalone Redis with the same numbers of workers.

Each Redis is started for the run on loopback (Debian's ``redis-server``, as tests/topology.py starts them;
the standalone one the same way, without cluster mode). Per row: ``requests`` x ``chunks`` chunk envelopes
are written first, spread over ``shards`` shard tags (the same for every row, so only the topology differs);
then ``workers`` ``python -m worker run --burst`` processes drain them. The rate counts the chunks finished
from the first result readable to the last, so that process start-up is left out. The best of ``rounds``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/topology.py starts the servers, as the cluster tests do

from producer.publisher import Publisher  # noqa: E402
from streamfold.connection import connect  # noqa: E402
from streamfold.keys import Keys  # noqa: E402
from streamfold.settings import Settings  # noqa: E402
from tests.topology import Topology, start_cluster  # noqa: E402


@dataclass
class Row:
    topology: str
    masters: int
    workers: int
    rates: list[float]  # chunks/s, one per round


def fill(client: redis.Redis, keys: Keys, streams: list[list[bytes]], requests: int) -> None:
    publisher = Publisher(client, keys, batch_size=2000)
    for n in range(requests):
        request_id = f"req-{n:06d}"
        publisher.start(request_id)
        for chunk in streams[n % len(streams)]:
            publisher.push(request_id, chunk)
        publisher.end(request_id)
    publisher.flush()


def finished(client: redis.Redis, keys: Keys) -> int:
    with client.pipeline(transaction=False) as pipe:
        for shard in keys.shard_ids():
            pipe.xlen(keys.results(shard))
        return sum(pipe.execute())


def drain_rate(settings: Settings, streams: list[list[bytes]], requests: int, chunks: int, workers: int,
               concurrency: int) -> float:
    """Fill, then drain with ``workers`` burst processes; chunks/s from the first result to the last."""
    client = connect(settings)
    try:
        fill(client, settings.keys, streams, requests)
        env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
        env.update({"STREAMFOLD_REDIS_URL": settings.redis_url, "STREAMFOLD_REDIS_CLUSTER": str(settings.redis_cluster),
                    "STREAMFOLD_QUEUE_REDIS_URL": settings.queue_redis_url or "", "STREAMFOLD_NAMESPACE":
                    settings.namespace, "STREAMFOLD_SHARDS": str(settings.shards), "STREAMFOLD_BLOCK_MS": "100",
                    "STREAMFOLD_CONCURRENCY": str(concurrency), "PYTHONPATH": str(ROOT)})
        pool = [subprocess.Popen([sys.executable, "-m", "worker", "run", "--burst", "--name", f"bench-{number}"],
                                 env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for number in range(workers)]
        first_at, first = None, 0
        while True:
            done = finished(client, settings.keys)
            now = time.perf_counter()
            if first_at is None and done:
                first_at, first = now, done
            if done >= requests:
                break
            if all(process.poll() is not None for process in pool):
                raise RuntimeError(f"the workers exited with {done} of {requests} requests finished")
            time.sleep(0.005)
        for process in pool:
            process.wait(60)
        assert first_at is not None
        return (requests - first) * chunks / max(now - first_at, 1e-6)
    finally:
        client.close()


def standalone(root: Path) -> tuple[Topology, str]:
    topology = Topology(root)
    server = topology.start("standalone")
    return topology, f"redis://127.0.0.1:{server.port}/0"


def run(streams: list[list[bytes]], *, requests: int, chunks: int, shards: int, masters: list[int], rounds: int,
        concurrency: int, queue_url: str) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="streamfold-scale-") as scratch:
        topology, url = standalone(Path(scratch) / "standalone")
        try:
            for workers in masters:
                row = Row("standalone", 1, workers, [])
                for _ in range(rounds):
                    settings = Settings(redis_url=url, namespace=f"bench-{uuid.uuid4().hex[:8]}", shards=shards)
                    row.rates.append(drain_rate(settings, streams, requests, chunks, workers, concurrency))
                    redis.Redis.from_url(url).flushall()
                rows.append(row)
        finally:
            topology.close()
        for count in masters:
            topology, nodes = start_cluster(Path(scratch) / f"cluster-{count}", count)
            try:
                row = Row("cluster", count, count, [])
                for _ in range(rounds):
                    settings = Settings(redis_url=f"redis://127.0.0.1:{nodes[0].port}", redis_cluster=True,
                                        queue_redis_url=queue_url, namespace=f"bench-{uuid.uuid4().hex[:8]}",
                                        shards=shards)
                    row.rates.append(drain_rate(settings, streams, requests, chunks, count, concurrency))
                    for node in nodes:
                        node.client().flushall()
                rows.append(row)
            finally:
                topology.close()
    return rows


def show(rows: list[Row], *, requests: int, chunks: int, shards: int, rounds: int) -> None:
    print(f"\nscale-out: {requests} requests x {chunks} chunks over {shards} shard tags, drained by burst workers; "
          f"best of {rounds} rounds (each round in brackets)")
    print(f"  {'Redis':<22} {'masters':>7} {'workers':>7} {'chunks/s':>10}")
    for row in rows:
        rounds_text = ", ".join(f"{rate:,.0f}" for rate in row.rates)
        print(f"  {row.topology:<22} {row.masters:>7} {row.workers:>7} {max(row.rates):>10,.0f}   ({rounds_text})")
