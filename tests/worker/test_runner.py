"""The Worker loop in one process, in burst mode: against fakeredis and, when one answers, a real Redis."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest
import redis

from pipeline_rig import Rig, client, recorded, recorded_names  # noqa: F401  (``client`` is a fixture)
from streamfold.connection import connect
from streamfold.errors import RedisUnavailable
from streamfold.settings import Settings
from worker import assemble
from worker.broker import Broker, Claim, Entry
from worker.cli import main


@pytest.fixture
def rig(client: redis.Redis, namespace: str) -> Rig:  # noqa: F811
    return Rig(client, namespace)


def test_burst_assembles_every_recorded_stream_once_exactly_as_assemble_does(rig: Rig) -> None:
    names = recorded_names()
    for name in names:
        rig.publish(name, recorded(name), meta={"tenant": "acme"})
    assert rig.worker(concurrency=4).run() == 0
    results = rig.results()
    assert sorted(record["request_id"] for record in results) == names
    assert sorted(event["request_id"] for event in rig.usage()) == names
    for record in results:
        expected = assemble(recorded(record["request_id"]))
        assert record["completion"] == expected["completion"]
        assert (record["status"], record["meta"]) == (expected["status"], {"tenant": "acme"})
    assert rig.pending() == []


def test_duplicate_chunks_and_a_second_attempt_give_one_result_of_the_latest_attempt(rig: Rig) -> None:
    first, second = recorded("openai_refusal"), recorded("openai_parallel_tool_calls")
    publisher = rig.publisher
    publisher.start("r1")
    for seq, chunk in enumerate(first[:6]):
        publisher.push("r1", chunk, seq=seq)
        publisher.push("r1", chunk, seq=seq)  # a producer retry wrote it twice
    attempt = publisher.new_attempt("r1")
    for chunk in second:
        publisher.push("r1", chunk, attempt=attempt)
    publisher.push("r1", first[6], attempt=0, seq=6)  # a late straggler of the old attempt
    publisher.end("r1")
    rig.worker().run()
    (record,) = rig.results()
    assert record["completion"] == assemble(second)["completion"]
    assert (record["metrics"]["attempts"], record["metrics"]["duplicates"]) == (2, 6 + 1)
    assert record["warnings"] == ["attempt 1 replaced attempt 0 after 6 chunks"]


def test_a_poison_chunk_is_dead_lettered_and_its_request_fails(rig: Rig) -> None:
    chunks = recorded("openai_refusal")
    rig.publish("r1", [*chunks[:4], b"\xff not a chunk", *chunks[4:]])
    rig.publish("r2", chunks)
    rig.worker().run()
    failed = rig.result("r1")
    assert failed["status"] == "failed" and failed["error"]["type"] == "invalid_chunk"
    assert failed["completion"] == assemble(chunks[:4])["completion"]
    assert rig.result("r2")["status"] == "completed"
    (dead,) = rig.dead_letters()
    assert (dead[b"rid"], dead[b"d"]) == (b"r1", b"\xff not a chunk")
    assert dead[b"reason"].startswith(b"seq 4: ")
    assert rig.pending() == []


def test_an_entry_that_is_not_an_envelope_is_dead_lettered(rig: Rig) -> None:
    rig.publish("r1", [], end=False)
    rig.client.xadd(rig.keys.chunks("r1"), {"d": "no kind"})
    rig.worker().run()
    assert rig.result("r1")["error"]["type"] == "invalid_envelope"
    assert [dead[b"d"] for dead in rig.dead_letters()] == [b"no kind"]


def test_a_stream_without_an_end_finishes_incomplete_after_the_stall_timeout(rig: Rig) -> None:
    chunks = recorded("groq_tool_call_whole_args")
    rig.publish("r1", chunks, end=False)
    rig.worker(stall_timeout=0.3).run()
    record = rig.result("r1")
    assert record["status"] == "incomplete"
    assert record["warnings"][0].startswith("stalled: no new entry for 0.3 s")
    assert record["completion"] == assemble(chunks)["completion"]


def test_a_request_finished_before_is_not_published_again(rig: Rig) -> None:
    rig.publish("r1", recorded("openai_refusal"))
    rig.worker().run()
    rig.client.xadd(rig.keys.requests(rig.keys.shard("r1")), {"rid": "r1", "ts": "0"})  # handed out again
    rig.worker("w2").run()
    assert len(rig.results()) == 1 and len(rig.usage()) == 1
    assert rig.pending() == []


class Spy(Broker):
    """A Broker that records how the loop uses it, and can fail reads as if Redis were gone."""

    def __init__(self, inner: Broker, failures: int = 0) -> None:
        self.__dict__.update(inner.__dict__)
        self.claim_counts: list[int] = []
        self.in_flight: list[int] = []
        self.failures = failures

    def claim(self, count: int, *, block_ms: int = 0, skip_quiet: bool = False) -> list[Claim]:
        self.claim_counts.append(count)
        return super().claim(count, block_ms=block_ms, skip_quiet=skip_quiet)

    def read(self, cursors: Mapping[str, str], *, watch: bool = False, block_ms: int = 0) -> dict[str, list[Entry]]:
        self.in_flight.append(len(cursors))
        if self.failures:
            self.failures -= 1
            raise RedisUnavailable("Redis unavailable: injected")
        return super().read(cursors, watch=watch, block_ms=block_ms)


def _spied(rig: Rig, *, concurrency: int, failures: int = 0, **settings: Any) -> tuple[Any, Spy]:
    worker = rig.worker(concurrency=concurrency, **settings)
    spy = worker.broker = Spy(worker.broker, failures)
    return worker, spy


def test_a_worker_never_holds_more_than_its_concurrency_and_a_full_one_claims_nothing(rig: Rig) -> None:
    for n in range(7):
        rig.publish(f"r{n}", recorded("openai_refusal"))
    worker, spy = _spied(rig, concurrency=2)
    worker.run()
    assert len(rig.results()) == 7
    assert max(spy.in_flight) <= 2
    assert all(0 < count <= 2 for count in spy.claim_counts)


def test_reads_that_fail_are_retried_with_every_request_kept(rig: Rig) -> None:
    names = recorded_names()[:5]
    for name in names:
        rig.publish(name, recorded(name))
    worker, spy = _spied(rig, concurrency=8, failures=3)
    worker.run()
    assert sorted(record["request_id"] for record in rig.results()) == names
    assert spy.failures == 0


def _faulty_reads(worker: Any, faults: int) -> list[int]:
    """Make the worker's next ``faults`` reads raise a fault of its own code; returns the faults left."""
    left = [faults]
    original_read = worker.broker.read

    def read(cursors: Mapping[str, str], **kwargs: Any) -> dict[str, list[Entry]]:
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("a fault in the worker's own code")
        return original_read(cursors, **kwargs)

    worker.broker.read = read
    return left


