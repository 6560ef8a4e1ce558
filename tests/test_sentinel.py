"""Redis behind Sentinel: every part finds the primary through the Sentinels and follows a failover.

The end-to-end test starts a real group on loopback (a primary, a replica, three Sentinels), runs the whole
pipeline - rq enqueue, a call runner calling the mock upstream, two stream workers - and SIGKILLs the primary
mid-run. Replication is asynchronous, so writes the old primary acknowledged in its last moments may be gone
after the promotion: the test counts what that cost, and asserts that every request still ends with exactly
one result, none hanging and none doubled.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import enqueue_chat_completion, wait_for_result
from producer.mock_upstream import DEFAULT_FIXTURE_DIRS, MockUpstream
from streamfold.connection import connect_async as connect_runner
from producer.runner.publishing import Batcher
from streamfold import contract
from streamfold.connection import connect, preflight
from streamfold.errors import RedisRefused, RedisUnavailable
from streamfold.settings import Settings, load_settings
from tests.conftest import ROOT, load_jsonl
from tests.topology import (SENTINEL_SERVICE, SentinelGroup, Server, require_redis_server, start_sentinel_group,
                            wait_for)
from worker import assemble

FIXTURES = {path.stem: path for directory in DEFAULT_FIXTURE_DIRS for path in directory.glob("*.jsonl")}
KEY_ENV = "STREAMFOLD_SENTINEL_API_KEY"
# Calls of 13 to 52 chunks, 40 ms apart: each runs 0.5 to 2 s, so a kill a second in finds many in flight.
MODELS = ["qwen_mt_flash_incremental", "doubao_tool_call_fragments", "openai_parallel_tool_calls",
          "cerebras_reasoning_field_tool_call", "deepseek_reasoner_tool_call"]
REQUESTS = 40


# --- settings --------------------------------------------------------------------------------------------------

def test_sentinels_are_read_as_host_port_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26380,[::1]:26381")
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINEL_SERVICE", "mymaster")
    settings = load_settings()
    assert settings.redis_sentinels == [("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381)]
    assert settings.redis_sentinel_service == "mymaster"


@pytest.mark.parametrize("entry", ["sentinel-a", "sentinel-a:", ":26379", "sentinel-a:port", "sentinel-a:70000"])
def test_an_entry_that_is_not_host_port_is_named(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINELS", f"ok:26379,{entry}")
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINEL_SERVICE", "mymaster")
    with pytest.raises(Exception, match=f"STREAMFOLD_REDIS_SENTINELS: .*'{entry}' is not host:port"):
        load_settings()


def test_credentials_in_an_entry_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINELS", "user:hunter2@sentinel-a:26379")
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINEL_SERVICE", "mymaster")
    with pytest.raises(Exception) as raised:
        load_settings()
    assert "hunter2" not in str(raised.value)


def test_sentinels_need_the_service_they_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_SENTINELS", "sentinel-a:26379")
    with pytest.raises(Exception, match="redis_sentinels need redis_sentinel_service"):
        load_settings()


def test_the_sentinel_password_is_never_shown() -> None:
    settings = Settings(redis_sentinels="sentinel-a:26379", redis_sentinel_service="mymaster",
                        redis_sentinel_password="hunter2")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)


# --- a real Sentinel group -------------------------------------------------------------------------------------

@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    require_redis_server()
    group = start_sentinel_group(tmp_path / "redis")
    try:
        yield group
    finally:
        group.topology.close()


def _environment(group: SentinelGroup, namespace: str, **settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
    env.update({"PYTHONPATH": str(ROOT), "STREAMFOLD_REDIS_SENTINELS": group.addresses,
                "STREAMFOLD_REDIS_SENTINEL_SERVICE": SENTINEL_SERVICE, "STREAMFOLD_NAMESPACE": namespace,
                "STREAMFOLD_QUEUE": namespace, "STREAMFOLD_SOCKET_TIMEOUT": "2", "STREAMFOLD_BLOCK_MS": "100",
                **{f"STREAMFOLD_{name.upper()}": value for name, value in settings.items()}})
    return env


def _settings(env: dict[str, str]) -> Settings:
    names = {name[len("STREAMFOLD_"):].lower(): value for name, value in env.items() if name.startswith("STREAMFOLD_")}
    return Settings(**names)  # type: ignore[arg-type]


def _promoted(group: SentinelGroup) -> None:
    wait_for(lambda: group.primary_port() == group.replica.port, 20, "the Sentinels to promote the replica")
    wait_for(lambda: group.replica.client().info("replication")["role"] == "master", 10, "the replica to take over")


def test_preflight_names_a_service_the_sentinels_do_not_monitor(group: SentinelGroup) -> None:
    good = Settings(redis_sentinels=group.addresses, redis_sentinel_service=SENTINEL_SERVICE, socket_timeout=2)
    with connect(good) as client:
        preflight(client)
        assert client.connection_pool.get_master_address() == ("127.0.0.1", group.primary.port)
    wrong = Settings(redis_sentinels=group.addresses, redis_sentinel_service="elsewhere", socket_timeout=2)
    with connect(wrong) as client, pytest.raises(RedisRefused, match="'elsewhere'"):
        preflight(client)


@pytest.mark.timeout(120)
def test_worker_health_stats_and_replay_work_through_sentinel_and_after_a_failover(
        group: SentinelGroup, namespace: str, tmp_path: Path) -> None:
    env = _environment(group, namespace, claim_timeout="3")
    capture = str(FIXTURES["openai_refusal"])

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *command], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", "w1"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        before = run("producer", "replay", capture)
        assert before.returncode == 0, before.stderr
        (first,) = before.stdout.split()
        _wait_for_results(_settings(env), [first], 20)
        health = run("worker", "health")
        assert (health.returncode, health.stdout) == (0, "healthy: 1 live workers\n"), health.stderr
        stats = run("worker", "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["workers"]

        group.primary.kill()
        # Replay while the Sentinels still vote: it waits for the new primary instead of failing.
        during = run("producer", "replay", capture)
        assert during.returncode == 0, during.stderr
        _promoted(group)
        (second,) = during.stdout.split()
        results = _wait_for_results(_settings(env), [first, second], 30)
        assert results[second][0]["status"] == "completed"
        health = run("worker", "health")
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        worker.terminate()
        worker.wait(20)
        log.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()


def test_with_wait_replicas_a_batch_counts_as_sent_only_once_the_replica_holds_it(group: SentinelGroup) -> None:
    settings = Settings(redis_sentinels=group.addresses, redis_sentinel_service=SENTINEL_SERVICE, socket_timeout=2,
                        redis_wait_replicas=1, redis_wait_timeout_ms=200)

    async def scenario() -> None:
        client = connect_runner(settings)
        batcher = Batcher(client, wait_replicas=settings.redis_wait_replicas,
                          wait_timeout_ms=settings.redis_wait_timeout_ms)
        flushing = asyncio.create_task(batcher.run())
        try:
            assert await asyncio.wait_for(batcher.send((("SET", "confirmed", "1"),), reply=True), 5) == b"OK"
            group.replica.process.send_signal(signal.SIGSTOP)
            try:
                sent = asyncio.ensure_future(batcher.send((("SET", "held", "1"),), reply=True))
                await asyncio.sleep(1.0)
                assert not sent.done()  # applied by the primary, but no replica confirmed it yet
            finally:
                group.replica.process.send_signal(signal.SIGCONT)
            assert await asyncio.wait_for(sent, 10) == b"OK"
        finally:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
            await client.aclose()

    asyncio.run(scenario())
    assert group.replica.client().get("held") == b"1"


# --- the whole pipeline through a failover ---------------------------------------------------------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_every_request_ends_once_when_the_primary_is_killed_mid_run(group: SentinelGroup, namespace: str,
                                                                   tmp_path: Path, wait_replicas: int) -> None:
    with MockUpstream() as upstream, ExitStack() as running:
        table = {"default": {"base_url": upstream.base_url + "?mock_latency_ms=40", "api_key_env": KEY_ENV}}
        env = _environment(group, namespace, upstreams=json.dumps(table), stall_timeout="6", claim_timeout="3",
                           upstream_backoff="0.05", redis_wait_replicas=str(wait_replicas))
        env[KEY_ENV] = "sk-sentinel-test"
        settings = _settings(env)
        client = running.enter_context(connect(settings))
        processes = [_serve(running, tmp_path, env, "producer", "work", "--name", "runner-1"),
                     _serve(running, tmp_path, env, "worker", "run", "--name", "worker-1"),
                     _serve(running, tmp_path, env, "worker", "run", "--name", "worker-2")]
        models = {enqueue_chat_completion({"model": MODELS[n % len(MODELS)], "messages": [{"role": "user",
                                                                                            "content": "hi"}]},
                                          client=client, settings=settings): MODELS[n % len(MODELS)]
                  for n in range(REQUESTS)}
        client.wait(1, 2000)  # the backend's own guard: its enqueues are on the replica before it goes on

        wait_for(lambda: _finished(client, settings) >= REQUESTS // 4, 30, "a quarter of the requests to finish")
        finished_before = _finished(client, settings)
        # A backend waiting on a result through the failover gets it from the new primary.
        waiting = running.enter_context(ThreadPoolExecutor(1)).submit(
            wait_for_result, list(models)[-1], 60, client=client, settings=settings)
        killed = time.monotonic()
        group.primary.kill()
        _promoted(group)
        promoted_after = time.monotonic() - killed
        if wait_replicas:
            # The new primary has no replica until the old host comes back: until then runners' writes wait.
            _restart_as_replica(group)
        assert waiting.result(60)["request_id"] == list(models)[-1]

        results = _wait_for_results(settings, list(models), 60, logs=processes)
        for process in processes:
            assert process.poll() is None, process.args

    statuses = Counter(record["status"] for records in results.values() for record in records[:1])
    doubled = [request_id for request_id, records in results.items() if len(records) > 1]
    wrong = [request_id for request_id, records in results.items()
             if records[0]["status"] == "completed" and records[0]["completion"] != _local(models[request_id])]
    gaps = [request_id for request_id, records in results.items()
            if any("missing" in warning or "stalled" in warning for warning in records[0]["warnings"])]
    print(f"\nfailover (wait_replicas={wait_replicas}): {REQUESTS} requests, {finished_before} finished before the "
          f"kill, replica promoted {promoted_after:.1f} s after it; statuses {dict(statuses)}; {len(gaps)} lost "
          "chunks or their end")
    assert not doubled
    assert not wrong
    assert sum(statuses.values()) == REQUESTS
    if wait_replicas:
        assert statuses == {"completed": REQUESTS}  # nothing a runner wrote was lost
    for records in results.values():
        record = records[0]
        if record["status"] != "completed":  # a request whose writes were lost says so
            assert record["warnings"] or record["error"], record


def _restart_as_replica(group: SentinelGroup) -> None:
    """Start the killed primary again, empty, on its port: the Sentinels make it a replica of the new one."""
    old = group.primary
    process = subprocess.Popen(old.process.args, cwd=old.directory, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    back = Server(old.port, old.directory, process)
    group.topology.servers.append(back)
    wait_for(lambda: back.client().info("replication").get("master_link_status") == "up", 30,
             "the old primary to come back as a replica")


def _serve(running: ExitStack, directory: Path, env: dict[str, str], *command: str) -> subprocess.Popen[bytes]:
    """A long-running process, its output in a file; killed on the way out."""
    log = running.enter_context((directory / f"{command[-1]}.log").open("wb"))
    process = subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)

    def stop() -> None:
        process.kill()
        process.wait(10)
    running.callback(stop)
    return process


def _local(model: str) -> Any:
    return assemble(load_jsonl(FIXTURES[model]))["completion"]


def _finished(client: redis.Redis, settings: Settings) -> int:
    return sum(int(client.xlen(settings.keys.results(shard))) for shard in settings.keys.shard_ids())


def _wait_for_results(settings: Settings, request_ids: list[str], timeout: float,
                      logs: list[subprocess.Popen[bytes]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every result record of these requests, once each has one; read through Sentinel, retried through a
    failover. AssertionError naming the requests still without one after ``timeout``."""
    deadline = time.monotonic() + timeout
    keys = settings.keys
    found: dict[str, list[dict[str, Any]]] = {}
    with connect(settings) as client:
        while True:
            try:
                found = {request_id: [] for request_id in request_ids}
                for shard in range(settings.shards):
                    for _, fields in client.xrange(keys.results(shard)):
                        request_id = fields[contract.RID].decode()
                        if request_id in found:
                            found[request_id].append(contract.decode_record(fields[contract.DATA]))
            except (redis.RedisError, RedisUnavailable):
                found = {}
            if found and all(found.values()):
                return found
            if time.monotonic() > deadline:
                missing = [request_id for request_id, records in found.items() if not records]
                raise AssertionError(f"{len(missing)} requests never ended: {missing}")
            time.sleep(0.2)
