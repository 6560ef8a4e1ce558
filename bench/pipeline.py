"""The Redis pipeline end to end: one worker's throughput, finish latency under load, Redis memory per request.

Run by hand against a Redis nobody else is using (it writes only keys of fresh namespaces and deletes them)::

    python bench/pipeline.py [--redis-url redis://127.0.0.1:6379/14] [--requests 2000] [--chunks 50]
    python bench/pipeline.py --cluster [--requests 4000] [--shards 12] [--masters 1,2,3]

With ``--cluster``, only the scale-out table: burst workers on Redis Clusters of 1, 2 and 3 masters with as
many workers, next to one standalone Redis with 1, 2 and 3 workers (bench/scale_out.py); the job queue
Redis a cluster needs in settings is ``--redis-url`` (unused by the workers).

1. Throughput: ``requests`` x ``chunks`` chunk envelopes are written first; then one worker in burst mode
   (in this process) claims, reads, assembles and finishes them all. In turn with it, a bare redis-py
   consumer drains as many chunk envelopes from one stream (XREADGROUP COUNT 1000 + orjson.loads + XACK):
   the floor for any Python consumer of these entries. The best of ``rounds`` rounds of each counts.
2. Finish latency: this process paces ``live`` concurrent requests at fractions of the worker's measured
   rate (``--loads``, a quarter and a half by default) while a ``python -m worker run`` process serves
   them and a reader process notes when each result becomes readable (XREAD on the results stream).
   Latency runs from the return of the producer's write of the end marker to that moment, on the
   machine's monotonic clock. The worker's own view, the record's ``finish_lag_ms`` (its finish time
   minus the end marker's timestamp), is shown beside it.
3. Memory: Redis ``used_memory`` per request while it waits or is in flight (its chunk stream and control
   entry) and once finished (chunks kept for ``chunk_ttl``, plus result, lookup key, done marker, usage event).

Prints tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from producer.publisher import Publisher
from streamfold.connection import connect
from streamfold.contract import decode_record, encode_chunk
from streamfold.keys import Keys
from streamfold.settings import Settings
from worker.broker import Broker
from worker.runner import Worker

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "fixtures" / "recorded"


def corpus(chunks: int) -> list[list[bytes]]:
    """Streams of exactly ``chunks`` chunks cut from the long recorded streams: the first chunks of the
    answer, then its last two (the finish chunk and the usage chunk), so each assembles to a whole answer."""
    streams = []
    for path in sorted(RECORDED.glob("*.jsonl")):
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        if len(lines) >= chunks:
            streams.append(lines[:chunks - 2] + lines[-2:])
    return streams


def settings_for(url: str, namespace: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(redis_url=url, namespace=namespace, block_ms=100, claim_timeout=30.0)
    return Settings(**{**values, **overrides})


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def drop_namespace(client: redis.Redis, namespace: str) -> None:
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.delete(key)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 1. throughput and memory ---------------------------------------------------------------------------

@dataclass
class Throughput:
    worker: list[float]  # chunks/s, one per round
    bare: list[float]  # chunks/s, one per round
    finished: int
    bytes_waiting: float  # per request
    bytes_finished: float  # per request


def fill(client: redis.Redis, keys: Keys, streams: list[list[bytes]], requests: int) -> None:
    publisher = Publisher(client, keys, batch_size=2000)
    for n in range(requests):
        request_id = f"req-{n:06d}"
        publisher.start(request_id, meta={"tenant": f"t{n % 7}"})
        for chunk in streams[n % len(streams)]:
            publisher.push(request_id, chunk)
        publisher.end(request_id)
    publisher.flush()


def throughput(url: str, requests: int, chunks: int, concurrency: int, rounds: int) -> Throughput:
    """The worker and the bare consumer in turn, ``rounds`` times: on a shared machine, interleaved rounds
    meet the same neighbours."""
    result = Throughput([], [], 0, 0.0, 0.0)
    for _ in range(rounds):
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        settings = settings_for(url, namespace, concurrency=concurrency)
        client = connect(settings)
        try:
            before = used_memory(client)
            fill(client, settings.keys, corpus(chunks), requests)
            result.bytes_waiting = (used_memory(client) - before) / requests
            worker = Worker(Broker.from_settings(client, settings, "bench"), settings, burst=True)
            gc.freeze()  # as ``python -m worker run`` does
            started = time.perf_counter()
            worker.run()
            result.worker.append(requests * chunks / (time.perf_counter() - started))
            result.finished = client.xlen(settings.keys.results(0))
            result.bytes_finished = (used_memory(client) - before) / requests
        finally:
            drop_namespace(client, namespace)
            client.close()
        result.bare.append(bare_rate(url, requests * chunks))
    return result


def bare_rate(url: str, total: int) -> float:
    """Chunks per second of the simplest consumer of the same envelopes: XREADGROUP COUNT 1000 + loads + XACK."""
    client = redis.Redis.from_url(url)
    stream, group = f"bench-bare-{uuid.uuid4().hex[:8]}", "bare"
    try:
        chunks = [chunk for stream_chunks in corpus(50) for chunk in stream_chunks]
        pipe = client.pipeline(transaction=False)
        for n in range(total):
            pipe.xadd(stream, encode_chunk(chunks[n % len(chunks)], seq=n, attempt=0, ts_ms=0))  # type: ignore[arg-type]
            if n % 2000 == 1999:
                pipe.execute()
        pipe.execute()
        client.xgroup_create(stream, group, id="0")
        started = time.perf_counter()
        seen = 0
        while seen < total:
            entries = client.xreadgroup(group, "bare", {stream: ">"}, count=1000)[0][1]
            for _, fields in entries:
                orjson.loads(fields[b"d"])
            client.xack(stream, group, *[entry_id for entry_id, _ in entries])
            seen += len(entries)
        return total / (time.perf_counter() - started)
    finally:
        client.delete(stream)
        client.close()


# --- 2. finish latency ------------------------------------------------------------------------------------

@dataclass
class Latency:
    pushed: float  # chunks/s the producer kept up
    requests: int
    unseen: int
    readable_ms: list[float]  # end marker written -> result readable, seen by the reader
    worker_lag_ms: list[float]  # the records' finish_lag_ms


def read_results(url: str, namespace: str, expected: int, out: Any) -> None:
    """Reader process: when each result record becomes readable, on the machine's monotonic clock."""
    client = redis.Redis.from_url(url)
    key, cursor, seen = Keys(namespace).results(0), "0-0", {}
    deadline = time.monotonic() + 120
    while len(seen) < expected and time.monotonic() < deadline:
        for _, entries in client.xread({key: cursor}, count=1000, block=1000) or []:
            now = time.monotonic_ns()
            for entry_id, fields in entries:
                seen[fields[b"rid"].decode()] = now
                cursor = entry_id
    out.put(seen)
    client.close()


