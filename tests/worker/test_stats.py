"""``python -m worker stats``: its numbers against a known state on a real Redis, and the worker-count formula
on constructed samples."""

from __future__ import annotations

import signal
import time
from typing import Any

import orjson
import pytest
import redis

from pipeline_rig import Rig, recorded, wait_until
from worker_processes import spawn  # noqa: F401  (a fixture)
from streamfold.settings import Settings
from worker.cli import main
from worker.health import check as check_health
from worker.housekeeping import Housekeeper, consumer_state, record_state
from worker.metrics import WorkerRecord, decode_worker_record, encode_worker_record
from worker.stats import Sample, ShardSample, collect, recommend, report


def _record(*, finished: int = 10, held_ms: int = 20_000, updated_at_ms: int, concurrency: int = 4,
            in_flight: int = 2) -> WorkerRecord:
    return WorkerRecord(finished=finished, chunks=finished * 13, held_ms=held_ms, started_at_ms=updated_at_ms - 60_000,
                        updated_at_ms=updated_at_ms, in_flight=in_flight, concurrency=concurrency, every_ms=2_000)


def _env(monkeypatch: pytest.MonkeyPatch, url: str, settings: Settings) -> None:
    for name in ("redis_url", "namespace", "claim_timeout", "dead_consumer_idle"):
        monkeypatch.setenv(f"STREAMFOLD_{name.upper()}", str(getattr(settings, name) if name != "redis_url" else url))


@pytest.mark.redis
def test_stats_reports_backlog_in_flight_consumers_and_streams_of_a_known_state(
        real_redis: redis.Redis, real_redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(real_redis, namespace, claim_timeout=0.5, dead_consumer_idle=30.0)
    chunks = recorded("openai_refusal")
    for n in range(6):
        rig.publish(f"r{n}", chunks)
    assert len(rig.broker("busy").claim(2)) == 2
    assert len(rig.broker("crashed").claim(1)) == 1
    time.sleep(0.6)  # the unclaimed requests age; "crashed" goes silent past the claim timeout
    rig.broker("asking").claim(0)  # a consumer that has just asked and holds nothing
    keys = rig.keys
    for n in range(4):
        rig.client.xadd(keys.results(0), {"rid": f"old{n}", "d": "{}"})
    for n in range(3):
        rig.client.xadd(keys.usage(0), {"rid": f"old{n}", "d": "{}"})
    rig.client.xadd(keys.dead_letters(0), {"rid": "old0", "reason": "bad", "d": "x"})
    now_ms = int(time.time() * 1000)
    Housekeeper(rig.client, rig.settings, "busy").publish(_record(updated_at_ms=now_ms))
    _env(monkeypatch, real_redis_url, rig.settings)

    assert main(["stats", "--json", "--interval", "0"]) == 0
    stats = orjson.loads(capsys.readouterr().out)
    assert stats["backlog"]["requests"] == 3
    assert stats["backlog"]["oldest_age_s"] >= 0.6
    assert stats["in_flight"] == 3
    assert stats["rates"] is None
    assert stats["streams"] == {"results": 4, "usage": 3, "dead_letters": 1}
    workers = {worker["name"]: worker for worker in stats["workers"]}
    assert {name: (w["state"], w["pending"]) for name, w in workers.items()} == {
        "busy": ("live", 2), "crashed": ("dead", 1), "asking": ("quiet", 0)}  # no record: never live
    assert workers["crashed"]["idle_s"] >= 0.6
    assert (workers["busy"]["finished"], workers["busy"]["mean_hold_s"], workers["busy"]["in_flight"]) == (10, 2.0, 2)
    assert stats["dead_consumers"] == ["crashed"]
    assert stats["live_workers"] == 1
    # W = 20 s / 10 = 2 s, C = 4: ceil((max(0 x 2, 3) + 3 x min(1, 2 / 60)) / 4) = ceil(3.1 / 4) = 1
    assert (stats["recommendation"]["workers"], stats["recommendation"]["mean_hold_s"]) == (1, 2.0)

    assert main(["stats", "--interval", "0"]) == 0
    table = capsys.readouterr().out
    assert "backlog        3 requests unclaimed, oldest" in table
    assert "in flight      3 requests, 1 live workers" in table
    assert "streams        results 4  usage 3  dead letters 1" in table
    assert "recommended    1 workers: ceil((max(0/s x 2 s, 3) + 3 x min(1, 2 s / 60 s)) / 4)" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("busy", "crashed"))}
    assert rows["busy"][1:3] == ["live", "2"] and rows["busy"][4:7] == ["2", "4", "10"]
    assert rows["crashed"][1:3] == ["dead", "1"] and rows["crashed"][4:] == ["-"] * 6
    assert "dead consumers: crashed" in table


