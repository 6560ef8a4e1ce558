"""Following live through the gateway against calling the upstream directly: time to first token, relay latency.

Run by hand; it starts its own ``redis-server`` (free port, nothing saved), mock upstream, stream worker, call
runner and one gateway process, so it disturbs nobody and measures neither::

    python bench/live.py [--levels 10 100 1000] [--latency-ms 100] [--window 15]

Every call streams the same recorded answer (``--model``) with ``--latency-ms`` before each chunk. For each
level L, L clients each loop for ``--window`` seconds: POST a streamed chat completion, read it to
``[DONE]``, POST again - so L streams are open at once. The same client code does it twice, side by side:

* **direct**: to the mock upstream itself;
* **gateway**: to ``python -m producer serve``, so each call goes enqueue -> rq -> call runner -> Redis
  chunk stream -> gateway -> client.

Measured per level: time to first token (POST sent to the first chunk whose delta holds text, reasoning or a
tool call) p50/p99 for each path and what the gateway adds (gateway minus direct, percentile by percentile);
relay latency, the time from a chunk's entry in Redis (its stream id is Redis's clock; one machine, one
clock) to the client holding it, p50/p99; the gateway process's peak RSS and CPU time per relayed chunk; and
calls that failed. The client is one asyncio process with ``httpx``; its own CPU is printed too, because on a
small machine the client competes with what it measures. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import cpu_seconds, free_port, machine, percentile, rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    first_token_ms: list[float] = field(default_factory=list)
    relay_ms: list[float] = field(default_factory=list)
    calls: int = 0
    chunks: int = 0
    failed: int = 0
    client_cpu_s: float = 0.0
    why: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.why[why] += 1


def _tokens(chunk: dict[str, object]) -> bool:
    """Whether a chat chunk carries something a person would see: text, reasoning or a tool call."""
    for choice in chunk.get("choices") or []:  # type: ignore[attr-defined]
        delta = choice.get("delta") or {}
        if any(delta.get(name) for name in ("content", "reasoning_content", "reasoning", "refusal", "tool_calls")):
            return True
    return False


async def one_call(client: httpx.AsyncClient, url: str, body: dict[str, object], sample: Sample,
                   relayed: bool) -> None:
    sent = time.monotonic()
    first = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            sample.fail(f"HTTP {response.status_code}")
            return
        event_id = None
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                sample.fail(f"error event: {chunk['error'].get('type') if isinstance(chunk['error'], dict) else '?'}")
                return
            sample.chunks += 1
            if first is None and _tokens(chunk):
                first = (time.monotonic() - sent) * 1000
            if relayed and event_id:
                # The token is <entry id>.<n>; the entry id's first part is Redis's clock when it was added.
                sample.relay_ms.append(time.time() * 1000 - int(event_id.split("-", 1)[0]))
    if first is None:
        sample.fail("no token")
        return
    sample.first_token_ms.append(first)
    sample.calls += 1


async def drive(url: str, level: int, window: float, model: str, relayed: bool) -> Sample:
    """``level`` clients, each calling in a loop for ``window`` seconds; starts spread over the first second."""
    sample = Sample()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    limits = httpx.Limits(max_connections=level + 10, max_keepalive_connections=level + 10)
    cpu = time.process_time()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits) as client:
        stop = time.monotonic() + window

        async def loop(number: int) -> None:
            await asyncio.sleep(number / level)
            while time.monotonic() < stop:
                try:
                    await one_call(client, url, body, sample, relayed)
                except httpx.HTTPError as exc:
                    sample.fail(type(exc).__name__)

        await asyncio.gather(*(loop(number) for number in range(level)))
    sample.client_cpu_s = time.process_time() - cpu
    return sample


class Stack:
    """redis-server, mock upstream, worker, call runner and gateway, each its own process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        ports = {name: free_port() for name in ("redis", "mock", "gateway")}
        self.redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
        self.redis_port, self.mock_port, self.gateway_port = ports["redis"], ports["mock"], ports["gateway"]
        self.direct_url = f"http://127.0.0.1:{self.mock_port}/v1/chat/completions?mock_latency_ms={args.latency_ms}"
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}/v1/chat/completions"
        upstream = {"default": {"base_url": f"http://127.0.0.1:{self.mock_port}/v1?mock_latency_ms={args.latency_ms}",
                                "api_key_env": "BENCH_KEY"}}
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("STREAMFOLD_")},
                    "STREAMFOLD_REDIS_URL": self.redis_url, "STREAMFOLD_UPSTREAMS": json.dumps(upstream),
                    "STREAMFOLD_NAMESPACE": namespace, "STREAMFOLD_QUEUE": namespace, "BENCH_KEY": "sk-bench",
                    "STREAMFOLD_UPSTREAM_READ_TIMEOUT": "120", "STREAMFOLD_LOG_LEVEL": "WARNING"}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Stack:
        concurrency = str(2 * max(self.args.levels))
        commands = {
            "redis": [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port), "--save", "",
                      "--appendonly", "no"],
            "mock": [sys.executable, "-m", "producer", "mock-upstream", "--port", str(self.mock_port)],
            "worker": [sys.executable, "-m", "worker", "run"],
            "runner": [sys.executable, "-m", "producer", "work", "--concurrency", concurrency],
            "gateway": [sys.executable, "-m", "producer", "serve", "--port", str(self.gateway_port)],
        }
        self.logs = Path(tempfile.mkdtemp(prefix="streamfold-live-"))
        for name, command in commands.items():
            with (self.logs / f"{name}.log").open("wb") as log:  # warnings and errors only, kept for a look after
                self.processes[name] = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log,
                                                        stderr=subprocess.STDOUT)
            if name == "redis":
                self._wait(lambda: redis.Redis.from_url(self.redis_url).ping())
        self._wait(lambda: httpx.get(f"http://127.0.0.1:{self.gateway_port}/healthz").raise_for_status())
        return self

    def _wait(self, ready: object) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                ready()  # type: ignore[operator]
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        for process in reversed(list(self.processes.values())):
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    @property
    def gateway_pid(self) -> int:
        return self.processes["gateway"].pid


