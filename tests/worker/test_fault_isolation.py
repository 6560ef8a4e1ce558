"""One producer's bad data fails its own request and nothing else: each fault beside normal traffic.

Every test runs two ``python -m worker run`` processes on a real Redis, publishes normal requests around
one poisoned one, and checks that every normal request finished exactly once, as ``worker.assemble`` makes
it, that the poisoned one ended as it must (failed or incomplete, dead-lettered where an entry was
rejected, with a reason naming what was wrong), that nothing stays pending, and that both workers live.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from pipeline_rig import Rig, mixed_corpus, recorded, wait_until
from producer.publisher import Publisher
from streamfold.contract import encode_control, encode_start
from streamfold.errors import ConfigError
from streamfold.settings import load_settings
from worker import assemble, health
from tests.proxy import CuttableProxy
from worker_processes import WorkerProcess, spawn  # noqa: F401  (a fixture)

pytestmark = pytest.mark.redis

NORMAL = 12


@pytest.fixture
def rig(real_redis: redis.Redis, namespace: str) -> Rig:
    return Rig(real_redis, namespace)


def _deep(depth: int) -> bytes:
    """A JSON object nested ``depth`` levels: readable by the parser, deeper than an encoder writes."""
    return b'{"x":' * depth + b"1" + b"}" * depth


def _chunk(**fields: Any) -> bytes:
    return orjson.dumps({"id": "chatcmpl-poison", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         **fields})


def _beside_traffic(rig: Rig, spawn: Any, poison: Callable[[], None], **settings: Any
                    ) -> tuple[dict[str, list[bytes]], list[WorkerProcess]]:
    """Start two workers, publish normal requests before and after ``poison()``, wait for their results."""
    corpus = mixed_corpus(NORMAL)
    workers = [spawn(f"w{n}", claim_timeout=2, **settings) for n in range(2)]
    requests = list(corpus.items())
    for request_id, chunks in requests[:NORMAL // 2]:
        rig.publish(request_id, chunks)
    poison()
    for request_id, chunks in requests[NORMAL // 2:]:
        rig.publish(request_id, chunks)
    wait_until(lambda: set(corpus) <= {record["request_id"] for record in rig.results()}, timeout=30,
               what="every normal request's result")
    return corpus, workers


def _assert_isolated(rig: Rig, corpus: dict[str, list[bytes]], workers: list[WorkerProcess]) -> None:
    wait_until(lambda: not rig.pending(), what="every control entry to be acknowledged")
    results = [record for record in rig.results() if record["request_id"] in corpus]
    usage = [event for event in rig.usage() if event["request_id"] in corpus]
    assert sorted(record["request_id"] for record in results) == sorted(corpus)
    assert sorted(event["request_id"] for event in usage) == sorted(corpus)
    for record in results:
        expected = assemble(corpus[record["request_id"]])
        assert (record["status"], record["completion"]) == (expected["status"], expected["completion"])
    for worker in workers:
        assert worker.process.poll() is None, worker.log()
        assert "worker_fault" not in worker.log(), worker.log()


def _result(rig: Rig, request_id: str) -> dict[str, Any]:
    wait_until(lambda: any(record["request_id"] == request_id for record in rig.results()), timeout=30,
               what=f"the result of {request_id}")
    return rig.result(request_id)


def _dead_letter_reasons(rig: Rig, request_id: bytes) -> list[str]:
    return [fields[b"reason"].decode() for fields in rig.dead_letters() if fields[b"rid"] == request_id]


def _raw_request(rig: Rig, request_id: str, start: dict[str, bytes], *entries: dict[str, Any]) -> None:
    """Write a request the way a producer that skips the Publisher's checks would."""
    rig.client.xadd(rig.keys.chunks(request_id), start)
    for fields in entries:
        rig.client.xadd(rig.keys.chunks(request_id), fields)
    rig.client.xadd(rig.keys.requests(rig.keys.shard(request_id)), encode_control(request_id, ts=start["ts"]))


@pytest.mark.parametrize("poisoned", [
    pytest.param({"choices": [], "usage": orjson.Fragment(_deep(300))}, id="usage"),
    pytest.param({"choices": [{"index": 0, "delta": {"content": "hi"}}], "x_trace": orjson.Fragment(_deep(300))},
                 id="unknown-top-level-field"),
    pytest.param({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}, "x": orjson.Fragment(_deep(70))}]}}]},
        id="tool-call-field-past-the-limit"),
])
def test_a_chunk_nested_too_deep_to_encode_fails_its_own_request_only(rig: Rig, spawn: Any,
                                                                    poisoned: dict[str, Any]) -> None:
    chunks = [*recorded("openai_refusal")[:3], _chunk(**poisoned), *recorded("openai_refusal")[3:]]
    corpus, workers = _beside_traffic(rig, spawn, lambda: rig.publish("deep", chunks))
    record = _result(rig, "deep")
    assert (record["status"], record["error"]["type"]) == ("failed", "limit_exceeded")
    assert "STREAMFOLD_MAX_JSON_DEPTH=64" in record["error"]["message"]
    assert record["completion"]["choices"][0]["message"]["role"] == "assistant"  # the output before it is kept
    assert _dead_letter_reasons(rig, b"deep") == ["JSON nested deeper than STREAMFOLD_MAX_JSON_DEPTH=64"]
    _assert_isolated(rig, corpus, workers)


