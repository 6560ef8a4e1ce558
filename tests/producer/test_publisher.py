"""The Publisher writes the wire contract byte for byte: start + control together, chunks in order, batched."""

from __future__ import annotations

import socket
from typing import Any

import fakeredis
import orjson
import pytest
import redis
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.publisher import Publisher, new_request_id, raw_payload
from streamfold.contract import validate_request_id
from streamfold import contract
from streamfold.contract import Envelope
from streamfold.errors import ContractError, RedisRefused, RedisUnavailable
from streamfold.keys import Keys

RECORDED_LINE = (b'{"id":"cca85624","object":"chat.completion.chunk","created":1764664568,"model":"deepseek-reasoner",'
                 b'"choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":"Hm"},'
                 b'"logprobs":null,"finish_reason":null}]}')


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=4)


def envelopes(client: redis.Redis, keys: Keys, request_id: str) -> list[Envelope]:
    return [contract.decode_envelope(fields) for _, fields in client.xrange(keys.chunks(request_id))]


def control_entries(client: redis.Redis, keys: Keys) -> list[dict[bytes, bytes]]:
    return [fields for shard in keys.shard_ids() for _, fields in client.xrange(keys.requests(shard))]


def test_start_claims_the_id_and_writes_the_start_envelope_and_the_control_entry(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys, max_age=1_000)
    publisher.start("req-1", {"user": "u1"}, "cumulative", token="producer-a")

    [start] = envelopes(fake_redis, keys, "req-1")
    assert start.kind == "start" and start.attempt == 0
    assert contract.decode_start(start) == contract.Start({"user": "u1"}, "cumulative", token="producer-a")
    [control] = control_entries(fake_redis, keys)
    assert control[b"rid"] == b"req-1" and int(control[b"ts"]) == start.ts_ms
    assert fake_redis.get(keys.owner("req-1")) == b"producer-a"
    assert 990 < fake_redis.ttl(keys.owner("req-1")) <= 1_000