@pytest.mark.redis
def test_stats_measures_arrival_and_finish_rates_between_its_two_samples(real_redis: redis.Redis,
                                                                        namespace: str) -> None:
    rig = Rig(real_redis, namespace)
    rig.worker().run()  # the group exists, nothing waits

    def meanwhile(seconds: float) -> None:
        for n in range(6):
            rig.publish(f"r{n}", recorded("openai_refusal"))
        rig.worker(concurrency=4).run()  # finishes all six
        for n in range(6, 9):
            rig.publish(f"r{n}", recorded("openai_refusal"))  # three more, left waiting
        time.sleep(seconds)

    stats = collect(rig.client, rig.settings, interval=0.05, sleep=meanwhile)
    seconds, rates = stats["interval_s"], stats["rates"]
    assert seconds >= 0.05
    assert rates["arrivals_per_s"] * seconds == pytest.approx(9, abs=0.01)
    assert rates["finishes_per_s"] * seconds == pytest.approx(6, abs=0.01)
    assert rates["backlog_growth_per_s"] * seconds == pytest.approx(3, abs=0.01)
    assert stats["backlog"]["requests"] == 3


@pytest.mark.redis
def test_stats_exits_4_when_redis_cannot_be_reached(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMFOLD_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["stats", "--interval", "0"]) == 4
    assert "Redis unavailable" in capsys.readouterr().err


# --- the formula ----------------------------------------------------------------------------------------

def test_the_recommendation_keeps_up_with_arrivals_by_littles_law() -> None:
    advice = recommend(arrivals_per_s=10.0, backlog=0, in_flight=0, mean_hold_s=2.0, concurrency=4, drain_s=60,
                       live_workers=1)
    assert advice.workers == 5  # 10/s held 2 s each: 20 in flight, 4 per worker


def test_the_recommendation_adds_workers_to_clear_the_backlog_within_the_drain_time() -> None:
    advice = recommend(arrivals_per_s=10.0, backlog=120, in_flight=0, mean_hold_s=2.0, concurrency=4, drain_s=60,
                       live_workers=5)
    assert (advice.workers, advice.slots) == (6, 24.0)  # 10/s x 2 s + 120 x 2/60


def test_a_backlog_of_requests_held_longer_than_the_drain_time_needs_a_slot_each() -> None:
    advice = recommend(arrivals_per_s=0.0, backlog=10, in_flight=0, mean_hold_s=120.0, concurrency=4, drain_s=60,
                       live_workers=1)
    assert (advice.workers, advice.slots) == (3, 10.0)


def test_a_saturated_pool_with_requests_waiting_gets_one_worker_more() -> None:
    advice = recommend(arrivals_per_s=0.0, backlog=5, in_flight=8, mean_hold_s=0.5, concurrency=4, drain_s=60,
                       live_workers=2)
    assert advice.workers == 3  # every slot of the two is held; the waiting five need some of their own


def test_the_recommendation_never_drops_below_what_is_in_flight() -> None:
    advice = recommend(arrivals_per_s=0.0, backlog=0, in_flight=9, mean_hold_s=2.0, concurrency=4, drain_s=60,
                       live_workers=3)
    assert advice.workers == 3


def test_an_exact_fit_does_not_round_up_to_one_more_worker() -> None:
    advice = recommend(arrivals_per_s=0.3, backlog=0, in_flight=0, mean_hold_s=10.0, concurrency=1, drain_s=60,
                       live_workers=1)
    assert advice.workers == 3  # 0.3 x 10 is 3.0000000000000004 in floats


def test_without_a_measured_hold_time_the_recommendation_is_the_live_workers_or_one_while_work_waits() -> None:
    def workers(backlog: int, live: int) -> int:
        return recommend(arrivals_per_s=None, backlog=backlog, in_flight=0, mean_hold_s=None, concurrency=4,
                         drain_s=60, live_workers=live).workers
    assert (workers(0, 0), workers(5, 0), workers(5, 3)) == (0, 1, 3)


def _sample(time_ms: int, *, added: int, backlog: int, pending: int, finished_added: int,
            records: dict[str, WorkerRecord]) -> Sample:
    sample = Sample(time_ms, records, [ShardSample(0, "ns:in:{s00}:requests", True, backlog, time_ms - 5_000,
                                                    pending, added)])
    sample.streams["results_added"] = finished_added
    return sample


