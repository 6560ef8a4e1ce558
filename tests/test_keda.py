"""The Kubernetes manifests and the code cannot drift apart: the streams and group KEDA watches are the ones
workers use, the probes are project commands, and on a real Redis with a backlog the figures KEDA reads
(XINFO GROUPS lag, XPENDING count) are what ``python -m worker stats --json`` reports. For call runners: the
list KEDA reads is the queue rq puts their jobs on, readable by the user KEDA logs in as, the metric it
queries is one a runner exposes, and a runner's grace outlasts its calls."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
import yaml
from rq import Queue
from rq.job import Job

import producer.cli
import worker.cli
from producer.jobs import enqueue_chat_completion, job_id
from producer.publisher import Publisher
from producer.runner.metrics import RunnerMetrics
from streamfold.acl import setuser
from streamfold.keys import Keys
from streamfold.settings import Settings
from tests.conftest import RECORDED, ROOT, TEST_REDIS_URL, load_jsonl
from tests.promql import metric_names
from worker import stats
from worker.broker import Broker

MANIFESTS = [document for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
             for document in yaml.safe_load_all(path.read_text()) if document]
SCALED = [document for document in MANIFESTS if document["kind"] == "ScaledObject"]
DEPLOYMENTS = {document["metadata"]["name"]: document for document in MANIFESTS if document["kind"] == "Deployment"}
CONFIG_MAPS = {document["metadata"]["name"]: document for document in MANIFESTS if document["kind"] == "ConfigMap"}
AUTHS = {document["metadata"]["name"]: document for document in MANIFESTS
         if document["kind"] == "TriggerAuthentication"}
RUNNER = "streamfold-runner"
DEFAULTS = Settings()


def _stream_triggers() -> list[dict[str, Any]]:
    return [trigger["metadata"] for scaled in SCALED for trigger in scaled["spec"]["triggers"]
            if trigger["type"] in ("redis-streams", "redis-cluster-streams")]


def _triggers(kind: str) -> list[dict[str, Any]]:
    return [trigger for scaled in SCALED for trigger in scaled["spec"]["triggers"] if trigger["type"] == kind]


def _container(deployment: str) -> dict[str, Any]:
    (container,) = DEPLOYMENTS[deployment]["spec"]["template"]["spec"]["containers"]
    return container


def _settings(deployment: str, monkeypatch: pytest.MonkeyPatch, **override: str) -> Settings:
    """The settings a Deployment's container starts with: its ConfigMaps, then its own env, read by the
    project's own Settings (every STREAMFOLD_ name must be one)."""
    container = _container(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(CONFIG_MAPS[source["configMapRef"]["name"]]["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    env.update(override)
    for name, value in env.items():
        assert name.startswith("STREAMFOLD_") and name[11:].lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)
    return Settings()


def test_keda_watches_the_control_streams_and_group_of_the_worker_pool() -> None:
    keys = Keys(namespace=DEFAULTS.namespace, shards=DEFAULTS.shards)
    assert _stream_triggers()
    for trigger in _stream_triggers():
        assert trigger["stream"] in {keys.requests(shard) for shard in keys.shard_ids()}
        assert trigger["consumerGroup"] == DEFAULTS.group
        assert {"lagCount", "pendingEntriesCount"} & trigger.keys()


def test_deployments_probe_with_project_commands_and_outlast_the_shutdown_grace() -> None:
    worker_pod = DEPLOYMENTS["streamfold-worker"]["spec"]["template"]["spec"]
    (container,) = worker_pod["containers"]
    parser = worker.cli.build_parser()
    parser.parse_args(container["command"][3:])
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["python", "-m", "worker", "health"]
    assert worker_pod["terminationGracePeriodSeconds"] > DEFAULTS.shutdown_grace


def test_every_scaled_object_scales_a_deployment_of_the_manifests() -> None:
    assert {scaled["spec"]["scaleTargetRef"]["name"] for scaled in SCALED} == {"streamfold-worker", RUNNER}


def test_the_runner_deployment_probes_with_project_commands_and_its_grace_outlasts_its_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    container, parser = _container(RUNNER), producer.cli.build_parser()
    assert container["command"][:4] == ["python", "-m", "producer", "work"]
    parser.parse_args(container["command"][3:])
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == ["python", "-m", "producer", "runners", "--check"]
        parser.parse_args(command[3:])
    settings = _settings(RUNNER, monkeypatch)
    # A job's calls end within its timeout (the runner's own, or the one it was enqueued with from the
    # shared ConfigMap); SIGTERM waits for them that long, and Kubernetes waits for SIGTERM's drain.
    grace = DEPLOYMENTS[RUNNER]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_grace > settings.job_timeout


def test_keda_scales_runners_on_a_metric_every_runner_exposes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(RUNNER, monkeypatch)
    exposed = {sample.name for family in RunnerMetrics(settings.runner_concurrency).registry.collect()
               for sample in family.samples}
    (trigger,) = _triggers("prometheus")
    names = metric_names(trigger["metadata"]["query"])
    assert names and set(names) <= exposed
    # A target above what one runner can hold would never be reached.
    assert 0 < float(trigger["metadata"]["threshold"]) < settings.runner_concurrency
    # ... served on the port the pod's scrape annotation names.
    port = _container(RUNNER)["ports"][0]["containerPort"]
    assert producer.cli.build_parser().parse_args(_container(RUNNER)["command"][3:]).metrics_port == port
    assert DEPLOYMENTS[RUNNER]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.redis
def test_the_figures_keda_reads_are_what_worker_stats_reports(real_redis: redis.Redis, namespace: str) -> None:
    settings = Settings(redis_url=TEST_REDIS_URL, namespace=namespace)
    keys = settings.keys
    publisher = Publisher(real_redis, keys, batch_size=100)
    for number in range(9):
        publisher.start(f"r{number}")
        publisher.push(f"r{number}", load_jsonl(RECORDED / "openai_refusal.jsonl")[0])
    publisher.flush()
    broker = Broker.from_settings(real_redis, settings, "w1")
    assert len(broker.claim(4)) == 4  # 4 in flight, 5 waiting

    for trigger in _stream_triggers():
        # The manifest names the default namespace; read the same stream of this test's namespace.
        stream = trigger["stream"].replace(f"{DEFAULTS.namespace}:", f"{namespace}:", 1)
        (group,) = [group for group in real_redis.xinfo_groups(stream)
                    if group["name"].decode() == trigger["consumerGroup"]]
        pending = real_redis.xpending(stream, trigger["consumerGroup"])["pending"]
        assert (group["lag"], pending) == (5, 4)
        (shard,) = [shard for shard in stats.collect(real_redis, settings, interval=0)["per_shard"]
                    if shard["stream"] == stream]
        assert (shard["backlog"], shard["pending"]) == (group["lag"], pending)


@pytest.mark.redis
def test_the_list_keda_reads_is_the_queue_rq_puts_the_runners_jobs_on(
        real_redis: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _settings(RUNNER, monkeypatch)
    # The manifests name the default queue; this test enqueues on a queue of its own.
    settings = _settings(RUNNER, monkeypatch, STREAMFOLD_REDIS_URL=TEST_REDIS_URL, STREAMFOLD_NAMESPACE=namespace,
                         STREAMFOLD_QUEUE=namespace)
    (trigger,) = _triggers("redis")
    list_name = trigger["metadata"]["listName"]
    assert list_name == Queue(manifest.queue, connection=real_redis).key
    ours = list_name.removesuffix(manifest.queue) + settings.queue
    # KEDA logs in with the runners' own secret: the producer role's user, which takes rq jobs.
    auth = AUTHS[trigger["authenticationRef"]["name"]]
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {
        source["secretRef"]["name"] for source in _container(RUNNER)["envFrom"] if "secretRef" in source}
    user, password = f"{namespace}-keda", uuid.uuid4().hex
    real_redis.execute_command("ACL", "SETUSER", *setuser("producer", settings.keys, user=user, password=password))
    keda = redis.Redis.from_url(TEST_REDIS_URL, username=user, password=password)
    try:
        request_ids = [enqueue_chat_completion({"model": "m", "messages": []}, client=real_redis, settings=settings)
                       for _ in range(3)]
        # What KEDA runs, as the user its TriggerAuthentication names: the jobs waiting, in rq's order.
        assert keda.llen(ours) == 3
        jobs = [job_id(settings.keys, request_id) for request_id in request_ids]
        assert [entry.decode() for entry in keda.lrange(ours, 0, -1)] == jobs
        # Each job's calls may run as long as it was enqueued with, which the runners' grace outlasts.
        assert {Job.fetch(job, connection=real_redis).timeout for job in jobs} == {settings.job_timeout}
        assert settings.job_timeout < settings.shutdown_grace
    finally:
        keda.close()
        real_redis.execute_command("ACL", "DELUSER", user)
        Queue(settings.queue, connection=real_redis).delete(delete_jobs=True)
