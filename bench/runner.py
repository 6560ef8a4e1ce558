"""The call runner against rq's own workers: calls in flight, throughput, first-chunk latency, memory, CPU.

Run by hand; it starts its own ``redis-server`` (on a free port, nothing saved) and its own mock upstream
process, so it disturbs nobody and measures neither::

    python bench/runner.py [--levels 10 100 1000] [--latency-ms 100] [--window 10] [--baseline REV]

Every call streams the same recorded answer (``--model``, 52 chunks) with ``--latency-ms`` before each chunk,
so a call lasts D = chunks x latency. For each level L, one ``python -m producer work`` process (concurrency
2L, so nothing queues) is sent calls at the rate that keeps L in flight (Little's law: L / D per second) for
D + ``--window`` seconds: D to fill up, then a steady window. ``--baseline REV`` runs the runner of that git
revision (exported to a temporary folder) beside today's, level by level, so that before and after share one
run. Then, as baselines at the same process count, one rq forking ``Worker`` and one ``SimpleWorker`` each run
the same calls with their queue never empty (one call in flight: all rq can hold in one process).

Measured, per run: calls/s and chunks/s completed; enqueue to the first chunk in Redis (the chunk's stream
id, Redis's clock, minus the enqueue time on this host's clock: one machine, one clock) p50/p99; the
process's peak RSS (with its work horses, for the forking worker); its CPU time per relayed chunk over the
steady window only (not the start, not the drain; the rq workers over their whole run, children included).

Per chunk and per call apart: each runner level runs twice, with ``--model`` and with ``--short-model`` (13
chunks), the short calls' chunks spaced so that both last D. Both runs start and end the same calls per
second; only the chunks differ. So the CPU per second they differ by is the chunks' alone: its quotient by
the chunks per second they differ by is the marginal cost of a chunk, and what is left of a run's CPU is per
call (rq's bookkeeping, the call's start and end, idle timers included). Prints tables; nothing is asserted.
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
import tempfile
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
    cpu_s: float  # over the steady window (a runner) or the whole run (rq)
    window_chunks: int  # relayed in that window
    window_calls: int  # ended in that window
    window_s: float

    def row(self) -> str:
        p50, p99 = percentile(self.first_chunk_ms, 50), percentile(self.first_chunk_ms, 99)
        return (f"| {self.label} | {self.in_flight} | {self.calls / self.seconds:.1f} | {self.chunks / self.seconds:,.0f} "
                f"| {p50:.1f} / {p99:.1f} | {self.rss_mb:.0f} | {self.per_chunk_us:,.1f} |")

    @property
    def per_chunk_us(self) -> float:
        return self.cpu_s / self.window_chunks * 1e6 if self.window_chunks else math.nan


def split(long: Run, short: Run) -> str:
    """A row of the marginal CPU of a chunk and the CPU per call, from a long-call and a short-call run at one
    level (see the module docstring)."""
    chunk_rate = (long.window_chunks / long.window_s, short.window_chunks / short.window_s)
    cpu_rate = (long.cpu_s / long.window_s, short.cpu_s / short.window_s)
    per_chunk = (cpu_rate[0] - cpu_rate[1]) / (chunk_rate[0] - chunk_rate[1] or math.nan)
    # A runner too slow to end any call within the window (saturated) has no cost per call to show.
    per_call = [(cpu - per_chunk * chunks) / (run.window_calls / run.window_s or math.nan)
                for cpu, chunks, run in zip(cpu_rate, chunk_rate, (long, short))]
    return (f"| {long.label} | {long.in_flight} | {chunk_rate[0]:,.0f} / {chunk_rate[1]:,.0f} | "
            f"{cpu_rate[0] * 100:.0f}% / {cpu_rate[1] * 100:.0f}% | {per_chunk * 1e6:,.1f} | "
            f"{per_call[0] * 1e6:,.0f} / {per_call[1] * 1e6:,.0f} |")


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
        self.chunks = self._length(args.model)
        self.duration = self.chunks * args.latency_ms / 1000
        # The short calls' chunks are spaced so that they last as long as the long ones: the same calls per second.
        short_latency = round(self.duration * 1000 / self._length(args.short_model))
        upstream = {name: {"base_url": f"http://127.0.0.1:{self.mock_port}/v1?mock_latency_ms={latency}",
                           "api_key_env": "BENCH_KEY"}
                    for name, latency in (("default", args.latency_ms), ("short", short_latency))}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("STREAMFOLD_")},
                    "STREAMFOLD_REDIS_URL": self.url, "STREAMFOLD_UPSTREAMS": json.dumps(upstream),
                    "BENCH_KEY": "sk-bench", "STREAMFOLD_UPSTREAM_READ_TIMEOUT": "120"}
        self.client = redis.Redis.from_url(self.url)
        self.latency_ms = {"default": args.latency_ms, "short": short_latency}
        self.baseline: Path | None = None

    @staticmethod
    def _length(model: str) -> int:
        return sum(1 for line in (ROOT / "fixtures/recorded" / f"{model}.jsonl").read_bytes().splitlines()
                   if line.strip())

    def __enter__(self) -> Bench:
        if self.args.baseline:
            # An export of the revision, not a worktree: its code, imported ahead of the installed package.
            self._export = tempfile.TemporaryDirectory(prefix="bench-baseline-")
            archive = subprocess.run(["git", "archive", self.args.baseline], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", self._export.name], input=archive.stdout, check=True)
            self.baseline = Path(self._export.name)
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
        if self.baseline is not None:
            self._export.cleanup()

    def settings(self, namespace: str) -> Settings:
        return Settings(redis_url=self.url, namespace=namespace, queue=namespace,
                        upstreams=json.loads(self.env["STREAMFOLD_UPSTREAMS"]))

    def runner(self, level: int, *, baseline: bool = False, upstream: str = "default",
               flush_ms: float | None = None) -> Run:
        """One call runner with ``level`` calls in flight on average, fed at the rate that keeps them so."""
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        settings = self.settings(namespace)
        command = [*self.base, "producer", "work", "--concurrency", str(2 * level), "--log-level", "WARNING",
                   "--name", f"{namespace}-runner"]
        rate = level / self.duration
        # Arrivals for one call length, to fill up to L in flight, then for the steady window.
        count = round(rate * (self.duration + self.args.window))
        label = f"runner at {self.args.baseline}" if baseline else "runner"
        if flush_ms is not None:
            label += f", flush {flush_ms:g} ms"
        if upstream == "short":
            label += ", short calls"
        env = {} if flush_ms is None else {"STREAMFOLD_RUNNER_FLUSH_MS": str(flush_ms)}
        return self._measure(label, str(level), namespace, settings, command, count, rate,
                             held=settings.keys.runner_calls(f"{namespace}-runner"),
                             code=self.baseline if baseline else None, upstream=upstream, env=env)

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
                 count: int, rate: float | None, held: str | None = None, code: Path | None = None,
                 upstream: str = "default", env: dict[str, str] | None = None) -> Run:
        env = {**self.env, **(env or {}), "STREAMFOLD_NAMESPACE": namespace, "STREAMFOLD_QUEUE": namespace}
        if code is not None:
            env["PYTHONPATH"] = str(code)
        process = subprocess.Popen(command, cwd=code or ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # started and registered
        cpu_before, peak = cpu_seconds(process.pid), rss_mb(process.pid)
        started = time.time()
        # The steady window: from one call length after the first arrival (L in flight by then) to the last.
        window: list[tuple[float, float]] = [(started, cpu_before)] if rate is None else []
        most = 0
        enqueued: dict[str, float] = {}
        model = self.args.short_model if upstream == "short" else self.args.model
        params = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        for number in range(count):
            if rate is not None:
                delay = started + number / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                if not window and time.time() >= started + self.duration:
                    window.append((time.time(), cpu_seconds(process.pid)))
                if number % 50 == 0:
                    peak, most = max(peak, rss_mb(process.pid)), max(most, self._held(held))
            at = time.time()
            enqueued[enqueue_chat_completion(params, upstream=upstream, client=self.client, settings=settings)] = at
        if rate is not None:
            window.append((time.time(), cpu_seconds(process.pid)))
        finished = FinishedJobRegistry(namespace, connection=self.client)
        failed = FailedJobRegistry(namespace, connection=self.client)
        deadline = time.time() + self.args.window + self.duration * 3 + 60
        while finished.count + failed.count < count and time.time() < deadline:
            peak, most = max(peak, rss_mb(process.pid)), max(most, self._held(held))
            time.sleep(0.2)
        seconds = time.time() - started
        if rate is None:
            window.append((time.time(), cpu_seconds(process.pid)))
        done = finished.count
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        (begin, cpu_begin), (end, cpu_end) = window
        firsts, chunks, in_window, ended = self._first_chunks(settings, enqueued, begin, end, self.latency_ms[upstream])
        return Run(label, f"{in_flight} (peak {most})" if held else in_flight, done, seconds, chunks, firsts, peak,
                   cpu_end - cpu_begin, in_window, ended, end - begin)

    def _held(self, key: str | None) -> int:
        return int(self.client.hlen(key)) if key else 0

    def _first_chunks(self, settings: Settings, enqueued: dict[str, float], begin: float, end: float,
                      latency_ms: int) -> tuple[list[float], int, int, int]:
        """Enqueue -> first chunk in Redis per request (ms), the chunks relayed in all, and the chunks relayed and
        the calls ended between ``begin`` and ``end`` (stream ids are Redis's clock: the same machine's)."""
        keys, latencies, chunks = settings.keys, [], 0
        window = (f"{int(begin * 1000)}-0", f"{int(end * 1000)}-0")
        with self.client.pipeline(transaction=False) as pipe:
            for request_id in enqueued:
                pipe.xrange(keys.chunks(request_id), count=2)
                pipe.xlen(keys.chunks(request_id))
                pipe.hget(f"rq:job:{job_id(keys, request_id)}", "started_at")
                pipe.xrange(keys.chunks(request_id), *window)
            replies = pipe.execute()
        started, in_window, ended = [], 0, 0
        for (request_id, at), entries, length, began, windowed in zip(enqueued.items(), replies[0::4], replies[1::4],
                                                                      replies[2::4], replies[3::4]):
            chunks += max(0, length - 2)
            kinds = [fields.get(b"k") for _, fields in windowed]
            in_window += kinds.count(b"chunk")
            ended += kinds.count(b"end")
            if len(entries) == 2:
                # The mock waits latency_ms before its first chunk too: that much is the upstream's, not ours.
                latencies.append(int(entries[1][0].split(b"-")[0]) - at * 1000 - latency_ms)
            if began:
                started.append((utcparse(began.decode()).timestamp() - at) * 1000)
        if self.args.verbose:
            print(f"  enqueue -> started in rq p50 / p99 ms: {percentile(started, 50):.1f} / "
                  f"{percentile(started, 99):.1f}", file=sys.stderr)
        return latencies, chunks, in_window, ended


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
    parser.add_argument("--short-model", default="openai_refusal", help="the shorter calls' recorded stream")
    parser.add_argument("--baseline", metavar="REV", help="also run the runner of this git revision, level by level")
    parser.add_argument("--no-split", action="store_true", help="skip the short-call runs (no per-call split)")
    parser.add_argument("--flush-ms", type=float, nargs="+", metavar="MS",
                        help="run today's runner once with each STREAMFOLD_RUNNER_FLUSH_MS (default: the setting's)")
    parser.add_argument("--no-baselines", action="store_true", help="skip rq's Worker and SimpleWorker")
    parser.add_argument("--verbose", action="store_true", help="also print enqueue -> started in rq, on stderr")
    args = parser.parse_args()
    with Bench(args) as bench:
        print(f"machine: {machine()}")
        print(f"calls: {args.model}, {bench.chunks} chunks, {args.latency_ms} ms apart (D = {bench.duration:.1f} s)\n")
        print("| process | calls in flight | calls/s | chunks/s | enqueue -> first chunk in Redis p50 / p99 ms "
              "| peak RSS MB | CPU µs per chunk |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        splits = []
        runners = [(True, None)] if args.baseline else []
        runners += [(False, flush_ms) for flush_ms in args.flush_ms or [None]]
        for level in args.levels:
            for baseline, flush_ms in runners:
                long = bench.runner(level, baseline=baseline, flush_ms=flush_ms)
                print(long.row(), flush=True)
                if not args.no_split:
                    short = bench.runner(level, baseline=baseline, upstream="short", flush_ms=flush_ms)
                    print(short.row(), flush=True)
                    splits.append(split(long, short))
        if not args.no_baselines:
            print(bench.rq_worker(None).row(), flush=True)
            print(bench.rq_worker("rq.worker.SimpleWorker").row(), flush=True)
        if splits:
            print("\n| process | calls in flight | chunks/s long / short | CPU long / short | µs per chunk (marginal) "
                  "| µs per call long / short |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            print("\n".join(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
