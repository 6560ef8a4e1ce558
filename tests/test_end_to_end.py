"""End to end on a real Redis: a backend enqueues LLM calls, a real rq worker calls the mock upstream, the
stream worker assembles what was pushed. Every request ends in the right status with exactly one result record
and one usage event, nothing is duplicated, and the API key is found neither in Redis nor in any log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer import cancel, enqueue_chat_completion, wait_for_result
from producer.jobs import job_id
from producer.mock_upstream import DEFAULT_FIXTURE_DIRS, MockUpstream
from streamfold import contract
from streamfold.connection import connect
from streamfold.settings import Settings
from tests.conftest import ROOT, load_jsonl
from worker import assemble

pytestmark = pytest.mark.redis

FIXTURES = {path.stem: path for directory in DEFAULT_FIXTURE_DIRS for path in directory.glob("*.jsonl")}
KEY_ENV = "STREAMFOLD_E2E_API_KEY"
MESSAGES = [{"role": "user", "content": "Translate: 我看到这个视频后没有笑"}]
RETRIES = 2
# Each upstream is the same mock with the faults of its query string; fail_times counts per mock_key.
FAULTS = {
    "default": "",
    "cumulative": "",
    "rate_limited": "?mock_status=429&mock_retry_after=1&mock_fail_times=1&mock_key=rate",
    "broken": "?mock_status=500",
    "flaky": "?mock_disconnect_after=3&mock_fail_times=1&mock_key=flaky",
    "malformed": "?mock_malformed_after=2",
    "erroring": "?mock_error_after=2",
    "slow": "?mock_latency_ms=100",
}


def local(model: str, *, mode: Any = "auto", chunks: int | None = None) -> dict[str, Any]:
    """The record ``worker.assemble`` makes of the fixture itself (or of its first ``chunks`` chunks)."""
    return dict(assemble(load_jsonl(FIXTURES[model])[:chunks], mode=mode))


@dataclass
class Stack:
    """One namespace's whole pipeline: settings, a Redis client, the mock upstream, and subprocess runners."""

    settings: Settings
    client: redis.Redis
    upstream: MockUpstream
    env: dict[str, str]
    key: str
    request_ids: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def enqueue(self, model: str, upstream: str = "default") -> str:
        request_id = enqueue_chat_completion({"model": model, "messages": MESSAGES}, upstream=upstream,
                                             meta={"model": model}, client=self.client, settings=self.settings)
        self.request_ids.append(request_id)
        return request_id

    def run(self, *command: str) -> None:
        done = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.output.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr

    def run_jobs(self) -> None:
        """``python -m producer work --burst``: run every queued job, then exit."""
        self.run(sys.executable, "-m", "producer", "work", "--burst")

    def run_rq_worker(self) -> None:
        """rq's own command line runs the same jobs, told the queue and the Redis URL."""
        rq = str(Path(sys.executable).with_name("rq"))
        self.run(rq, "worker", "--burst", "--url", self.settings.redis_url, self.settings.queue)

    def assemble(self) -> None:
        """``python -m worker run --burst``: assemble every request pushed so far, then exit."""
        self.run(sys.executable, "-m", "worker", "run", "--burst")

    def result(self, request_id: str) -> dict[str, Any]:
        return wait_for_result(request_id, 10, client=self.client, settings=self.settings)

    def published(self, request_id: str) -> tuple[int, int]:
        """How many result records and usage events the request got."""
        keys = self.settings.keys
        shard = keys.shard(request_id)
        return (_count(self.client, keys.results(shard), request_id),
                _count(self.client, keys.usage(shard), request_id))

    def usage(self, request_id: str) -> dict[str, Any]:
        keys = self.settings.keys
        (event,) = [contract.decode_record(fields[contract.DATA])
                    for _, fields in self.client.xrange(keys.usage(keys.shard(request_id)))
                    if fields[contract.RID] == request_id.encode()]
        return event

    def calls(self, model: str) -> int:
        """Chat requests the mock upstream received for ``model``."""
        return sum(1 for seen in self.upstream.requests_seen if seen.model == model)

    def assert_key_never_leaked(self) -> None:
        """The key reached the upstream, and nowhere else: no Redis key or value, no log line."""
        assert {seen.authorization for seen in self.upstream.requests_seen} == {f"Bearer {self.key}"}
        secret = self.key.encode()
        for name, value in _dump(self.client, [f"{self.settings.namespace}:*", "rq:*"]):
            assert secret not in name and secret not in value, f"API key found in Redis key {name!r}"
        for text in self.output:
            assert self.key not in text


def _count(client: redis.Redis, stream: str, request_id: str) -> int:
    return sum(1 for _, fields in client.xrange(stream) if fields[contract.RID] == request_id.encode())


