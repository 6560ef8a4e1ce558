"""Replay pushes a capture as a producer would: start, the exact payloads in order, then end or error."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import fakeredis
import pytest
import redis

from producer import replay as replay_module
from producer.publisher import Publisher
from producer.replay import replay
from streamfold import contract
from streamfold.contract import Envelope
from streamfold.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "fixtures" / "recorded"
SEEDS = ROOT / "fixtures" / "seeds"


def capture_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=2)


@pytest.fixture
def publisher(fake_redis: fakeredis.FakeRedis, keys: Keys) -> Publisher:
    return Publisher(fake_redis, keys, batch_size=7)


def envelopes(client: redis.Redis, keys: Keys, request_id: str) -> list[Envelope]:
    return [contract.decode_envelope(fields) for _, fields in client.xrange(keys.chunks(request_id))]


def assert_replayed(client: redis.Redis, keys: Keys, request_id: str, payloads: list[bytes], source: str,
                    last: str = "end") -> None:
    stored = envelopes(client, keys, request_id)
    assert stored[0].kind == "start"
    assert contract.decode_start(stored[0]).meta == {"source": source}
    chunks = stored[1:-1]
    assert [e.payload for e in chunks] == payloads
    assert [e.seq for e in chunks] == list(range(len(payloads)))
    assert stored[-1].kind == last


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.jsonl")) + sorted(SEEDS.glob("*.jsonl")),
                         ids=lambda path: path.stem)
def test_recorded_captures_are_pushed_byte_for_byte_then_ended(
        path: Path, publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    [request_id] = replay(publisher, [path])
    assert_replayed(fake_redis, keys, request_id, capture_lines(path), path.name)
    [control] = [fields for _, fields in fake_redis.xrange(keys.requests(keys.shard(request_id)))]
    assert control[b"rid"] == request_id.encode()


def test_an_sse_capture_pushes_its_data_payloads_and_ends_at_done(
        tmp_path: Path, publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    chunks = [b'{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}',
              b'{"id":"c1","choices":[{"index":0,"delta":{"content":"l\xc3\xb6"},"finish_reason":"stop"}]}']
    capture = tmp_path / "stream.sse"
    capture.write_bytes(b": keep-alive\n\n" + b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks)
                        + b"data: [DONE]\n\n" + b'data: {"after":"done"}\n\n')

    [request_id] = replay(publisher, [capture], mode="incremental")
    assert_replayed(fake_redis, keys, request_id, chunks, "stream.sse")
    assert contract.decode_start(envelopes(fake_redis, keys, request_id)[0]).mode == "incremental"


def test_an_sse_error_event_fails_the_request(tmp_path: Path, publisher: Publisher,
                                              fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    capture = tmp_path / "overloaded.sse"
    capture.write_bytes(b'data: {"id":"c1","choices":[]}\n\nevent: error\n'
                        b'data: {"error":{"message":"overloaded","type":"server_error","code":"529"}}\n\n')
    [request_id] = replay(publisher, [capture])
    assert_replayed(fake_redis, keys, request_id, [b'{"id":"c1","choices":[]}'], "overloaded.sse", last="error")
    error = contract.decode_error(envelopes(fake_redis, keys, request_id)[-1])
    assert error == {"message": "overloaded", "type": "server_error", "status": None, "code": "529"}


def test_copies_are_separate_requests_listed_in_input_order(
        publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    files = [RECORDED / "groq_tool_call_whole_args.jsonl", RECORDED / "openai_refusal.jsonl"]
    request_ids = replay(publisher, files, copies=3)
    assert len(set(request_ids)) == 6
    sources = [contract.decode_start(envelopes(fake_redis, keys, rid)[0]).meta["source"] for rid in request_ids]
    assert sources == [files[0].name] * 3 + [files[1].name] * 3


def test_open_requests_stream_at_once_their_chunks_interleaved_each_still_byte_for_byte(
        publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    for verb in ("start", "push", "end"):
        original = getattr(publisher, verb)
        monkeypatch.setattr(publisher, verb, lambda rid, *args, _verb=verb, _original=original, **kwargs: (
            calls.append((_verb, rid)), _original(rid, *args, **kwargs))[1])
    files = [RECORDED / "groq_tool_call_whole_args.jsonl", RECORDED / "openai_refusal.jsonl"]
    request_ids = replay(publisher, files, copies=3, open_at_once=4)
    sources = [contract.decode_start(envelopes(fake_redis, keys, rid)[0]).meta["source"] for rid in request_ids]
    assert sources == [files[0].name] * 3 + [files[1].name] * 3
    for request_id, path in zip(request_ids, [files[0]] * 3 + [files[1]] * 3):
        assert_replayed(fake_redis, keys, request_id, capture_lines(path), path.name)
    first_end = next(n for n, (verb, _) in enumerate(calls) if verb == "end")
    assert [rid for verb, rid in calls[:first_end] if verb == "start"] == request_ids[:4]  # four open at once
    assert calls[4:8] == [("push", rid) for rid in request_ids[:4]]  # one chunk each, in turn
    assert calls.index(("start", request_ids[4])) > first_end  # the fifth waits for a slot


def test_a_capture_read_from_stdin(publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lines = capture_lines(RECORDED / "mistral_tool_call_no_index.jsonl")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n".join(lines) + b"\n")))
    [request_id] = replay(publisher, ["-"])
    assert_replayed(fake_redis, keys, request_id, lines, "<stdin>")


def test_a_missing_file_pushes_nothing(tmp_path: Path, publisher: Publisher, fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(FileNotFoundError):
        replay(publisher, [RECORDED / "openai_refusal.jsonl", tmp_path / "missing.jsonl"])
    assert fake_redis.keys("*") == []


def test_rate_paces_chunks_and_sends_what_was_pushed_before_each_pause(
        publisher: Publisher, fake_redis: fakeredis.FakeRedis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    path = RECORDED / "openai_refusal.jsonl"
    pauses: list[tuple[float, int]] = []

    def pause(seconds: float) -> None:
        [stream] = fake_redis.keys(f"{keys.namespace}:in:*:chunks:*")
        pauses.append((seconds, fake_redis.xlen(stream)))

    monkeypatch.setattr(replay_module.time, "sleep", pause)
    [request_id] = replay(publisher, [path], rate=20)

    chunks = len(capture_lines(path))
    assert len(pauses) == chunks - 1
    assert all(0 < seconds <= 1 / 20 * (n + 1) for n, (seconds, _) in enumerate(pauses))
    # Before pause n, the start and the n chunks pushed so far are already in Redis.
    assert [stored for _, stored in pauses] == [1 + n for n in range(1, chunks)]
    assert_replayed(fake_redis, keys, request_id, capture_lines(path), path.name)


def test_rate_holds_real_time_to_chunks_per_second(publisher: Publisher) -> None:
    path = RECORDED / "groq_tool_call_whole_args.jsonl"
    started = time.monotonic()
    replay(publisher, [path], copies=4, rate=60)
    chunks = 4 * len(capture_lines(path))
    assert time.monotonic() - started >= (chunks - 1) / 60 * 0.95