def test_a_passing_fault_is_logged_and_survived_with_every_request_kept(rig: Rig) -> None:
    names = recorded_names()[:3]
    for name in names:
        rig.publish(name, recorded(name))
    worker = rig.worker(concurrency=8)
    left = _faulty_reads(worker, 2)
    assert worker.run() == 0
    assert left == [0]
    assert sorted(record["request_id"] for record in rig.results()) == names


def test_a_fault_that_repeats_ends_the_worker_with_the_error(rig: Rig) -> None:
    rig.publish("r1", recorded("openai_refusal"))
    worker = rig.worker(concurrency=8)
    _faulty_reads(worker, 1_000)
    with pytest.raises(RuntimeError, match="own code"):
        worker.run()
    assert rig.results() == []
    assert [entry["consumer"] for entry in rig.pending()] != []  # left for a peer to recover


def test_stop_finishes_nothing_new_and_hands_back_what_is_in_flight(rig: Rig) -> None:
    chunks = recorded("openai_refusal")
    for n in range(3):
        rig.publish(f"r{n}", chunks[:5], end=False)
    worker = rig.worker("leaving", burst=False, claim_timeout=30.0, shutdown_grace=0.0)
    original_read = worker.broker.read

    def read_then_stop(cursors: Mapping[str, str], **kwargs: Any) -> dict[str, list[Entry]]:
        batches = original_read(cursors, **kwargs)
        worker.stop()
        rig.publish("late", chunks)  # arrives during the drain: not claimed by the leaving worker
        return batches

    worker.broker.read = read_then_stop  # type: ignore[method-assign]
    assert worker.run() == 0
    assert rig.results() == []
    assert {entry["consumer"] for entry in rig.pending()} == {b"leaving"}
    assert all(entry["time_since_delivered"] >= 30_000 for entry in rig.pending())
    for n in range(3):
        for seq, chunk in enumerate(chunks[5:], start=5):
            rig.publisher.push(f"r{n}", chunk, seq=seq)
        rig.publisher.end(f"r{n}")
    assert rig.worker("peer", claim_timeout=30.0).run() == 0  # recovers at once, not after 30 s
    assert sorted(record["request_id"] for record in rig.results()) == ["late", "r0", "r1", "r2"]
    assert all(record["completion"] == assemble(chunks)["completion"] for record in rig.results())


def test_a_stalled_workers_request_is_recovered_and_assembled_from_the_start(rig: Rig) -> None:
    chunks = recorded("deepseek_reasoner_tool_call")
    rig.publish("r1", chunks)
    (claim,) = rig.broker("crashed").claim(1)
    rig.client.xclaim(rig.keys.requests(0), "workers", "crashed", 0, [claim.entry_id], idle=60_000, justid=True)
    assert rig.worker("peer").run() == 0
    assert rig.result("r1")["completion"] == assemble(chunks)["completion"]
    assert rig.pending() == []


def test_burst_returns_at_once_when_there_is_nothing_to_do(rig: Rig) -> None:
    assert rig.worker().run() == 0
    assert rig.results() == []


def test_requests_spread_over_shards_are_all_served(client: redis.Redis, namespace: str) -> None:  # noqa: F811
    rig = Rig(client, namespace, shards=4)
    names = recorded_names()
    for name in names:
        rig.publish(name, recorded(name))
    assert len({rig.keys.shard(name) for name in names}) > 1
    rig.worker(concurrency=3).run()
    assert sorted(record["request_id"] for record in rig.results()) == names
    assert rig.pending() == []


def test_run_help_lists_the_settings_read_from_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--concurrency", "--burst", "--name", "STREAMFOLD_REDIS_URL", "STREAMFOLD_CLAIM_TIMEOUT",
                   "STREAMFOLD_STALL_TIMEOUT", "STREAMFOLD_SHUTDOWN_GRACE"):
        assert option in text


def test_a_worker_stopped_while_redis_is_unreachable_exits_at_once(namespace: str) -> None:
    client = connect(Settings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens on port 1
    worker = Rig(client, namespace).worker(burst=False, shutdown_grace=30.0)
    worker.stop()
    started = time.monotonic()
    assert worker.run() == 0
    assert time.monotonic() - started < 5
    client.close()