def _dump(client: redis.Redis, patterns: list[str]) -> Iterator[tuple[bytes, bytes]]:
    """Every key matching ``patterns`` with its whole value; compressed values (rq's job data) unpacked too."""
    for pattern in patterns:
        for name in client.scan_iter(match=pattern, count=1000):
            kind = client.type(name)
            if kind == b"string":
                parts = [client.get(name) or b""]
            elif kind == b"hash":
                parts = [part for item in client.hgetall(name).items() for part in item]
            elif kind == b"list":
                parts = client.lrange(name, 0, -1)
            elif kind == b"set":
                parts = list(client.smembers(name))
            elif kind == b"zset":
                parts = client.zrange(name, 0, -1)
            elif kind == b"stream":
                parts = [part for _, fields in client.xrange(name) for item in fields.items() for part in item]
            else:
                parts = []
            for part in parts:
                yield name, part
                try:
                    yield name, zlib.decompress(part)
                except zlib.error:
                    pass


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def stack(real_redis_url: str, namespace: str) -> Iterator[Stack]:
    key = f"sk-e2e-{uuid.uuid4().hex}"
    with MockUpstream() as upstream:
        table = {name: {"base_url": upstream.base_url + query, "api_key_env": KEY_ENV}
                 for name, query in FAULTS.items()}
        table["cumulative"]["mode"] = "cumulative"
        env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
        env.update({"STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
                    "STREAMFOLD_QUEUE": namespace, "STREAMFOLD_UPSTREAMS": json.dumps(table),
                    "STREAMFOLD_UPSTREAM_RETRIES": str(RETRIES), "STREAMFOLD_UPSTREAM_BACKOFF": "0.05",
                    KEY_ENV: key})
        settings = Settings(redis_url=real_redis_url, namespace=namespace, queue=namespace, upstreams=table)
        client = connect(settings)
        stack = Stack(settings, client, upstream, env, key)
        try:
            yield stack
        finally:
            job_ids = [job_id(settings.keys, request_id) for request_id in stack.request_ids]
            for name in client.scan_iter(match="rq:*", count=1000):
                if any(part in name.decode() for part in [namespace, *job_ids]):
                    client.delete(name)
            client.srem("rq:queues", f"rq:queue:{namespace}")
            client.close()


# --- clean calls ---------------------------------------------------------------------------------------------

def test_enqueued_calls_end_as_the_local_assembly_of_their_fixture(stack: Stack) -> None:
    calls = {"qwen_mt_flash_incremental": "default", "qwen_mt_plus_cumulative": "cumulative",
             "doubao_tool_call_whole": "default", "doubao_tool_call_fragments": "default",
             "openai_parallel_tool_calls": "default", "openai_n3_multiple_choices": "default",
             "deepseek_reasoner_tool_call": "default"}
    request_ids = {model: stack.enqueue(model, upstream) for model, upstream in calls.items()}
    stack.run_jobs()
    stack.assemble()

    for model, request_id in request_ids.items():
        record = stack.result(request_id)
        expected = local(model, mode="cumulative" if calls[model] == "cumulative" else "auto")
        assert record["status"] == expected["status"] == "completed", model
        assert record["completion"] == expected["completion"], model
        assert record["warnings"] == expected["warnings"], model
        assert record["meta"] == {"model": model}
        assert stack.published(request_id) == (1, 1), model
        usage = expected["completion"].get("usage") or {}
        assert stack.usage(request_id)["total_tokens"] == usage.get("total_tokens"), model
    for seen in stack.upstream.requests_seen:
        assert isinstance(seen.body, dict)
        assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
        assert seen.body["messages"] == MESSAGES
    stack.assert_key_never_leaked()


def test_rq_worker_runs_the_same_jobs_and_a_429_is_retried_after_its_retry_after(stack: Stack) -> None:
    model = "openai_refusal"
    request_id = stack.enqueue(model, "rate_limited")
    stack.run_rq_worker()
    stack.assemble()

    record = stack.result(request_id)
    assert record["status"] == "completed"
    assert record["completion"] == local(model)["completion"]
    assert record["metrics"]["attempts"] == 1  # nothing was pushed before the 429: no new attempt
    assert stack.calls(model) == 2
    # The retry waited the 1 s the upstream asked for, not the 0.05 s backoff.
    assert stack.usage(request_id)["ttft_ms"] >= 1000
    assert stack.published(request_id) == (1, 1)
    stack.assert_key_never_leaked()


