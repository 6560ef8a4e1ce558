"""Worker processes against a real Redis, under the faults the pipeline must survive.

Each test runs ``python -m worker run`` as real processes, kills, stops or cuts them off mid-stream, and
checks the one promise: every request gets exactly one result and one usage event, equal to what
``worker.assemble`` makes of the same chunks.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
import redis

from pipeline_rig import Rig, mixed_corpus, recorded, wait_until
from tests.proxy import CuttableProxy
from worker_processes import spawn  # noqa: F401  (a fixture)
from worker import assemble

pytestmark = pytest.mark.redis


@pytest.fixture
def rig(real_redis: redis.Redis, namespace: str) -> Rig:
    return Rig(real_redis, namespace)


def _owned_by(rig: Rig, consumer: str) -> int:
    return sum(entry["consumer"] == consumer.encode() for entry in rig.pending())


def _push(rig: Rig, corpus: dict[str, list[bytes]], start: int, stop: int | None, *, end: bool) -> None:
    for request_id, chunks in corpus.items():
        for seq, chunk in enumerate(chunks[start:stop], start=start):
            rig.publisher.push(request_id, chunk, seq=seq)
        if end:
            rig.publisher.end(request_id)
    rig.publisher.flush()


def _assert_exactly_once(rig: Rig, corpus: dict[str, list[bytes]]) -> None:
    results, usage = rig.results(), rig.usage()
    assert sorted(record["request_id"] for record in results) == sorted(corpus)
    assert sorted(event["request_id"] for event in usage) == sorted(corpus)
    for record in results:
        expected = assemble(corpus[record["request_id"]])
        assert (record["status"], record["completion"]) == (expected["status"], expected["completion"])
    assert rig.pending() == []


def test_a_worker_killed_mid_stream_loses_and_doubles_nothing(rig: Rig, spawn: Any) -> None:
    corpus = mixed_corpus(24)
    finished_first = dict(list(corpus.items())[:4])
    for request_id, chunks in corpus.items():
        rig.publish(request_id, chunks[:len(chunks) // 2], end=False)
    doomed = spawn("doomed", claim_timeout=1)
    wait_until(lambda: _owned_by(rig, "doomed") == len(corpus), what="the doomed worker to claim every request")
    for request_id, chunks in finished_first.items():
        for seq, chunk in enumerate(chunks[len(chunks) // 2:], start=len(chunks) // 2):
            rig.publisher.push(request_id, chunk, seq=seq)
        rig.publisher.end(request_id)
    wait_until(lambda: len(rig.results()) == len(finished_first), what="the doomed worker's first results")
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    rest = {rid: chunks for rid, chunks in corpus.items() if rid not in finished_first}
    for request_id, chunks in rest.items():
        for seq, chunk in enumerate(chunks[len(chunks) // 2:], start=len(chunks) // 2):
            rig.publisher.push(request_id, chunk, seq=seq)
        rig.publisher.end(request_id)
    survivors = [spawn(name, claim_timeout=1) for name in ("survivor-a", "survivor-b")]
    wait_until(lambda: len(rig.results()) >= len(corpus) and not rig.pending(), timeout=20,
               what="the survivors to recover every request")
    # On a loaded machine one survivor can recover everything while the other is still starting up.
    wait_until(lambda: all("worker_started" in survivor.log() for survivor in survivors),
               what="both survivors to serve (their SIGTERM handling in place)")
    for survivor in survivors:
        survivor.signal(signal.SIGTERM)
        assert survivor.wait() == 0, survivor.log()
    _assert_exactly_once(rig, corpus)
    recovered = sum(survivor.log().count("recovered") for survivor in survivors)
    assert recovered >= len(rest)


def test_sigterm_finishes_what_it_can_hands_back_the_rest_and_exits_0(rig: Rig, spawn: Any) -> None:
    corpus = mixed_corpus(6)
    for request_id, chunks in corpus.items():
        rig.publish(request_id, chunks[:2], end=False)
    leaving = spawn("leaving", claim_timeout=30, shutdown_grace=2)
    wait_until(lambda: _owned_by(rig, "leaving") == len(corpus), what="the worker to claim every request")
    leaving.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in leaving.log(), what="the worker to start draining")
    rig.publish("late", recorded("openai_refusal"))  # must not be claimed by a draining worker
    ending = dict(list(corpus.items())[:3])
    _push(rig, ending, 2, None, end=True)
    assert leaving.wait() == 0, leaving.log()
    assert sorted(record["request_id"] for record in rig.results()) == sorted(ending)
    handed_back = [entry for entry in rig.pending() if entry["consumer"] == b"leaving"]
    assert len(handed_back) == 3 and all(entry["time_since_delivered"] >= 30_000 for entry in handed_back)
    _push(rig, {rid: chunks for rid, chunks in corpus.items() if rid not in ending}, 2, None, end=True)
    peer = spawn("peer", "--burst", claim_timeout=30)  # recovers the handed-back requests without waiting 30 s
    assert peer.wait() == 0, peer.log()
    _assert_exactly_once(rig, {**corpus, "late": recorded("openai_refusal")})


def test_a_second_sigterm_hands_back_at_once(rig: Rig, spawn: Any) -> None:
    corpus = mixed_corpus(3)
    for request_id, chunks in corpus.items():
        rig.publish(request_id, chunks[:2], end=False)
    leaving = spawn("leaving", claim_timeout=30, shutdown_grace=60)
    wait_until(lambda: _owned_by(rig, "leaving") == len(corpus), what="the worker to claim every request")
    leaving.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in leaving.log(), what="the worker to start draining")
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(timeout=5) == 0, leaving.log()
    assert all(entry["time_since_delivered"] >= 30_000 for entry in rig.pending())


def test_a_worker_restarted_under_its_name_resumes_its_claims_at_once(rig: Rig, spawn: Any) -> None:
    corpus = mixed_corpus(4)
    for request_id, chunks in corpus.items():
        rig.publish(request_id, chunks[:2], end=False)
    first = spawn("steady", claim_timeout=30)
    wait_until(lambda: _owned_by(rig, "steady") == len(corpus), what="the worker to claim every request")
    first.signal(signal.SIGKILL)
    first.wait()
    _push(rig, corpus, 2, None, end=True)
    again = spawn("steady", "--burst", claim_timeout=30)  # no waiting out the 30 s claim timeout
    assert again.wait() == 0, again.log()
    _assert_exactly_once(rig, corpus)


def test_a_cut_and_restored_connection_loses_nothing(rig: Rig, spawn: Any, real_redis_url: str) -> None:
    kwargs = rig.client.connection_pool.connection_kwargs
    proxy = CuttableProxy((kwargs["host"], kwargs["port"]))
    try:
        corpus = mixed_corpus(10)
        for request_id, chunks in corpus.items():
            rig.publish(request_id, chunks[:3], end=False)
        url = f"redis://127.0.0.1:{proxy.port}/{kwargs.get('db', 0)}"
        cut_off = spawn("cut-off", redis_url=url, claim_timeout=30, stall_timeout=30)
        wait_until(lambda: _owned_by(rig, "cut-off") == len(corpus), what="the worker to claim every request")
        proxy.cut()
        _push(rig, corpus, 3, None, end=True)  # everything else arrives while the worker is cut off
        wait_until(lambda: proxy.refused >= 3, what="the worker to retry a few times")
        assert rig.results() == []
        proxy.restore()
        wait_until(lambda: len(rig.results()) == len(corpus), timeout=15, what="the results after the restore")
        cut_off.signal(signal.SIGTERM)
        assert cut_off.wait() == 0, cut_off.log()
        assert "Redis unavailable" in cut_off.log()
        _assert_exactly_once(rig, corpus)
    finally:
        proxy.close()
