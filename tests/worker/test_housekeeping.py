"""Housekeeping: dead consumers go only once they hold nothing, and trimming never loses what a group needs.

Against fakeredis and, when one answers, a real Redis.
"""

from __future__ import annotations

import time

import pytest
import redis

from pipeline_rig import Rig, client, recorded  # noqa: F401  (``client`` is a fixture)
from worker.housekeeping import Housekeeper
from worker.metrics import WorkerRecord, encode_worker_record

OLD = 1_000_000  # an entry id timestamp (ms) in 1970: older than any max age


@pytest.fixture
def rig(client: redis.Redis, namespace: str) -> Rig:  # noqa: F811
    return Rig(client, namespace, claim_timeout=1.0, dead_consumer_idle=0.2)


def _record(updated_at_ms: int) -> WorkerRecord:
    return WorkerRecord(finished=0, chunks=0, held_ms=0, started_at_ms=updated_at_ms, updated_at_ms=updated_at_ms,
                        in_flight=0, concurrency=4, every_ms=2_000)


def _consumers(rig: Rig) -> set[str]:
    return {consumer["name"].decode() for consumer in rig.client.xinfo_consumers(rig.keys.requests(0), "workers")}


def _ids(rig: Rig, key: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in rig.client.xrange(key)]


def test_a_dead_consumer_holding_nothing_is_removed_and_one_holding_a_request_is_kept(rig: Rig) -> None:
    rig.publish("r1", recorded("openai_refusal"))
    rig.broker("empty").claim(0)
    assert len(rig.broker("holding").claim(1)) == 1
    rig.broker("alive").claim(0)
    time.sleep(0.3)  # every consumer is now silent past dead_consumer_idle
    alive = Housekeeper(rig.client, rig.settings, "alive")
    alive.publish(_record(alive.server_time_ms()))  # its worker still reports: busy elsewhere, not dead
    done = Housekeeper(rig.client, rig.settings, "keeper").run(lease_s=30)
    assert done is not None and done.consumers_removed == ["empty"]
    assert _consumers(rig) == {"holding", "alive"}
    assert [entry["consumer"] for entry in rig.pending()] == [b"holding"]


def test_a_running_worker_removes_dead_consumers_by_itself(rig: Rig) -> None:
    rig.broker("empty").claim(0)
    time.sleep(0.3)
    assert rig.worker("serving").run() == 0
    assert "empty" not in _consumers(rig)
    assert rig.client.hgetall(rig.keys.workers()) == {}  # "serving" withdrew its own record on leaving


def test_stats_records_of_workers_silent_past_the_dead_idle_are_forgotten(rig: Rig) -> None:
    keeper = Housekeeper(rig.client, rig.settings, "keeper")
    now = keeper.server_time_ms()
    rig.client.hset(rig.keys.workers(), mapping={"gone": encode_worker_record(_record(now - 60_000)),
                                                 "serving": encode_worker_record(_record(now))})
    done = keeper.run(lease_s=30)
    assert done is not None and done.workers_forgotten == ["gone"]
    assert list(rig.client.hgetall(rig.keys.workers())) == [b"serving"]


def test_one_worker_takes_the_housekeeping_lease_and_the_others_skip_the_round(rig: Rig) -> None:
    first, second = (Housekeeper(rig.client, rig.settings, name) for name in ("a", "b"))
    assert first.run(lease_s=30) is not None
    assert second.run(lease_s=30) is None


def test_trimming_keeps_everything_a_group_has_not_acknowledged_and_drops_old_acknowledged_entries(rig: Rig) -> None:
    key = rig.keys.usage(0)
    for n in range(10):
        rig.client.xadd(key, {"n": n}, id=f"{OLD}-{n}")
    rig.client.xgroup_create(key, "analytics", id="0")
    delivered = rig.client.xreadgroup("analytics", "reader", {key: ">"}, count=6)[0][1]
    rig.client.xack(key, "analytics", *[entry_id for entry_id, _ in delivered[:4]])  # 4 and 5 stay pending
    fresh = rig.client.xadd(key, {"n": "new"}).decode()
    keeper = Housekeeper(rig.client, rig.settings, "keeper")

    assert keeper.trim_outputs(keeper.server_time_ms())[key] == 4
    assert _ids(rig, key) == [f"{OLD}-{n}" for n in range(4, 10)] + [fresh]
    assert rig.client.xinfo_groups(key)[0]["lag"] == 5  # the group's view is intact: 4 undelivered old + 1 new

    rig.client.xack(key, "analytics", *[entry_id for entry_id, _ in delivered[4:]])
    rest = rig.client.xreadgroup("analytics", "reader", {key: ">"})[0][1]
    rig.client.xack(key, "analytics", *[entry_id for entry_id, _ in rest])
    assert keeper.trim_outputs(keeper.server_time_ms())[key] == 6
    assert _ids(rig, key) == [fresh]  # all read and acknowledged: old ones go by age, the new one stays


def test_a_group_that_never_reads_holds_its_stream(rig: Rig) -> None:
    key = rig.keys.usage(0)
    for n in range(3):
        rig.client.xadd(key, {"n": n}, id=f"{OLD}-{n}")
    rig.client.xgroup_create(key, "stuck", id="0")
    keeper = Housekeeper(rig.client, rig.settings, "keeper")
    assert keeper.trim_outputs(keeper.server_time_ms())[key] == 0
    assert len(_ids(rig, key)) == 3


def test_streams_without_a_group_are_trimmed_by_age_alone(rig: Rig) -> None:
    for key in (rig.keys.results(0), rig.keys.dead_letters(0)):
        for n in range(3):
            rig.client.xadd(key, {"n": n}, id=f"{OLD}-{n}")
    rig.publish("r1", recorded("openai_refusal"))
    rig.publish("r2", [b"not a chunk"])
    rig.worker().run()  # publishes two results and a dead letter
    keeper = Housekeeper(rig.client, rig.settings, "keeper")
    keeper.trim_outputs(keeper.server_time_ms())
    assert [record["request_id"] for record in rig.results()] == ["r1", "r2"]
    assert [fields[b"rid"] for fields in rig.dead_letters()] == [b"r2"]
