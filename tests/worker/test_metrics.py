"""A worker's Prometheus metrics, stats record and structured logs, checked against what it processed."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pipeline_rig import ROOT, Rig, recorded, wait_until
from streamfold.logs import JsonFormatter
from worker import stats
from worker.cli import main
from worker.housekeeping import read_worker_records
from worker.metrics import WorkerMetrics, WorkerRecord
from worker.runner import Worker


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@contextmanager
def running(worker: Worker) -> Iterator[None]:
    """The worker serving in a thread until the block ends."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


def _publish_a_mix(rig: Rig) -> None:
    """Four good requests, one with a chunk written twice, one with a chunk that cannot be read."""
    chunks = recorded("openai_refusal")
    for n in range(4):
        rig.publish(f"r{n}", recorded("openai_parallel_tool_calls") if n % 2 else chunks)
    rig.publisher.start("dup")
    for seq, chunk in enumerate(chunks):
        rig.publisher.push("dup", chunk, seq=seq)
    rig.publisher.push("dup", chunks[2], seq=2)
    rig.publisher.end("dup")
    rig.publish("poison", [*chunks[:3], b"\xff not a chunk"])


def _finished_record(rig: Rig, name: str, finished: int) -> WorkerRecord | None:
    """The worker's published stats record, once it counts ``finished`` requests (it follows at a heartbeat)."""
    record = read_worker_records(rig.client.hgetall(rig.keys.workers())).get(name)
    return record if record is not None and record["finished"] == finished else None


@pytest.mark.redis
def test_metrics_served_over_http_count_what_the_worker_processed(real_redis: redis.Redis, namespace: str) -> None:
    rig = Rig(real_redis, namespace, claim_timeout=0.6)
    worker = rig.worker("counted", concurrency=3, burst=False)
    port = worker.metrics.serve(0, addr="127.0.0.1")
    try:
        with running(worker):
            _publish_a_mix(rig)
            wait_until(lambda: len(rig.results()) == 6, what="six results")
            record = wait_until(lambda: _finished_record(rig, "counted", 6), what="a stats record of six requests")
            samples = scrape(port)
        results = rig.results()
    finally:
        worker.metrics.close()
    chunks = sum(result["metrics"]["chunks"] for result in results)
    ended = [result for result in results if result["metrics"]["finish_lag_ms"] is not None]
    assert value(samples, "streamfold_worker_claims_total") == 6
    assert value(samples, "streamfold_worker_recoveries_total") == 0
    assert value(samples, "streamfold_worker_requests_finished_total", status="completed") == 5
    assert value(samples, "streamfold_worker_requests_finished_total", status="failed") == 1
    assert value(samples, "streamfold_worker_requests_finished_total", status="incomplete") == 0
    assert value(samples, "streamfold_worker_duplicate_finishes_total") == 0
    assert value(samples, "streamfold_worker_chunks_total") == chunks
    assert value(samples, "streamfold_worker_duplicate_chunks_total") == 1
    assert value(samples, "streamfold_worker_dead_letters_total") == 1
    assert value(samples, "streamfold_worker_redis_errors_total") == 0
    assert value(samples, "streamfold_worker_finish_latency_seconds_count") == len(ended) == 5
    assert value(samples, "streamfold_worker_in_flight") == 0
    assert value(samples, "streamfold_worker_concurrency") == 3
    assert (record["finished"], record["chunks"], record["concurrency"]) == (6, chunks, 3)
    assert rig.client.hget(rig.keys.workers(), "counted") is None  # withdrawn when the worker left


def test_workers_in_one_process_count_in_registries_of_their_own(fake_redis: redis.Redis) -> None:
    rig = Rig(fake_redis, "ns")
    rig.publish("r1", recorded("openai_refusal"))
    first, second = rig.worker("a"), rig.worker("b")
    first.run()
    second.run()
    assert first.metrics.registry.get_sample_value("streamfold_worker_claims_total") == 1
    assert second.metrics.registry.get_sample_value("streamfold_worker_claims_total") == 0


def test_tokens_and_cost_are_counted_per_model_as_the_usage_events_carry_them(fake_redis: redis.Redis) -> None:
    rig = Rig(fake_redis, "ns")
    rig.publish("r1", recorded("openai_refusal"), provider="openai")
    rig.publish("r2", recorded("openai_parallel_tool_calls"), provider="openai")
    rig.publish("r3", recorded("deepseek_reasoner_tool_call"), provider="deepseek")
    rig.publish("r4", recorded("groq_tool_call_whole_args"))  # no provider: no price, tokens still count
    worker = rig.worker()
    worker.run()
    tokens: dict[tuple[str, str], float] = {}
    cost: dict[tuple[str, str], float] = {}
    for event in rig.usage():
        tokens[event["model"], "input"] = tokens.get((event["model"], "input"), 0) + event["prompt_tokens"]
        tokens[event["model"], "output"] = tokens.get((event["model"], "output"), 0) + event["completion_tokens"]
        if event["cost"] is not None:
            key = (event["model"], event["cost"]["currency"])
            cost[key] = cost.get(key, 0.0) + event["cost"]["total"]
    assert len(cost) == 2 and len(tokens) == 6  # two models priced, three models counted
    registry = worker.metrics.registry
    for (model, kind), count in tokens.items():
        assert registry.get_sample_value("streamfold_worker_tokens_total", {"model": model, "type": kind}) == count
    for (model, currency), total in cost.items():
        assert registry.get_sample_value("streamfold_worker_cost_total",
                                         {"model": model, "currency": currency}) == pytest.approx(total)
    assert registry.get_sample_value("streamfold_worker_cost_total",
                                     {"model": "llama-3.3-70b-versatile", "currency": "USD"}) is None