def test_a_start_whose_meta_is_nested_too_deep_fails_its_own_request_only(rig: Rig, spawn: Any) -> None:
    start = {"k": b"start", "att": b"0", "ts": b"1", "d": b'{"meta":' + _deep(300) + b"}"}
    corpus, workers = _beside_traffic(rig, spawn, lambda: _raw_request(rig, "deep-meta", start))
    record = _result(rig, "deep-meta")
    assert (record["status"], record["error"]["type"], record["meta"]) == ("failed", "limit_exceeded", {})
    _assert_isolated(rig, corpus, workers)


def test_an_envelope_timestamp_beyond_64_bits_fails_its_own_request_only(rig: Rig, spawn: Any) -> None:
    huge = {"k": b"chunk", "att": b"0", "ts": b"1" + b"0" * 30, "seq": b"0", "d": recorded("openai_refusal")[0]}
    start = encode_start({}, "auto", attempt=0, ts_ms=1)
    corpus, workers = _beside_traffic(rig, spawn, lambda: _raw_request(rig, "huge-ts", start, huge))
    record = _result(rig, "huge-ts")
    assert (record["status"], record["error"]["type"]) == ("failed", "invalid_envelope")
    assert len(_dead_letter_reasons(rig, b"huge-ts")) == 1
    _assert_isolated(rig, corpus, workers)


def test_a_chunk_stream_key_of_another_type_fails_its_own_request_only(rig: Rig, spawn: Any) -> None:
    def poison() -> None:
        rig.client.set(rig.keys.chunks("wrong-type"), b"a string, not a stream")
        rig.client.xadd(rig.keys.requests(0), encode_control("wrong-type", ts=b"1"))

    corpus, workers = _beside_traffic(rig, spawn, poison)
    record = _result(rig, "wrong-type")
    assert (record["status"], record["error"]["type"]) == ("failed", "invalid_stream")
    assert "holds a string, not a stream" in record["error"]["message"]
    _assert_isolated(rig, corpus, workers)


@pytest.mark.parametrize("request_id", [b"\xff\xfe-not-utf8", b"has space", b""])
def test_a_control_entry_without_a_valid_request_id_is_dead_lettered_alone(rig: Rig, spawn: Any,
                                                                           request_id: bytes) -> None:
    poison = lambda: rig.client.xadd(rig.keys.requests(0), {"rid": request_id, "ts": b"1"})  # noqa: E731
    corpus, workers = _beside_traffic(rig, spawn, poison)
    wait_until(lambda: _dead_letter_reasons(rig, request_id), what="the dead letter")
    assert "request id" in _dead_letter_reasons(rig, request_id)[0]
    _assert_isolated(rig, corpus, workers)
    assert health.check(rig.client, rig.settings)[0]


def test_a_stall_timeout_not_above_the_socket_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_STALL_TIMEOUT", "10")
    monkeypatch.setenv("STREAMFOLD_SOCKET_TIMEOUT", "10")
    with pytest.raises(ConfigError, match="stall_timeout must be longer than socket_timeout"):
        load_settings()


def test_time_redis_does_not_answer_never_counts_as_a_requests_silence(rig: Rig, spawn: Any) -> None:
    kwargs = rig.client.connection_pool.connection_kwargs
    proxy = CuttableProxy((kwargs["host"], kwargs["port"]))
    try:
        corpus = mixed_corpus(6)
        for request_id, chunks in corpus.items():
            rig.publish(request_id, chunks[:1], end=False)
        url = f"redis://127.0.0.1:{proxy.port}/{kwargs.get('db', 0)}"
        frozen = spawn("frozen", redis_url=url, claim_timeout=30, socket_timeout=1, stall_timeout=2)
        wait_until(lambda: sum(entry["consumer"] == b"frozen" for entry in rig.pending()) == len(corpus),
                   what="the worker to claim every request")
        proxy.freeze()  # connections stay up, Redis never answers: every read waits out the socket timeout
        time.sleep(4)  # twice the stall timeout
        for request_id, chunks in corpus.items():
            for seq, chunk in enumerate(chunks[1:], start=1):
                rig.publisher.push(request_id, chunk, seq=seq)
            rig.publisher.end(request_id)
        rig.publisher.flush()
        proxy.thaw()
        wait_until(lambda: len(rig.results()) == len(corpus), timeout=20, what="the results after the thaw")
        frozen.signal(signal.SIGTERM)
        assert frozen.wait() == 0, frozen.log()
        assert "request_stalled" not in frozen.log()
        for record in rig.results():
            assert record["completion"] == assemble(corpus[record["request_id"]])["completion"]
            assert record["status"] == assemble(corpus[record["request_id"]])["status"]
    finally:
        proxy.close()