def paced(url: str, rate: float, live: int, seconds: float, chunks: int) -> Latency:
    """Push ``rate`` chunks/s spread over ``live`` concurrent requests for about ``seconds``."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    settings = settings_for(url, namespace)
    client = connect(settings)
    streams = corpus(chunks)
    requests = int(rate * seconds / chunks)
    env = {**os.environ, "STREAMFOLD_REDIS_URL": url, "STREAMFOLD_NAMESPACE": namespace, "STREAMFOLD_BLOCK_MS": "100",
           "STREAMFOLD_CONCURRENCY": str(2 * live)}  # room for every live request, or they would queue
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", "paced"], env=env, cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    results: Any = multiprocessing.Queue()
    reader = multiprocessing.Process(target=read_results, args=(url, namespace, requests, results))
    reader.start()
    ended: dict[str, int] = {}
    try:
        time.sleep(1.0)  # let the worker and the reader connect
        publisher = Publisher(client, settings.keys, batch_size=10**9)
        waiting = [(f"p-{n:06d}", streams[n % len(streams)]) for n in range(requests)]
        active: dict[str, tuple[list[bytes], int]] = {}
        sent, started = 0, time.perf_counter()
        while waiting or active:
            while len(active) < live and waiting:
                request_id, stream = waiting.pop()
                publisher.start(request_id)
                active[request_id] = (stream, 0)
            due = int(rate * (time.perf_counter() - started)) - sent
            if due <= 0:
                time.sleep(0.0002)  # the producer shares the cores with the worker and Redis
                continue
            for request_id in list(active)[:due]:
                stream, seq = active[request_id]
                publisher.push(request_id, stream[seq], seq=seq)
                sent += 1
                if seq + 1 < len(stream):
                    active[request_id] = (stream, seq + 1)
                    continue
                publisher.end(request_id)  # sends what is buffered, this end marker last
                ended[request_id] = time.monotonic_ns()
                del active[request_id]
            publisher.flush()
        pushed = sent / (time.perf_counter() - started)
        seen = results.get(timeout=150)
        reader.join()
        lags = [float(decode_record(fields[b"d"])["metrics"]["finish_lag_ms"])
                for _, fields in client.xrange(settings.keys.results(0))]
        readable = [(seen[rid] - at) / 1e6 for rid, at in ended.items() if rid in seen]
        return Latency(pushed, requests, requests - len(readable), readable, lags)
    finally:
        worker.terminate()
        worker.wait()
        if reader.is_alive():
            reader.kill()
        drop_namespace(client, namespace)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=64, help="of the burst worker")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; the best of each side counts")
    parser.add_argument("--live", type=int, default=200, help="concurrent requests in the paced run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced run")
    parser.add_argument("--loads", default="0.25,0.5",
                        help="paced runs, each at this fraction of the worker's burst rate (default: 0.25,0.5)")
    parser.add_argument("--cluster", action="store_true", help="the scale-out table instead (bench/scale_out.py)")
    parser.add_argument("--shards", type=int, default=12, help="shard tags, with --cluster")
    parser.add_argument("--masters", default="1,2,3", help="cluster sizes (and worker counts), with --cluster")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cluster:
        import scale_out
        masters = [int(count) for count in args.masters.split(",")]
        rows = scale_out.run(corpus(args.chunks), requests=args.requests, chunks=args.chunks, shards=args.shards,
                             masters=masters, rounds=args.rounds, concurrency=args.concurrency,
                             queue_url=args.redis_url)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"redis-py {redis.__version__}")
        scale_out.show(rows, requests=args.requests, chunks=args.chunks, shards=args.shards, rounds=args.rounds)
        return

    total = args.requests * args.chunks
    speed = throughput(args.redis_url, args.requests, args.chunks, args.concurrency, args.rounds)
    capacity, bare = max(speed.worker), max(speed.bare)
    loads = [float(load) for load in args.loads.split(",")]
    runs = [(load, paced(args.redis_url, capacity * load, args.live, args.seconds, args.chunks)) for load in loads]

    server = redis.Redis.from_url(args.redis_url)
    version = server.info("server")["redis_version"]
    server.close()
    parser_name = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python RESP parser"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Redis {version}, redis-py {redis.__version__} ({parser_name})")
    print(f"\nthroughput: {args.requests} requests x {args.chunks} chunks = {total} chunks, best of {args.rounds} "
          "rounds (each round's figure in brackets)")
    rounds = [("bare redis-py (XREADGROUP 1000 + loads + XACK)", speed.bare),
              (f"worker, burst, concurrency {args.concurrency}", speed.worker)]
    print(f"  {'consumer':<48} {'chunks/s':>10}")
    for name, rates in rounds:
        print(f"  {name:<48} {max(rates):>10,.0f}   ({', '.join(f'{rate:,.0f}' for rate in rates)})")
    print(f"  {'worker / bare':<48} {capacity / bare:>10.0%}   ({speed.finished} results per round)")
    print(f"\nfinish latency, ms from the end marker written to the result readable ({args.live} requests live at "
          f"a time; the worker's own finish_lag_ms in brackets)")
    print(f"  {'load':>5} {'chunks/s':>9} {'requests':>8} {'p50':>12} {'p90':>12} {'p99':>12} {'max':>12}")
    for load, latency in runs:
        cells = " ".join(f"{percentile(latency.readable_ms, q):>6.1f} ({percentile(latency.worker_lag_ms, q):>3.0f})"
                         for q in (0.5, 0.9, 0.99, 1.0))
        unseen = f"  {latency.unseen} not seen" if latency.unseen else ""
        print(f"  {load:>5.0%} {latency.pushed:>9,.0f} {latency.requests:>8} {cells}{unseen}")
    print(f"\nRedis memory per request of {args.chunks} chunks:")
    print(f"  waiting or in flight (chunk stream + control entry)  {speed.bytes_waiting:>8,.0f} B")
    print(f"  finished, until chunk_ttl (+ result, key, marker, usage) {speed.bytes_finished:>6,.0f} B")


if __name__ == "__main__":
    main()
