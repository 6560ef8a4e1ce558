"""What a runner counts, and how ``python -m producer runners`` shows and judges the runners."""

from __future__ import annotations

from prometheus_client import generate_latest

from producer.runner.metrics import RunnerMetrics
from producer.runner.view import check, render


def test_runner_metrics_count_calls_chunks_first_chunks_errors_and_reruns() -> None:
    metrics = RunnerMetrics(concurrency=8)
    metrics.watch_in_flight(lambda: 3)
    metrics.chunk(True, 0.2)
    metrics.chunk(False, 0.3)
    metrics.upstream_error(529)
    metrics.upstream_error(None)
    metrics.ended("ended")
    metrics.rerun()
    text = generate_latest(metrics.registry).decode()
    for line in ("streamfold_runner_calls_in_flight 3.0", "streamfold_runner_concurrency 8.0",
                 "streamfold_runner_chunks_total 2.0", 'streamfold_runner_calls_total{outcome="ended"} 1.0',
                 'streamfold_runner_upstream_errors_total{status="529"} 1.0',
                 'streamfold_runner_upstream_errors_total{status="none"} 1.0', "streamfold_runner_reruns_total 1.0",
                 "streamfold_runner_time_to_first_chunk_seconds_count 1.0"):
        assert line in text, line
    record = metrics.record(in_flight=3)
    assert (record["in_flight"], record["calls"], record["chunks"], record["reruns"]) == (3, 1, 2, 1)


def test_the_check_wants_a_live_runner_and_no_calls_waiting_for_a_takeover() -> None:
    live = {"name": "a", "state": "live", "lease_left_s": 9.0, "held": 2, "in_flight": 2, "concurrency": 8,
            "calls": 10, "chunks": 100, "reruns": 0}
    dead = {**live, "name": "b", "state": "expired", "lease_left_s": -3.0, "held": 4}
    assert check({"runners": [live], "live": 1, "waiting_takeover": 0}) == (True, "1 live runners")
    assert check({"runners": [live, dead], "live": 1, "waiting_takeover": 4})[0] is False
    assert check({"runners": [], "live": 0, "waiting_takeover": 0})[0] is False
    table = render({"runners": [live, dead], "live": 1, "waiting_takeover": 4})
    assert "expired" in table and table.endswith("1 live; 4 calls wait to be taken over\n")