def test_a_second_producer_starting_an_open_request_fails_it_with_a_clear_error(rig: Rig, spawn: Any) -> None:
    chunks = recorded("openai_refusal")

    def poison() -> None:
        first = Publisher(rig.client, rig.keys, batch_size=1)
        first.start("reused", token="producer-a")
        for chunk in chunks[:4]:
            first.push("reused", chunk)
        # A second producer that skips the id check (its own writes, an expired claim) starts it again.
        _raw_request(rig, "reused", encode_start({}, "auto", attempt=0, ts_ms=2, token="producer-b"))
        for chunk in chunks[4:]:
            first.push("reused", chunk)
        first.end("reused")

    corpus, workers = _beside_traffic(rig, spawn, poison)
    record = _result(rig, "reused")
    assert (record["status"], record["error"]["type"]) == ("failed", "request_id_reused")
    assert "second producer" in record["error"]["message"]
    _assert_isolated(rig, corpus, workers)
    assert [record["request_id"] for record in rig.results()].count("reused") == 1


def test_a_request_id_reused_after_the_first_finished_is_dead_lettered_not_published(rig: Rig, spawn: Any) -> None:
    first_chunks, second_chunks = recorded("openai_refusal"), recorded("groq_tool_call_whole_args")
    rig.publish("reused", first_chunks, token="producer-a")
    workers = [spawn("w0", claim_timeout=2)]
    first = _result(rig, "reused")

    def poison() -> None:
        # Long after: the first request's claim and chunks expired, and another producer takes the id.
        rig.client.delete(rig.keys.owner("reused"), rig.keys.chunks("reused"))
        second = Publisher(rig.client, rig.keys, batch_size=1)
        second.start("reused", token="producer-b")
        for chunk in second_chunks:
            second.push("reused", chunk)
        second.end("reused")

    corpus, more = _beside_traffic(rig, spawn, poison)
    wait_until(lambda: _dead_letter_reasons(rig, b"reused"), what="the reused id's dead letter")
    assert "request id reused" in _dead_letter_reasons(rig, b"reused")[0]
    assert [record for record in rig.results() if record["request_id"] == "reused"] == [first]
    assert rig.result("reused")["completion"] == assemble(first_chunks)["completion"]
    assert any("request_id_reused" in worker.log() for worker in workers + more)
    _assert_isolated(rig, corpus, workers + more)


def test_a_gap_in_seq_ends_the_request_incomplete_never_completed(rig: Rig, spawn: Any) -> None:
    chunks = recorded("openai_parallel_tool_calls")

    def poison() -> None:
        rig.publisher.start("gap")
        for seq, chunk in enumerate(chunks):
            if seq != 6:  # a write lost in a crash: the first call's arguments lose a fragment
                rig.publisher.push("gap", chunk, seq=seq)
        rig.publisher.end("gap")
        rig.publisher.flush()

    corpus, workers = _beside_traffic(rig, spawn, poison)
    record = _result(rig, "gap")
    assert record["status"] == "incomplete"
    assert any("chunks 6..6 missing" in warning for warning in record["warnings"])
    assert any("not valid JSON" in warning for warning in record["warnings"])
    _assert_isolated(rig, corpus, workers)


def test_each_limit_fails_only_the_request_that_crosses_it(rig: Rig, spawn: Any) -> None:
    small = b'{"choices":[{"index":0,"delta":{"content":"' + b"x" * 500 + b'"}}]}'

    def poison() -> None:
        rig.publish("many-chunks", [b'{"choices":[{"index":0,"delta":{"content":"x"}}]}'] * 301)
        rig.publish("big-chunk", [_chunk(choices=[{"index": 0, "delta": {"content": "x" * 2_000}}])])
        rig.publish("big-request", [small] * 250)

    corpus, workers = _beside_traffic(rig, spawn, poison, max_chunks=300, max_chunk_bytes=1024,
                                      max_request_bytes=100_000)
    for request_id, setting in (("many-chunks", "STREAMFOLD_MAX_CHUNKS=300"),
                                ("big-chunk", "STREAMFOLD_MAX_CHUNK_BYTES=1024"),
                                ("big-request", "STREAMFOLD_MAX_REQUEST_BYTES=100000")):
        record = _result(rig, request_id)
        assert (record["status"], record["error"]["type"]) == ("failed", "limit_exceeded")
        assert setting in record["error"]["message"]
    assert all(len(fields[b"d"]) <= 65_536 for fields in rig.dead_letters())
    _assert_isolated(rig, corpus, workers)