def test_a_request_id_in_use_by_another_producer_is_refused_and_nothing_written(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    first, second = Publisher(fake_redis, keys), Publisher(fake_redis, keys)
    first.start("req-1")
    with pytest.raises(ContractError, match="already in use"):
        second.start("req-1")
    with pytest.raises(ContractError, match="already in use"):
        first.start("req-1", token="someone-else")
    assert len(envelopes(fake_redis, keys, "req-1")) == 1
    assert len(control_entries(fake_redis, keys)) == 1


def test_the_same_producer_may_start_again_after_a_lost_reply_or_in_a_rerun(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys)
    publisher.start("req-1")
    publisher.start("req-1")  # its own retry: same token
    Publisher(fake_redis, keys).start("req-2", token="job-7")
    Publisher(fake_redis, keys).start("req-2", token="job-7")  # a re-run of the same job, in a new process
    assert [e.kind for e in envelopes(fake_redis, keys, "req-1")] == ["start", "start"]
    assert len(envelopes(fake_redis, keys, "req-2")) == 2


def test_request_keys_of_one_request_share_the_shard_slot(keys: Keys) -> None:
    request_id = new_request_id()
    tag = keys.tag(keys.shard(request_id))
    assert tag in keys.chunks(request_id) and tag in keys.requests(keys.shard(request_id))


def test_chunks_are_stored_byte_for_byte_in_push_order_numbered_from_zero(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    payloads = [RECORDED_LINE, b'{"a": 1,   "b": "\\u00e9"}', b"not json at all", b""]
    with Publisher(fake_redis, keys) as publisher:
        publisher.start("req-1")
        seqs = [publisher.push("req-1", payload) for payload in payloads]
        publisher.end("req-1")

    stored = envelopes(fake_redis, keys, "req-1")
    assert [e.kind for e in stored] == ["start", "chunk", "chunk", "chunk", "chunk", "end"]
    assert [e.payload for e in stored[1:-1]] == payloads
    assert [e.seq for e in stored[1:-1]] == seqs == [0, 1, 2, 3]
    assert stored[-1].chunks == 4  # the end counts them: lost last chunks can be told
    assert {e.attempt for e in stored} == {0}


def test_str_dict_and_model_chunks_are_serialised_once_and_exactly(fake_redis: fakeredis.FakeRedis,
                                                                    keys: Keys) -> None:
    class DumpOnly:
        def model_dump(self, **_: Any) -> dict[str, Any]:
            return {"id": "x", "choices": []}

    sdk_chunk = ChatCompletionChunk.model_validate(orjson.loads(RECORDED_LINE))
    with Publisher(fake_redis, keys) as publisher:
        publisher.start("req-1")
        publisher.push("req-1", '{"content": "héllo ✓"}')
        publisher.push("req-1", {"content": "héllo", "n": [1, 2]})
        publisher.push("req-1", sdk_chunk)
        publisher.push("req-1", DumpOnly())
        publisher.push("req-1", bytearray(b"{}"))

    stored = [e.payload for e in envelopes(fake_redis, keys, "req-1")[1:]]
    assert stored[0] == '{"content": "héllo ✓"}'.encode()
    assert stored[1] == orjson.dumps({"content": "héllo", "n": [1, 2]})
    # The SDK chunk comes back as the object the upstream sent: no null padding, provider extras kept.
    assert orjson.loads(stored[2]) == orjson.loads(RECORDED_LINE)
    assert orjson.loads(stored[3]) == {"id": "x", "choices": []}
    assert stored[4] == b"{}"


@pytest.mark.parametrize("chunk", [42, None, ["a"], object(), {"x": {1, 2}}, {1: "int key"}])
def test_chunks_of_other_types_are_rejected_with_contract_error(chunk: object) -> None:
    with pytest.raises(ContractError):
        raw_payload(chunk)


def test_a_model_that_cannot_serialise_is_rejected_with_contract_error() -> None:
    class Opaque(BaseModel):
        value: Any

    with pytest.raises(ContractError, match="Opaque"):
        raw_payload(Opaque(value=object()))


@pytest.mark.parametrize("request_id", ["", "a b", "tab\there", "line\nbreak", "x" * 201, 17])
def test_bad_request_ids_are_rejected_before_anything_is_written(
        fake_redis: fakeredis.FakeRedis, keys: Keys, request_id: Any) -> None:
    publisher = Publisher(fake_redis, keys, batch_size=1)
    for write in (lambda: publisher.start(request_id), lambda: publisher.push(request_id, b"{}"),
                  lambda: publisher.end(request_id), lambda: publisher.fail(request_id, "boom")):
        with pytest.raises(ContractError, match="request id"):
            write()
    assert fake_redis.keys("*") == []


def test_request_ids_up_to_200_visible_characters_are_fine() -> None:
    assert validate_request_id("x" * 200) == "x" * 200
    assert validate_request_id("tenant:42/req-ü") == "tenant:42/req-ü"
    assert len(new_request_id()) == 32 and validate_request_id(new_request_id())


def test_bad_mode_or_meta_writes_nothing(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys)
    with pytest.raises(ContractError, match="mode"):
        publisher.start("req-1", mode="streaming")  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="meta"):
        publisher.start("req-1", {"when": object()})
    with pytest.raises(ContractError, match="meta"):
        publisher.start("req-1", ["not", "a", "mapping"])  # type: ignore[arg-type]
    assert fake_redis.keys("*") == []


def test_pushes_wait_in_the_buffer_until_batch_size_entries(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys, batch_size=3)
    publisher.start("req-1")
    publisher.push("req-1", b"{}")
    publisher.push("req-1", b"{}")
    assert fake_redis.xlen(keys.chunks("req-1")) == 1
    assert publisher.buffered == 2
    publisher.push("req-1", b"{}")
    assert fake_redis.xlen(keys.chunks("req-1")) == 4
    assert publisher.buffered == 0


def test_end_fail_flush_and_leaving_the_with_block_each_send_the_buffer(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    with Publisher(fake_redis, keys, batch_size=100) as publisher:
        for request_id in ("ended", "failed", "flushed", "open"):
            publisher.start(request_id)
            publisher.push(request_id, b"{}")
        publisher.end("ended")
        assert [e.kind for e in envelopes(fake_redis, keys, "ended")] == ["start", "chunk", "end"]
        publisher.fail("failed", "boom")
        assert [e.kind for e in envelopes(fake_redis, keys, "failed")] == ["start", "chunk", "error"]
        publisher.push("flushed", b"[]")
        publisher.flush()
        assert [e.kind for e in envelopes(fake_redis, keys, "flushed")] == ["start", "chunk", "chunk"]
        publisher.push("open", b"{}")
        assert fake_redis.xlen(keys.chunks("open")) == 2  # start + the push an earlier flush sent
    assert fake_redis.xlen(keys.chunks("open")) == 3


def test_batch_size_one_sends_every_push_at_once(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys, batch_size=1)
    publisher.start("live")
    for n in range(1, 4):
        publisher.push("live", b"{}")
        assert fake_redis.xlen(keys.chunks("live")) == 1 + n


def test_explicit_seq_is_kept_and_later_pushes_number_after_it(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    with Publisher(fake_redis, keys) as publisher:
        publisher.start("req-1")
        assert publisher.push("req-1", b"a") == 0
        assert publisher.push("req-1", b"b", seq=5) == 5
        assert publisher.push("req-1", b"a-again", seq=0) == 0  # a producer retry re-pushing a duplicate
        assert publisher.push("req-1", b"c") == 6
    assert [e.seq for e in envelopes(fake_redis, keys, "req-1")[1:]] == [0, 5, 0, 6]


def test_a_new_attempt_numbers_its_chunks_from_zero_and_tags_the_end(fake_redis: fakeredis.FakeRedis,
                                                                      keys: Keys) -> None:
    with Publisher(fake_redis, keys) as publisher:
        publisher.start("req-1")
        publisher.push("req-1", b"first-0")
        publisher.push("req-1", b"first-1")
        assert publisher.new_attempt("req-1") == 1
        publisher.push("req-1", b"second-0")
        publisher.push("req-1", b"explicit-old", attempt=0)
        publisher.end("req-1")

    stored = [(e.kind, e.attempt, e.seq) for e in envelopes(fake_redis, keys, "req-1")]
    assert stored == [("start", 0, -1), ("chunk", 0, 0), ("chunk", 0, 1), ("chunk", 1, 0), ("chunk", 0, 2),
                      ("end", 1, -1)]


def test_new_attempt_follows_attempts_another_publisher_wrote(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    first = Publisher(fake_redis, keys, batch_size=1)
    first.start("req-1")
    first.push("req-1", b"{}")
    assert first.new_attempt("req-1") == 1
    first.push("req-1", b"{}")

    rerun = Publisher(fake_redis, keys, batch_size=1)
    assert rerun.new_attempt("req-1") == 2
    assert rerun.push("req-1", b"{}") == 0
    assert envelopes(fake_redis, keys, "req-1")[-1].attempt == 2


def test_fail_normalises_str_error_bodies_and_exceptions(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    class APIStatusError(Exception):
        status_code = 429
        code = "rate_limit_exceeded"
        type = "requests"

    failures: list[Any] = [
        "connection reset",
        {"error": {"message": "overloaded", "type": "server_error", "code": 529, "status": 529}},
        {"message": "bad gateway", "status_code": 502},
        APIStatusError("slow down"),
    ]
    with Publisher(fake_redis, keys) as publisher:
        for n, failure in enumerate(failures):
            publisher.start(f"req-{n}")
            publisher.fail(f"req-{n}", failure)

    errors = [contract.decode_error(envelopes(fake_redis, keys, f"req-{n}")[-1]) for n in range(len(failures))]
    assert errors == [
        {"message": "connection reset", "type": "upstream_error", "status": None, "code": None},
        {"message": "overloaded", "type": "server_error", "status": 529, "code": "529"},
        {"message": "bad gateway", "type": "upstream_error", "status": 502, "code": None},
        {"message": "slow down", "type": "requests", "status": 429, "code": "rate_limit_exceeded"},
    ]


def test_connection_failures_surface_as_redis_unavailable(keys: Keys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
        publisher = Publisher(client, keys, batch_size=10)
        with pytest.raises(RedisUnavailable, match="starting request req-1"):
            publisher.start("req-1")
        publisher.push("req-1", b"{}")
        with pytest.raises(RedisUnavailable, match="sending 1 buffered"):
            publisher.flush()
        assert publisher.buffered == 0
        with pytest.raises(RedisUnavailable):
            publisher.new_attempt("req-1")
        client.close()


def test_batch_size_must_be_positive(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    with pytest.raises(ValueError):
        Publisher(fake_redis, keys, batch_size=0)


@pytest.mark.parametrize(("attempt", "seq"), [(-1, None), (0, -1), (True, None), (0, "3")])
def test_negative_or_non_integer_attempts_and_seqs_are_rejected(fake_redis: fakeredis.FakeRedis, keys: Keys,
                                                                attempt: Any, seq: Any) -> None:
    publisher = Publisher(fake_redis, keys, batch_size=1)
    with pytest.raises(ContractError, match="attempt|seq"):
        publisher.push("req-1", b"{}", attempt=attempt, seq=seq)
    assert fake_redis.keys("*") == []


def test_redis_error_answers_surface_as_redis_unavailable(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    fake_redis.set(keys.chunks("req-1"), b"not a stream")
    publisher = Publisher(fake_redis, keys, batch_size=1)
    with pytest.raises(RedisRefused, match="WRONGTYPE"):
        publisher.push("req-1", b"{}")


def test_a_chunk_stream_lives_no_longer_than_max_age_unless_a_finish_cut_it_shorter(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publisher = Publisher(fake_redis, keys, batch_size=1, max_age=1_000)
    publisher.start("req-1")
    assert 990 < fake_redis.ttl(keys.chunks("req-1")) <= 1_000
    fake_redis.expire(keys.chunks("req-1"), 60)  # as the worker's finish does
    publisher.end("req-1")
    assert fake_redis.ttl(keys.chunks("req-1")) <= 60

    stray = Publisher(fake_redis, keys, batch_size=1, max_age=1_000)  # pushes for a stream never started here
    stray.push("req-2", b"{}")
    stray.end("req-2")
    assert 990 < fake_redis.ttl(keys.chunks("req-2")) <= 1_000