def test_the_shell_enqueue_waits_for_the_result_of_running_workers(stack: Stack) -> None:
    model = "doubao_tool_call_fragments"
    with ExitStack() as running:
        for command in (["producer", "work"], ["worker", "run"]):
            running.enter_context(serving([sys.executable, "-m", *command], stack))
        done = subprocess.run([sys.executable, "-m", "producer", "enqueue", "--model", model, "--message", "hi",
                               "--wait", "20"], env=stack.env, cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    record = orjson.loads(done.stdout)
    stack.request_ids.append(record["request_id"])
    assert record["status"] == "completed"
    assert record["completion"] == local(model)["completion"]
    stack.assert_key_never_leaked()


@contextmanager
def serving(command: list[str], stack: Stack) -> Iterator[None]:
    """A long-running worker process, stopped with SIGTERM (a drain) on the way out; it must exit 0."""
    process = subprocess.Popen(command, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=15)
        finally:
            process.kill()
        stack.output.append(output)
        assert process.returncode == 0, output


# --- faults --------------------------------------------------------------------------------------------------

def test_server_errors_exhaust_the_retries_and_fail_with_the_upstreams_status_and_message(stack: Stack) -> None:
    request_id = stack.enqueue("openai_refusal", "broken")
    stack.run_jobs()
    stack.assemble()

    record = stack.result(request_id)
    assert record["status"] == "failed"
    assert record["error"] == {
        "message": "The server had an error processing your request (injected by the mock upstream).",
        "type": "server_error", "status": 500, "code": None}
    assert stack.calls("openai_refusal") == RETRIES + 1
    assert stack.published(request_id) == (1, 1)
    assert stack.usage(request_id)["error_type"] == "server_error"
    stack.assert_key_never_leaked()


def test_a_stream_cut_mid_way_is_retried_as_a_new_attempt_and_nothing_is_duplicated(stack: Stack) -> None:
    model = "qwen_mt_flash_incremental"
    request_id = stack.enqueue(model, "flaky")
    stack.run_jobs()
    stack.assemble()

    record, expected = stack.result(request_id), local(model)
    assert record["status"] == "completed"
    assert record["completion"] == expected["completion"]
    assert record["completion"]["choices"][0]["message"]["content"] == "I didn't laugh after watching this video."
    assert record["metrics"]["attempts"] == 2 and record["metrics"]["chunks"] == expected["metrics"]["chunks"]
    assert record["warnings"] == ["attempt 1 replaced attempt 0 after 3 chunks"]
    assert stack.calls(model) == 2
    assert stack.published(request_id) == (1, 1)
    stack.assert_key_never_leaked()


def test_a_malformed_chunk_is_dead_lettered_and_fails_the_request(stack: Stack) -> None:
    request_id = stack.enqueue("openai_refusal", "malformed")
    stack.run_jobs()
    stack.assemble()

    record = stack.result(request_id)
    assert record["status"] == "failed" and record["error"]["type"] == "invalid_chunk"
    keys = stack.settings.keys
    dead = [fields for _, fields in stack.client.xrange(keys.dead_letters(keys.shard(request_id)))
            if fields[contract.RID] == request_id.encode()]
    assert [fields[contract.DATA] for fields in dead] == [b"{not json"]
    assert stack.published(request_id) == (1, 1)
    stack.assert_key_never_leaked()


def test_an_error_event_fails_the_request_keeping_the_output_before_it(stack: Stack) -> None:
    model = "openai_refusal"
    request_id = stack.enqueue(model, "erroring")
    stack.run_jobs()
    stack.assemble()

    record = stack.result(request_id)
    assert record["status"] == "failed"
    assert record["error"]["message"] == "Injected stream error (error_after=2)."
    assert record["completion"] == local(model, chunks=2)["completion"]
    assert stack.calls(model) == 1
    assert stack.published(request_id) == (1, 1)
    stack.assert_key_never_leaked()


# --- cancellation --------------------------------------------------------------------------------------------

def test_cancel_stops_a_running_call_and_fails_the_request_cancelled(stack: Stack) -> None:
    model = "alibaba_qwen3max_reasoning"  # 275 chunks at 100 ms each: half a minute unless cancelled
    request_id = stack.enqueue(model, "slow")
    chunks = stack.settings.keys.chunks(request_id)
    command = [sys.executable, "-m", "producer", "work", "--burst"]
    with subprocess.Popen(command, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as runner:
        try:
            wait_until(lambda: stack.client.xlen(chunks) >= 4)
            assert cancel(request_id, client=stack.client, settings=stack.settings) is True
            started = time.monotonic()
            output, _ = runner.communicate(timeout=10)
        finally:
            runner.kill()
    stack.output.append(output)
    assert runner.returncode == 0, output
    assert time.monotonic() - started < 5
    stack.assemble()

    record = stack.result(request_id)
    assert record["status"] == "failed"
    assert record["error"]["type"] == "cancelled"
    assert 3 <= record["metrics"]["chunks"] < 50
    assert stack.calls(model) == 1
    assert stack.published(request_id) == (1, 1)
    stack.assert_key_never_leaked()


def test_cancel_before_the_job_ran_gives_one_cancelled_result_and_no_upstream_call(stack: Stack) -> None:
    doomed = stack.enqueue("openai_refusal")
    kept = stack.enqueue("qwen_mt_flash_incremental")
    assert cancel(doomed, client=stack.client, settings=stack.settings) is True
    stack.run_jobs()
    stack.assemble()

    record = stack.result(doomed)
    assert record["status"] == "failed" and record["error"]["type"] == "cancelled"
    assert stack.result(kept)["status"] == "completed"
    assert stack.calls("openai_refusal") == 0
    assert stack.published(doomed) == stack.published(kept) == (1, 1)
    assert cancel(doomed, client=stack.client, settings=stack.settings) is True  # it stays cancelled
    assert cancel(kept, client=stack.client, settings=stack.settings) is False  # finished: nothing to cancel
    stack.assert_key_never_leaked()