def row(label: str, level: int, direct: Sample, relayed: Sample, rss: float, gateway_cpu: float) -> str:
    def pair(values: list[float]) -> tuple[float, float]:
        return percentile(values, 50), percentile(values, 99)

    d50, d99 = pair(direct.first_token_ms)
    g50, g99 = pair(relayed.first_token_ms)
    r50, r99 = pair(relayed.relay_ms)
    per_chunk = gateway_cpu / relayed.chunks * 1e6 if relayed.chunks else math.nan
    return (f"| {label} | {level} | {relayed.calls} ({relayed.failed} failed) | {d50:.1f} / {d99:.1f} "
            f"| {g50:.1f} / {g99:.1f} | **{g50 - d50:.1f} / {g99 - d99:.1f}** | {r50:.1f} / {r99:.1f} "
            f"| {rss:.0f} | {per_chunk:.0f} | {direct.client_cpu_s:.1f} / {relayed.client_cpu_s:.1f} |")


async def measure(stack: Stack, level: int, args: argparse.Namespace) -> tuple[str, Sample, Sample]:
    direct = await drive(stack.direct_url, level, args.window, args.model, relayed=False)
    cpu_before = cpu_seconds(stack.gateway_pid)
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(stack.gateway_pid))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    relayed = await drive(stack.gateway_url, level, args.window, args.model, relayed=True)
    watcher.cancel()
    return row(args.model, level, direct, relayed, peak, cpu_seconds(stack.gateway_pid) - cpu_before), direct, relayed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[10, 100, 1000], help="concurrent streams")
    parser.add_argument("--latency-ms", type=int, default=100, help="mock upstream latency before each chunk")
    parser.add_argument("--window", type=float, default=15.0, help="seconds each level's clients keep calling")
    parser.add_argument("--model", default="deepseek_reasoner_tool_call", help="recorded stream every call replays")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    with Stack(args) as stack:
        print(f"machine: {machine()}; logs in {stack.logs}")
        print(f"calls: {args.model}, {args.latency_ms} ms before each chunk, {args.window:.0f} s per level\n")
        print("| stream | concurrent | calls through the gateway | first token direct p50 / p99 ms "
              "| through the gateway p50 / p99 ms | added p50 / p99 ms | relay Redis -> client p50 / p99 ms "
              "| gateway peak RSS MB | gateway CPU µs / chunk | client CPU s direct / gateway |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        failures = []
        for level in args.levels:
            line, direct, relayed = asyncio.run(measure(stack, level, args))
            print(line, flush=True)
            failures += [f"{level} streams, {path}: {dict(sample.why)}"
                         for path, sample in (("direct", direct), ("gateway", relayed)) if sample.why]
        if failures:
            print("\nfailed calls, by why:\n" + "\n".join(failures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
