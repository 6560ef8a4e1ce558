"""The Kubernetes manifests and the code cannot drift apart: the streams and group KEDA watches are the ones
workers use, the probes are project commands, and on a real Redis with a backlog the figures KEDA reads
(XINFO GROUPS lag, XPENDING count) are what ``python -m worker stats --json`` reports."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import yaml

import worker.cli
from producer.publisher import Publisher
from streamfold.keys import Keys
from streamfold.settings import Settings
from tests.conftest import RECORDED, ROOT, TEST_REDIS_URL, load_jsonl
from worker import stats
from worker.broker import Broker

MANIFESTS = [document for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
             for document in yaml.safe_load_all(path.read_text()) if document]
SCALED = [document for document in MANIFESTS if document["kind"] == "ScaledObject"]
DEPLOYMENTS = {document["metadata"]["name"]: document for document in MANIFESTS if document["kind"] == "Deployment"}
DEFAULTS = Settings()


def _stream_triggers() -> list[dict[str, Any]]:
    return [trigger["metadata"] for scaled in SCALED for trigger in scaled["spec"]["triggers"]
            if trigger["type"] in ("redis-streams", "redis-cluster-streams")]


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