def test_a_report_from_two_samples_takes_rates_from_their_difference_and_hold_times_from_live_workers() -> None:
    settings = Settings(namespace="ns", claim_timeout=30)
    now = 1_000_000_000
    records = {"a": _record(finished=30, held_ms=30_000, updated_at_ms=now - 1_000, concurrency=8),
               "b": _record(finished=10, held_ms=50_000, updated_at_ms=now - 2_000, concurrency=8),
               "gone": _record(finished=1000, held_ms=1, updated_at_ms=now - 700_000)}  # gone: not counted
    first = _sample(now - 2_000, added=100, backlog=10, pending=8, finished_added=90, records=records)
    last = _sample(now, added=140, backlog=30, pending=16, finished_added=110, records=records)
    stats: dict[str, Any] = report(first, last, settings, drain_s=60)
    assert stats["rates"] == {"arrivals_per_s": 20.0, "finishes_per_s": 10.0, "backlog_growth_per_s": 10.0}
    assert stats["live_workers"] == 2
    assert stats["backlog"] == {"requests": 30, "oldest_age_s": 5.0}
    advice = stats["recommendation"]
    assert (advice["mean_hold_s"], advice["concurrency"]) == (2.0, 8)  # (30 + 50 s) / 40 requests
    assert (advice["workers"], advice["slots"]) == (6, 41.0)  # max(20/s x 2 s, 16) + 30 x 2/60 = 41 slots of 8
    states = {worker["name"]: worker["state"] for worker in stats["workers"]}
    assert states == {"a": "live", "b": "live", "gone": "dead"}
    assert stats["dead_consumers"] == []  # "gone" left a stats record, but no consumer in the group


def test_a_worker_is_live_while_its_own_heartbeat_is_fresh_never_because_it_touched_redis_lately() -> None:
    settings = Settings(claim_timeout=30, dead_consumer_idle=600)
    assert consumer_state(3, 31_000, "fresh", settings) == "live"  # its worker still reports: busy, not dead
    assert consumer_state(3, 100, "stale", settings) == "dead"  # read 0.1 s ago, then SIGKILLed
    assert consumer_state(0, 100, "stale", settings) == "dead"


def test_a_consumer_without_a_record_is_dead_when_silent_a_claim_timeout_holding_work_or_the_dead_idle() -> None:
    settings = Settings(claim_timeout=30, dead_consumer_idle=600)
    assert consumer_state(3, 31_000, None, settings) == "dead"
    assert consumer_state(0, 31_000, None, settings) == "quiet"
    assert consumer_state(0, 600_000, None, settings) == "dead"
    assert consumer_state(3, 10_000, None, settings) == "quiet"


def test_a_record_goes_stale_after_three_missed_refreshes_and_a_second_of_clock_skew() -> None:
    now = 1_000_000_000
    assert record_state(_record(updated_at_ms=now - 7_000), now) == "fresh"  # every 2 s: 3 x 2 s + 1 s
    assert record_state(_record(updated_at_ms=now - 7_001), now) == "stale"
    assert record_state(None, now) is None
    old = orjson.loads(encode_worker_record(_record(updated_at_ms=now - 20_000)))
    del old["every_ms"]  # written before the field existed: refreshed every claim timeout / 3 then
    assert record_state(decode_worker_record(orjson.dumps(old)), now) == "fresh"


@pytest.mark.redis
def test_stats_counts_the_backlog_itself_where_redis_cannot_tell_the_lag(real_redis: redis.Redis,
                                                                         namespace: str) -> None:
    rig = Rig(real_redis, namespace)
    rig.broker().ensure_group()
    for n in range(4):
        rig.publish(f"r{n}", recorded("openai_refusal"))
    entry_ids = [entry_id for entry_id, _ in rig.client.xrange(rig.keys.requests(0))]
    rig.client.xdel(rig.keys.requests(0), entry_ids[1])  # a deletion inside the unread range: the lag is NULL
    assert rig.client.xinfo_groups(rig.keys.requests(0))[0]["lag"] is None
    stats = collect(rig.client, rig.settings, interval=0)
    assert stats["backlog"]["requests"] == 3


@pytest.mark.redis
def test_a_sigkilled_worker_shows_dead_within_seconds_not_after_a_claim_timeout(
        real_redis: redis.Redis, real_redis_url: str, namespace: str, spawn: Any) -> None:
    rig = Rig(real_redis, namespace, claim_timeout=30.0)

    def states() -> dict[str, Any]:
        stats = collect(rig.client, rig.settings, interval=0)
        return {"live": stats["live_workers"], **{w["name"]: w["state"] for w in stats["workers"]}}

    doomed = spawn("doomed", claim_timeout=30)
    wait_until(lambda: states() == {"live": 1, "doomed": "live"}, what="the worker to report itself live")
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    # Three missed 2 s refreshes and a second of skew: dead after about 7 s, not the 30 s claim timeout.
    wait_until(lambda: states() == {"live": 0, "doomed": "dead"}, timeout=15, what="the killed worker to show dead")
    assert check_health(rig.client, rig.settings)[1].startswith("no live worker")
