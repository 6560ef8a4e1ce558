"""The call runner against rq's own workers: calls in flight, throughput, first-chunk latency, memory, CPU.

Run by hand; it starts its own ``redis-server`` (on a free port, nothing saved) and its own mock upstream
process, so it disturbs nobody and measures neither::

    python bench/runner.py [--levels 10 100 1000] [--latency-ms 100] [--window 10]

Every call streams the same recorded answer (``--model``, 52 chunks) with ``--latency-ms`` before each chunk,
so a call lasts D = chunks x latency. For each level L, one ``python -m producer work`` process (concurrency
2L, so nothing queues) is sent calls at the rate that keeps L in flight (Little's law: L / D per second) for
``--window`` seconds. Then, as baselines at the same process count, one rq forking ``Worker`` and one
``SimpleWorker`` each run the same calls for the same window with their queue never empty (one call in
flight: all rq can hold in one process).

Measured, per run: calls/s and chunks/s completed; enqueue to the first chunk in Redis (the chunk's stream
id, Redis's clock, minus the enqueue time on this host's clock: one machine, one clock) p50/p99; the
process's peak RSS (with its work horses, for the forking worker); its CPU time (children included) per
relayed chunk. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from rq.utils import utcparse

from producer import enqueue_chat_completion
from producer.jobs import job_id
from streamfold.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    label: str
    in_flight: str
    calls: int
    seconds: float
    chunks: int
    first_chunk_ms: list[float]
    rss_mb: float
    cpu_s: float

    def row(self) -> str:
        p50, p99 = percentile(self.first_chunk_ms, 50), percentile(self.first_chunk_ms, 99)
        per_chunk = self.cpu_s / self.chunks * 1e6 if self.chunks else math.nan
        return (f"| {self.label} | {self.in_flight} | {self.calls / self.seconds:.1f} | {self.chunks / self.seconds:,.0f} "
                f"| {p50:.1f} / {p99:.1f} | {self.rss_mb:.0f} | {per_chunk:.1f} |")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and of its children it waited for (rq's work horses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its live children, MB."""
    total = 0
    for candidate in [pid, *children(pid)]:
        try:
            status = Path(f"/proc/{candidate}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis_port, self.mock_port = free_port(), free_port()
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.base = [sys.executable, "-m"]
        upstream = {"default": {"base_url": f"http://127.0.0.1:{self.mock_port}/v1?mock_latency_ms={args.latency_ms}",
                                "api_key_env": "BENCH_KEY"}}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("STREAMFOLD_")},
                    "STREAMFOLD_REDIS_URL": self.url, "STREAMFOLD_UPSTREAMS": json.dumps(upstream),
                    "BENCH_KEY": "sk-bench", "STREAMFOLD_UPSTREAM_READ_TIMEOUT": "120"}
        self.client = redis.Redis.from_url(self.url)
        self.chunks = sum(1 for line in (ROOT / "fixtures/recorded" / f"{args.model}.jsonl").read_bytes().splitlines()
                          if line.strip())
        self.duration = self.chunks * args.latency_ms / 1000

    def __enter__(self) -> Bench:
        self.redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port),
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        self.mock = subprocess.Popen([*self.base, "producer", "mock-upstream", "--port", str(self.mock_port)],
                                     cwd=ROOT, env=self.env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                socket.create_connection(("127.0.0.1", self.mock_port)).close()
                return self
            except (redis.ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        for process in (self.mock, self.redis):
            process.terminate()
            process.wait(10)

    def settings(self, namespace: str) -> Settings:
        return Settings(redis_url=self.url, namespace=namespace, queue=namespace,
                        upstreams=json.loads(self.env["STREAMFOLD_UPSTREAMS"]))

    def runner(self, level: int) -> Run:
        """One call runner with ``level`` calls in flight on average, fed at the rate that keeps them so."""
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        settings = self.settings(namespace)
        command = [*self.base, "producer", "work", "--concurrency", str(2 * level), "--log-level", "WARNING",
                   "--name", f"{namespace}-runner"]
        rate = level / self.duration
        # Arrivals for at least one and a half call lengths, so that L calls are held at once for a while.
        count = max(level, round(rate * max(self.args.window, 1.5 * self.duration)))
        return self._measure("runner", str(level), namespace, settings, command, count, rate,
                             held=settings.keys.runner_calls(f"{namespace}-runner"))

    def rq_worker(self, worker_class: str | None) -> Run:
        """rq's own worker, one process, its queue never empty for the window."""
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        settings = self.settings(namespace)
        command = [str(Path(sys.executable).with_name("rq")), "worker", "--url", self.url, "--quiet", namespace]
        if worker_class:
            command[2:2] = ["--worker-class", worker_class]
        count = max(2, math.ceil(self.args.window / self.duration))
        label = "rq SimpleWorker" if worker_class else "rq Worker (forking)"
        return self._measure(label, "1", namespace, settings, command, count, rate=None)

    def _measure(self, label: str, in_flight: str, namespace: str, settings: Settings, command: list[str],
                 count: int, rate: float | None, held: str | None = None) -> Run:
        env = {**self.env, "STREAMFOLD_NAMESPACE": namespace, "STREAMFOLD_QUEUE": namespace}
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # started and registered
        cpu_before, peak = cpu_seconds(process.pid), rss_mb(process.pid)
        started = time.time()
        most = 0
        enqueued: dict[str, float] = {}
        params = {"model": self.args.model, "messages": [{"role": "user", "content": "hi"}]}
        for number in range(count):
            if rate is not None:
                delay = started + number / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                if number % 50 == 0:
                    peak, most = max(peak, rss_mb(process.pid)), max(most, self._held(held))
            at = time.time()
            enqueued[enqueue_chat_completion(params, client=self.client, settings=settings)] = at
        finished = FinishedJobRegistry(namespace, connection=self.client)
        failed = FailedJobRegistry(namespace, connection=self.client)
        deadline = time.time() + self.args.window + self.duration * 3 + 60
        while finished.count + failed.count < count and time.time() < deadline:
            peak, most = max(peak, rss_mb(process.pid)), max(most, self._held(held))
            time.sleep(0.2)
        seconds = time.time() - started
        cpu = cpu_seconds(process.pid) - cpu_before
        done = finished.count
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        firsts, chunks = self._first_chunks(settings, enqueued)
        return Run(label, f"{in_flight} (peak {most})" if held else in_flight, done, seconds, chunks, firsts, peak,
                   cpu)

    def _held(self, key: str | None) -> int:
        return int(self.client.hlen(key)) if key else 0

    def _first_chunks(self, settings: Settings, enqueued: dict[str, float]) -> tuple[list[float], int]:
        """Enqueue -> first chunk in Redis per request (ms), and the chunks relayed in all."""
        keys, latencies, chunks = settings.keys, [], 0
        with self.client.pipeline(transaction=False) as pipe:
            for request_id in enqueued:
                pipe.xrange(keys.chunks(request_id), count=2)
                pipe.xlen(keys.chunks(request_id))
                pipe.hget(f"rq:job:{job_id(keys, request_id)}", "started_at")
            replies = pipe.execute()
        started = []
        for (request_id, at), entries, length, began in zip(enqueued.items(), replies[0::3], replies[1::3],
                                                            replies[2::3]):
            chunks += max(0, length - 2)
            if len(entries) == 2:
                # The mock waits latency_ms before its first chunk too: that much is the upstream's, not ours.
                latencies.append(int(entries[1][0].split(b"-")[0]) - at * 1000 - self.args.latency_ms)
            if began:
                started.append((utcparse(began.decode()).timestamp() - at) * 1000)
        if self.args.verbose:
            print(f"  enqueue -> started in rq p50 / p99 ms: {percentile(started, 50):.1f} / "
                  f"{percentile(started, 99):.1f}", file=sys.stderr)
        return latencies, chunks


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, Redis {version.removeprefix('v=')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--latency-ms", type=int, default=100, help="mock upstream latency before each chunk")
    parser.add_argument("--window", type=float, default=10.0, help="seconds calls arrive for")
    parser.add_argument("--model", default="deepseek_reasoner_tool_call", help="recorded stream every call replays")
    parser.add_argument("--no-baselines", action="store_true", help="skip rq's Worker and SimpleWorker")
    parser.add_argument("--verbose", action="store_true", help="also print enqueue -> started in rq, on stderr")
    args = parser.parse_args()
    with Bench(args) as bench:
        print(f"machine: {machine()}")
        print(f"calls: {args.model}, {bench.chunks} chunks, {args.latency_ms} ms apart (D = {bench.duration:.1f} s)\n")
        print("| process | calls in flight | calls/s | chunks/s | enqueue -> first chunk in Redis p50 / p99 ms "
              "| peak RSS MB | CPU µs per chunk |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for level in args.levels:
            print(bench.runner(level).row(), flush=True)
        if not args.no_baselines:
            print(bench.rq_worker(None).row(), flush=True)
            print(bench.rq_worker("rq.worker.SimpleWorker").row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