def test_a_finish_that_published_nothing_counts_no_tokens_and_no_cost(fake_redis: redis.Redis) -> None:
    rig = Rig(fake_redis, "ns")
    rig.publish("r1", recorded("openai_refusal"), provider="openai")
    rig.worker().run()
    (record,), (usage,) = rig.results(), rig.usage()
    metrics = WorkerMetrics(concurrency=1)
    metrics.finished(record, usage, published=False, dead_letter=False, held_s=0.1)  # finished before
    assert metrics.registry.get_sample_value("streamfold_worker_duplicate_finishes_total") == 1
    assert not [sample for family in metrics.registry.collect() for sample in family.samples
                if sample.name in ("streamfold_worker_tokens_total", "streamfold_worker_cost_total")]
    metrics.finished(record, usage, published=True, dead_letter=False, held_s=0.1)
    assert metrics.registry.get_sample_value("streamfold_worker_tokens_total", {
        "model": usage["model"], "type": "output"}) == usage["completion_tokens"]


@pytest.mark.redis
def test_the_backlog_gauge_is_the_groups_lag_read_when_scraped(real_redis: redis.Redis, namespace: str) -> None:
    rig = Rig(real_redis, namespace)
    for number in range(5):
        rig.publish(f"r{number}", recorded("openai_refusal"))
    stream = rig.keys.requests(0)
    registry = rig.worker().metrics.registry
    assert registry.get_sample_value("streamfold_worker_backlog", {"stream": stream}) == 5  # no group yet
    assert len(rig.broker().claim(2)) == 2
    assert registry.get_sample_value("streamfold_worker_backlog", {"stream": stream}) == 3
    (shard,) = stats.collect(real_redis, rig.settings, interval=0)["per_shard"]
    assert shard["backlog"] == 3


def test_a_redis_that_does_not_answer_leaves_out_the_backlog_and_nothing_else() -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    worker = Rig(client, "ns").worker(concurrency=7)
    samples = [sample.name for family in worker.metrics.registry.collect() for sample in family.samples]
    assert "streamfold_worker_backlog" not in samples
    assert worker.metrics.registry.get_sample_value("streamfold_worker_concurrency") == 7


def test_json_log_lines_parse_and_carry_the_request_id_and_the_worker(fake_redis: redis.Redis) -> None:
    rig = Rig(fake_redis, "ns")
    rig.publish("r1", recorded("openai_refusal"))
    rig.publish("r2", [b"\xff not a chunk"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("streamfold.worker")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        rig.worker("w-json").run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert all({"ts", "level", "event", "request_id", "worker"} <= line.keys() for line in lines)
    assert {line["worker"] for line in lines} == {"w-json"}
    finished = {line["request_id"]: line for line in lines if line["event"] == "request_finished"}
    assert {rid: line["status"] for rid, line in finished.items()} == {"r1": "completed", "r2": "failed"}
    (dead,) = [line for line in lines if line["event"] == "entry_dead_lettered"]
    assert (dead["request_id"], dead["level"]) == ("r2", "warning")
    assert lines[0]["event"] == "worker_started" and lines[-1]["event"] == "worker_stopped"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.redis
def test_python_m_worker_run_serves_metrics_on_its_port_and_logs_json(real_redis: redis.Redis, real_redis_url: str,
                                                                      namespace: str, tmp_path: Path) -> None:
    rig, port, log_path = Rig(real_redis, namespace), _free_port(), tmp_path / "worker.log"
    env = {**os.environ, "STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
           "STREAMFOLD_BLOCK_MS": "100", "STREAMFOLD_LOG_FORMAT": "json"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", "proc", "--metrics-port",
                                    str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rig.publish("r1", recorded("openai_refusal"))
            rig.publish("r2", recorded("openai_refusal"))
            wait_until(lambda: len(rig.results()) == 2, what="two results")

            def finished() -> Any:
                try:
                    return value(scrape(port), "streamfold_worker_requests_finished_total", status="completed") == 2
                except httpx.TransportError:
                    return False
            wait_until(finished, what="the metrics to count two requests")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [line["port"] for line in lines if line["event"] == "metrics_served"] == [port]
    assert sorted(line["request_id"] for line in lines if line["event"] == "request_finished") == ["r1", "r2"]


def test_run_help_lists_the_operations_options_and_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--metrics-port", "--log-format", "STREAMFOLD_METRICS_PORT", "STREAMFOLD_LOG_FORMAT",
                   "STREAMFOLD_RESULTS_MAX_AGE", "STREAMFOLD_USAGE_MAX_AGE", "STREAMFOLD_DEAD_LETTER_MAX_AGE",
                   "STREAMFOLD_DEAD_CONSUMER_IDLE"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    assert "slots   = max(arrivals/s x W, in_flight) + backlog x min(1, W / D)" in capsys.readouterr().out
