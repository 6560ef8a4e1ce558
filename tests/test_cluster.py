"""The whole pipeline on a real 3-master Redis Cluster, its rq queue on a Redis of its own: calls enqueued
through rq, a call runner, several stream workers, one of them SIGKILLed mid-run. Every request ends with
exactly one result and one usage event; results, usage summaries, stats, health and the gateway read the
shards of the cluster merged. On a cluster with replicas, a master SIGKILLed mid-run: every request still ends
once, and one that lost writes says so."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis

from producer import Publisher, cancel, enqueue_chat_completion, wait_for_result
from producer.mock_upstream import DEFAULT_FIXTURE_DIRS, MockUpstream
from producer.follow import follow
from producer.results import UsageReader, follow_results, get_result, stored_usage
from streamfold import contract
from streamfold.acl import setuser
from streamfold.connection import connect, connect_queue, preflight
from streamfold.errors import ConfigError
from streamfold.settings import Settings, load_settings
from tests.conftest import ROOT, TEST_REDIS_URL, load_jsonl, process_env
from tests.producer.gateway.conftest import serve_app
from tests.topology import Server, require_redis_server, start_cluster
from worker import assemble
from worker.broker import Broker
from worker.live import Final
from worker.runner import Worker
from worker.stats import collect

pytestmark = pytest.mark.redis

FIXTURES = {path.stem: path for directory in DEFAULT_FIXTURE_DIRS for path in directory.glob("*.jsonl")}
MODELS = ["qwen_mt_flash_incremental", "doubao_tool_call_fragments", "openai_parallel_tool_calls",
          "deepseek_reasoner_tool_call", "openai_n3_multiple_choices", "openai_refusal"]
KEY_ENV = "STREAMFOLD_CLUSTER_TEST_KEY"
SHARDS = 6  # two shard tags per master


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    require_redis_server()
    topology, nodes = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    try:
        yield nodes
    finally:
        topology.close()


@dataclass
class ClusterStack:
    settings: Settings
    client: redis.Redis  # the cluster
    queue: redis.Redis  # rq's own Redis
    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", *command], env=self.env, cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", *command], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    def enqueue(self, model: str) -> str:
        return enqueue_chat_completion({"model": model, "messages": [{"role": "user", "content": "hi"}]},
                                       client=self.client, settings=self.settings)

    def published(self, request_id: str) -> tuple[int, int]:
        keys = self.settings.keys
        shard = keys.shard(request_id)
        return (_count(self.client, keys.results(shard), request_id), _count(self.client, keys.usage(shard), request_id))

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def _count(client: redis.Redis, stream: str, request_id: str) -> int:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream)  # type: ignore[assignment]
    return sum(1 for _, fields in entries if fields[contract.RID] == request_id.encode())


@pytest.fixture
def stack(cluster: list[Server], tmp_path: Path) -> Iterator[ClusterStack]:
    with cluster_stack(cluster, tmp_path) as the_stack:
        yield the_stack


@contextmanager
def cluster_stack(nodes: list[Server], tmp_path: Path, **extra: Any) -> Iterator[ClusterStack]:
    """A pipeline's settings and clients on the cluster of ``nodes`` (``extra``: more settings), in a namespace
    of its own; every process it started is stopped and its rq keys go on the way out."""
    namespace = f"sftest-cl-{uuid.uuid4().hex[:8]}"
    with MockUpstream() as upstream:
        table = {"default": {"base_url": upstream.base_url + "?mock_latency_ms=40", "api_key_env": KEY_ENV}}
        values: dict[str, Any] = {
            "redis_url": f"redis://127.0.0.1:{nodes[1].port}", "redis_cluster": True,
            "queue_redis_url": TEST_REDIS_URL, "namespace": namespace, "queue": namespace, "shards": SHARDS,
            "upstreams": table, "claim_timeout": 2, "block_ms": 200, "socket_timeout": 3, "stall_timeout": 10,
            "concurrency": 16, **extra}
        env = {**process_env(**values), KEY_ENV: "sk-cluster-test"}
        settings = Settings(**values)
        client, queue = connect(settings), connect_queue(settings)
        stack = ClusterStack(settings, client, queue, env, tmp_path)
        try:
            yield stack
        finally:
            stack.stop_all()
            for name in queue.scan_iter(match="rq:*", count=1000):
                if namespace in name.decode():
                    queue.delete(name)
            queue.srem("rq:queues", f"rq:queue:{namespace}")
            client.close()
            queue.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def serving(stack: ClusterStack, workers: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    stack.start("runner", "producer", "work", "--concurrency", "64")
    pool = [stack.start(f"worker-{number}", "worker", "run", "--name", f"worker-{number}") for number in range(workers)]
    try:
        yield pool
    finally:
        stack.stop_all()


def held_by(stack: ClusterStack, consumer: str) -> int:
    keys, total = stack.settings.keys, 0
    for shard in keys.shard_ids():
        try:
            summary = stack.client.xpending(keys.requests(shard), stack.settings.group)
        except redis.ResponseError:
            continue
        total += sum(int(owner["pending"]) for owner in summary["consumers"] if owner["name"] == consumer.encode())
    return total


def test_settings_refuse_a_cluster_without_a_queue_redis_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_CLUSTER", "true")
    monkeypatch.delenv("STREAMFOLD_QUEUE_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="STREAMFOLD_QUEUE_REDIS_URL"):
        load_settings()


def test_settings_refuse_wait_replicas_on_a_cluster_where_it_could_not_be_applied(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_CLUSTER", "true")
    monkeypatch.setenv("STREAMFOLD_QUEUE_REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("STREAMFOLD_REDIS_WAIT_REPLICAS", "1")
    with pytest.raises(ConfigError, match="redis_wait_replicas is not applied on a Redis Cluster"):
        load_settings()


def test_the_queue_redis_takes_its_own_urls_credentials_and_is_never_shown_with_its_password() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:7000", redis_cluster=True, redis_username="streams",
                        redis_password="streams-secret", queue_redis_url="redis://rq:queue-secret@127.0.0.1:6390/2")
    queue = connect_queue(settings)
    options = queue.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"]) == ("127.0.0.1", 6390, 2)
    assert (options["username"], options["password"]) == ("rq", "queue-secret")
    assert "queue-secret" not in repr(settings) and "streams-secret" not in repr(settings)
    bare = connect_queue(settings.model_copy(update={"queue_redis_url": "redis://127.0.0.1:6390/2"}))
    assert (bare.connection_pool.connection_kwargs["username"], bare.connection_pool.connection_kwargs["password"]) \
        == ("streams", "streams-secret")
    queue.close()
    bare.close()


def test_a_worker_killed_mid_run_loses_nothing_and_every_request_ends_with_one_result(stack: ClusterStack) -> None:
    request_ids = {stack.enqueue(MODELS[number % len(MODELS)]): MODELS[number % len(MODELS)] for number in range(36)}
    assert {stack.settings.keys.shard(request_id) for request_id in request_ids} == set(range(SHARDS))
    assert stack.queue.llen(f"rq:queue:{stack.settings.queue}") == len(request_ids)  # rq's Redis, not the cluster

    with serving(stack, workers=3) as pool:
        wait_until(lambda: held_by(stack, "worker-0") > 0, 30, "worker-0 to hold requests")
        pool[0].send_signal(signal.SIGKILL)
        pool[0].wait(10)
        for request_id in request_ids:
            wait_for_result(request_id, 60, client=stack.client, settings=stack.settings)  # pub/sub on the cluster
        assert held_by(stack, "worker-0") == 0, "the killed worker's claims were taken over"

        for request_id, model in request_ids.items():
            record = get_result(stack.client, stack.settings.keys, request_id)
            expected = dict(assemble(load_jsonl(FIXTURES[model])))
            assert record is not None and record["status"] == "completed", (model, record)
            assert record["completion"] == expected["completion"], model
            assert stack.published(request_id) == (1, 1), model

        stats = stack.run("worker", "stats", "--json", "--interval", "0")
        assert stats.returncode == 0, stats.stderr
        report = orjson.loads(stats.stdout)
        assert len(report["per_shard"]) == SHARDS and report["backlog"]["requests"] == 0, report
        health = stack.run("worker", "health")
        assert health.returncode == 0, health.stderr

    results = list(follow_results(stack.client, stack.settings.keys, from_start=True))
    assert sorted(record["request_id"] for record in results) == sorted(request_ids)
    assert sorted(event["request_id"] for event in stored_usage(stack.client, stack.settings.keys)) == \
        sorted(request_ids)
    summary = stack.run("producer", "usage", "--summary", "--json")
    assert summary.returncode == 0, summary.stderr
    assert orjson.loads(summary.stdout)["total"]["requests"] == len(request_ids)
    shown = stack.run("producer", "results", "--from-start")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == len(request_ids)
    one = next(iter(request_ids))
    looked_up = stack.run("producer", "result", one)
    assert looked_up.returncode == 0 and orjson.loads(looked_up.stdout)["request_id"] == one


def test_a_cancel_before_the_job_ran_fails_the_request_once_on_the_cluster(stack: ClusterStack) -> None:
    doomed = stack.enqueue("openai_refusal")
    assert cancel(doomed, client=stack.client, settings=stack.settings) is True
    assert stack.run("worker", "run", "--burst").returncode == 0
    record = get_result(stack.client, stack.settings.keys, doomed)
    assert record is not None and record["error"]["type"] == "cancelled"
    assert stack.published(doomed) == (1, 1)


def test_the_gateway_on_a_cluster_streams_the_assembled_message(stack: ClusterStack) -> None:
    model = "openai_parallel_tool_calls"
    with serving(stack, workers=2):
        gateway = serve_app(stack.settings)
        try:
            sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            with sdk.chat.completions.stream(model=model, messages=[{"role": "user", "content": "hi"}]) as stream:
                for _ in stream:
                    pass
                completion = stream.get_final_completion()
        finally:
            gateway.stop()
    expected = assemble(load_jsonl(FIXTURES[model]))["completion"]["choices"][0]["message"]["tool_calls"]
    calls = completion.choices[0].message.tool_calls or []
    assert [(call.id, call.function.name, call.function.arguments) for call in calls] == \
        [(call["id"], call["function"]["name"], call["function"]["arguments"]) for call in expected]


def test_every_acl_role_works_on_a_cluster_and_is_refused_outside_its_keys(cluster: list[Server]) -> None:
    """ACLs are per node: each role's line is set on every node, and the cluster client's own introspection
    (the slot layout, the command table) is among what every role may do. A producer publishes, a worker
    assembles and reads stats, a backend waits, follows, enqueues and cancels, analytics reads usage."""
    namespace = f"sftest-acl-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=f"redis://127.0.0.1:{cluster[0].port}", redis_cluster=True,
                        queue_redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace, shards=SHARDS,
                        block_ms=50, socket_timeout=2, stall_timeout=5, claim_timeout=5)
    roles = ("producer", "worker", "backend", "analytics")
    lines = {role: setuser(role, settings.keys, password=f"{role}-secret") for role in roles}
    for node in cluster:
        with node.client() as admin:
            for line in lines.values():
                admin.execute_command("ACL", "SETUSER", *line)

    def as_role(role: str) -> Settings:
        url = f"redis://{lines[role][0]}:{role}-secret@127.0.0.1:{cluster[1].port}"
        return settings.model_copy(update={"redis_url": url})

    clients = {role: connect(as_role(role)) for role in roles}
    producing, working, backend, analytics = (clients[role] for role in roles)
    try:
        for client in clients.values():
            preflight(client)
        broker = Broker(working, settings.keys, group=settings.group, consumer="w1", read_count=10,
                        result_ttl=60, chunk_ttl=60, claim_timeout_ms=30_000)
        broker.ensure_group()
        with Publisher(producing, settings.keys, batch_size=1, max_age=60) as publisher:
            for request_id in ("acl-1", "acl-2"):
                publisher.start(request_id)
                for chunk in load_jsonl(FIXTURES["openai_refusal"]):
                    publisher.push(request_id, chunk)
                publisher.end(request_id)
                if request_id == "acl-1":
                    Worker(broker, as_role("worker"), burst=True).run()
        assert [claim.request_id for claim in broker.claim(5)] == ["acl-2"]
        stats = collect(working, as_role("worker"), interval=0)
        assert stats["in_flight"] == 1 and len(stats["per_shard"]) == SHARDS
        with pytest.raises(redis.exceptions.NoPermissionError):
            producing.get(settings.keys.result("acl-1"))  # a producer reads no results

        assert wait_for_result("acl-1", 5, client=backend, settings=as_role("backend"))["status"] == "completed"
        assert isinstance(list(follow("acl-1", client=backend, settings=as_role("backend")))[-1], Final)
        assert [record["request_id"] for record in follow_results(backend, settings.keys, from_start=True)] \
            == ["acl-1"]
        doomed = enqueue_chat_completion({"model": "m", "messages": []}, client=backend, settings=as_role("backend"))
        assert cancel(doomed, client=backend, settings=as_role("backend"))  # not started: the backend fails it
        with pytest.raises(redis.exceptions.NoPermissionError):
            backend.xrange(settings.keys.usage(settings.keys.shard("acl-1")))

        seen: list[dict[str, Any]] = []
        UsageReader(analytics, settings.keys, group="billing", consumer="b1", from_start=True).consume(seen.append)
        assert [event["request_id"] for event in seen] == ["acl-1"]
        with pytest.raises(redis.exceptions.NoPermissionError):
            analytics.xrange(settings.keys.chunks("acl-1"))
    finally:
        for client in clients.values():
            client.close()
        for node in cluster:
            with node.client() as admin:
                for line in lines.values():
                    admin.execute_command("ACL", "DELUSER", line[0])
        with redis.Redis.from_url(TEST_REDIS_URL) as queue:
            for key in queue.scan_iter(match=f"rq:*{namespace}*"):
                queue.delete(key)


@pytest.mark.timeout(300)
def test_a_master_killed_mid_run_fails_over_and_every_request_ends_once_saying_what_it_lost(tmp_path: Path) -> None:
    """3 masters with a replica each; one master is SIGKILLed while calls stream and workers assemble, and its
    replica takes over its slots. A cluster's replication is asynchronous and WAIT is not applied on one, so
    writes the killed master had acknowledged but not passed on are lost: a request may end incomplete. None
    hangs, none is doubled, every completed one is exact, and one that is not says what it lost."""
    require_redis_server()
    topology, nodes = start_cluster(tmp_path / "replicated", 3, replicas=1)
    try:
        roles = {node.port: node.client().execute_command("ROLE") for node in nodes}
        victim = next(node for node in nodes if roles[node.port][0] == b"master")
        replica = next(node for node in nodes if roles[node.port][0] == b"slave" and roles[node.port][2] == victim.port)
        alive = [node for node in nodes if node is not victim]
        with cluster_stack(alive, tmp_path, upstream_backoff=0.05) as stack:
            request_ids = {stack.enqueue(MODELS[number % len(MODELS)]): MODELS[number % len(MODELS)]
                           for number in range(30)}
            with serving(stack, workers=2):
                wait_until(lambda: sum(stack.published(rid)[0] for rid in request_ids) >= 5, 60,
                           "a few requests to finish")
                victim.kill()
                wait_until(lambda: _promoted(alive, replica), 30, "the replica to take over the killed master's slots")
                for request_id in request_ids:
                    wait_for_result(request_id, 90, client=stack.client, settings=stack.settings)
                for name, process in stack.processes.items():
                    assert process.poll() is None, f"{name} exited:\n{stack.log(name)}"
            statuses: dict[str, int] = {}
            for request_id, model in request_ids.items():
                record = get_result(stack.client, stack.settings.keys, request_id)
                assert record is not None
                statuses[record["status"]] = statuses.get(record["status"], 0) + 1
                if record["status"] == "completed":
                    expected = dict(assemble(load_jsonl(FIXTURES[model])))["completion"]
                    assert record["completion"] == expected, (model, record)
                else:
                    said = [warning for warning in record["warnings"] if "missing" in warning or "before its start"
                            in warning]
                    assert record["status"] == "incomplete" and said, record
                assert stack.published(request_id) == (1, 1), model
            print(f"\ncluster master failover: {len(request_ids)} requests, statuses {statuses}")
    finally:
        topology.close()


def _promoted(nodes: list[Server], replica: Server) -> bool:
    """Whether the killed master's replica is a master now and every node still up sees every slot served."""
    return replica.client().execute_command("ROLE")[0] == b"master" and \
        all(node.client().cluster("info").get("cluster_state") == "ok" for node in nodes)
