"""``python -m worker health``: its exit codes and one-line reasons, for container probes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis

from pipeline_rig import Rig, recorded, wait_until
from worker.cli import main

Probe = Callable[..., tuple[int, str, str, float]]


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], namespace: str) -> Probe:
    """Run ``health`` with these settings; returns (exit code, stdout, stderr, seconds taken)."""
    def run(**settings: object) -> tuple[int, str, str, float]:
        monkeypatch.setenv("STREAMFOLD_NAMESPACE", namespace)
        for name, setting in settings.items():
            monkeypatch.setenv(f"STREAMFOLD_{name.upper()}", str(setting))
        started = time.monotonic()
        code = main(["health"])
        out, err = capsys.readouterr()
        return code, out, err, time.monotonic() - started
    return run


@pytest.mark.redis
def test_healthy_while_a_worker_serves(real_redis: redis.Redis, real_redis_url: str, namespace: str,
                                       probe: Probe) -> None:
    rig = Rig(real_redis, namespace)
    worker = rig.worker("serving", burst=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: rig.client.hget(rig.keys.workers(), "serving"), what="the worker's stats record")
        rig.publish("r1", recorded("openai_refusal"))
        code, out, err, seconds = probe(redis_url=real_redis_url)
    finally:
        worker.stop()
        thread.join(timeout=10)
    assert (code, out, err) == (0, "healthy: 1 live workers\n", "")
    assert seconds < 1


def test_unhealthy_when_redis_cannot_be_reached(probe: Probe) -> None:
    code, out, err, seconds = probe(redis_url="redis://127.0.0.1:1/0")
    assert (code, out) == (1, "")
    assert err.startswith("unhealthy: Redis unavailable: ConnectionError") and err.count("\n") == 1
    assert seconds < 1


@pytest.mark.parametrize("setting", [{"redis_url": "http://127.0.0.1:6379"}, {"shards": "0"}])
def test_a_configuration_error_exits_2(probe: Probe, setting: dict[str, str]) -> None:
    code, _, err, _ = probe(**setting)
    assert code == 2 and err.startswith("unhealthy: ") and err.count("\n") == 1


@pytest.mark.redis
def test_unhealthy_before_any_worker_made_the_group(real_redis_url: str, probe: Probe) -> None:
    code, _, err, _ = probe(redis_url=real_redis_url)
    assert code == 1 and "no consumer group 'workers'" in err


@pytest.mark.redis
def test_unhealthy_with_a_backlog_no_one_serves(real_redis: redis.Redis, real_redis_url: str, namespace: str,
                                                probe: Probe) -> None:
    rig = Rig(real_redis, namespace, claim_timeout=0.2)
    rig.broker("gone").ensure_group()
    rig.publish("r1", recorded("openai_refusal"))
    assert probe(redis_url=real_redis_url, claim_timeout=5)[0] == 0  # nothing has waited a claim timeout yet
    time.sleep(0.3)
    code, _, err, _ = probe(redis_url=real_redis_url, claim_timeout=0.2)
    assert code == 1 and "no live worker, and a request has waited" in err


@pytest.mark.redis
def test_unhealthy_when_requests_are_held_by_a_consumer_that_stopped(real_redis: redis.Redis, real_redis_url: str,
                                                                     namespace: str, probe: Probe) -> None:
    rig = Rig(real_redis, namespace, claim_timeout=0.2)
    rig.publish("r1", recorded("openai_refusal"))
    assert len(rig.broker("crashed").claim(1)) == 1
    time.sleep(0.3)
    code, _, err, _ = probe(redis_url=real_redis_url, claim_timeout=0.2)
    assert code == 1 and "1 claimed requests are held by consumers that stopped" in err
