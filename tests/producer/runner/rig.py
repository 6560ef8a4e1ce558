"""A whole pipeline on a real Redis for runner tests: the mock upstream, runner processes, a stream worker.

Runners are real processes (``python -m producer work``), so that kill -9 and SIGTERM are real; the stream
worker runs in burst mode after the calls, and results are read as a backend reads them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.job import Job

from producer import enqueue_chat_completion, wait_for_result
from producer.jobs import job_id
from producer.mock_upstream import MockUpstream
from streamfold import contract
from streamfold.connection import connect
from streamfold.settings import Settings
from tests.conftest import ROOT

KEY_ENV = "STREAMFOLD_RUNNER_TEST_KEY"
MESSAGES = [{"role": "user", "content": "hi"}]
SHORT = "openai_refusal"  # 13 chunks
LONG = "alibaba_qwen3max_reasoning"  # 275 chunks
FAULTS = {
    "default": "",
    "paced": "?mock_latency_ms=20",
    "slow": "?mock_latency_ms=100",
    "flaky": "?mock_latency_ms=5&mock_disconnect_after=3&mock_fail_times=5&mock_key=flaky",
    "rate_limited": "?mock_status=429&mock_retry_after=1&mock_fail_times=3&mock_key=rate",
}


@dataclass
class Rig:
    settings: Settings
    client: redis.Redis
    upstream: MockUpstream
    env: dict[str, str]
    request_ids: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def enqueue(self, model: str = SHORT, upstream: str = "default") -> str:
        request_id = enqueue_chat_completion({"model": model, "messages": MESSAGES}, upstream=upstream,
                                             meta={"model": model}, client=self.client, settings=self.settings)
        self.request_ids.append(request_id)
        return request_id

    def runner(self, *args: str, **env: str) -> subprocess.Popen[str]:
        """A runner process; settings from the rig's environment plus ``env`` (STREAMFOLD_ names)."""
        process = subprocess.Popen([sys.executable, "-m", "producer", "work", *args], env={**self.env, **env},
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def assemble(self) -> None:
        done = subprocess.run([sys.executable, "-m", "worker", "run", "--burst"], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    def result(self, request_id: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for_result(request_id, timeout, client=self.client, settings=self.settings)

    def published(self, request_id: str) -> tuple[int, int]:
        """How many result records and usage events the request got."""
        keys, shard = self.settings.keys, self.settings.keys.shard(request_id)
        counts = []
        for stream in (keys.results(shard), keys.usage(shard)):
            counts.append(sum(1 for _, fields in self.client.xrange(stream)
                              if fields[contract.RID] == request_id.encode()))
        return counts[0], counts[1]

    def job(self, request_id: str) -> Job:
        return Job.fetch(job_id(self.settings.keys, request_id), connection=self.client)

    def streaming(self, request_id: str, chunks: int = 2) -> bool:
        """Whether the call has pushed at least ``chunks`` entries beyond its start."""
        return bool(self.client.xlen(self.settings.keys.chunks(request_id)) > chunks)

    def stop(self, process: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> str:
        """Signal a runner and wait for it; returns its output."""
        process.send_signal(sig)
        return self.finish(process, timeout)

    @staticmethod
    def finish(process: subprocess.Popen[str], timeout: float = 60) -> str:
        """Wait for a runner to exit; returns its output. One that does not exit in time fails the test with
        where each task of its event loop waits (SIGUSR1) and every thread's stack (PYTHONFAULTHANDLER, on
        SIGABRT), so that it says where it waits."""
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # where each task of its loop waits
            time.sleep(1)
            process.send_signal(signal.SIGABRT)
            output, _ = process.communicate(timeout=10)
            raise AssertionError(f"the runner did not exit within {timeout:g} s:\n{output[-40000:]}") from None
        return output


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def rig(redis_url: str, namespace: str) -> Iterator[Rig]:
    with MockUpstream() as upstream:
        table = {name: {"base_url": upstream.base_url + query, "api_key_env": KEY_ENV} for name, query in FAULTS.items()}
        env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
        env.update({"PYTHONFAULTHANDLER": "1", "STREAMFOLD_REDIS_URL": redis_url, "STREAMFOLD_NAMESPACE": namespace,
                    "STREAMFOLD_QUEUE": namespace, "STREAMFOLD_UPSTREAMS": json.dumps(table),
                    "STREAMFOLD_UPSTREAM_RETRIES": "6", "STREAMFOLD_UPSTREAM_BACKOFF": "0.05",
                    "STREAMFOLD_RUNNER_LEASE": "2", "STREAMFOLD_LOG_FORMAT": "json", KEY_ENV: "sk-runner-test"})
        settings = Settings(redis_url=redis_url, namespace=namespace, queue=namespace, upstreams=table)
        client = connect(settings)
        the_rig = Rig(settings, client, upstream, env)
        try:
            yield the_rig
        finally:
            for process in the_rig.processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            job_ids = [job_id(settings.keys, request_id) for request_id in the_rig.request_ids]
            for name in client.scan_iter(match="rq:*", count=1000):
                if any(part in name.decode() for part in [namespace, *job_ids]):
                    client.delete(name)
            client.srem("rq:queues", f"rq:queue:{namespace}")
            for worker in client.smembers("rq:workers"):
                if namespace in worker.decode():
                    client.srem("rq:workers", worker)
            client.close()
