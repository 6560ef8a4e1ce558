"""The shared batching publisher: many calls' entries in one round trip, in order per request, resent whole after
Redis failed, memory bounded while Redis is away, nothing written once the runner's lease is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import pytest
import redis

from producer.runner.publishing import Batcher, Discarded, RequestStream, patiently
from streamfold.contract import decode_envelope
from streamfold.keys import Keys


class Flaky:
    """A fakeredis client whose connections are lost while ``down`` is set; ``sends`` counts the batches sent."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.real = fakeredis.FakeAsyncRedis(server=server)
        self.down = False
        self.sends = 0
        flaky = self

        class Connection(self.real.connection_pool.connection_class):  # type: ignore[name-defined,misc]
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                packed = command if isinstance(command, bytes) else b"".join(command)
                flaky.sends += b"\r\nXADD\r\n" in packed  # a batch, not the connection's handshake
                if flaky.down:
                    raise redis.ConnectionError("Connection refused")
                await super().send_packed_command(command, check_health)

        self.connection_pool = SimpleNamespace(connection_class=Connection,
                                               connection_kwargs=self.real.connection_pool.connection_kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace)


@asynccontextmanager
async def batching(client: Any, **options: Any) -> AsyncIterator[Batcher]:
    """A Batcher with its flushing task running, stopped on the way out."""
    batcher = Batcher(client, **options)
    flushing = asyncio.create_task(batcher.run())
    try:
        yield batcher
    finally:
        flushing.cancel()


def streams(batcher: Batcher, keys: Keys, count: int) -> list[RequestStream]:
    return [RequestStream(batcher, keys, f"r{number}", token="t", max_age=60) for number in range(count)]


def chunks(server: fakeredis.FakeServer, keys: Keys, request_id: str) -> list[bytes]:
    client = fakeredis.FakeRedis(server=server)
    return [decode_envelope(fields).payload for _, fields in client.xrange(keys.chunks(request_id))]


def kinds(server: fakeredis.FakeServer, keys: Keys, request_id: str) -> list[str]:
    client = fakeredis.FakeRedis(server=server)
    return [decode_envelope(fields).kind for _, fields in client.xrange(keys.chunks(request_id))]


def test_the_chunks_of_a_thousand_calls_go_to_redis_together_in_one_round_trip(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    client = Flaky(server)

    async def scenario() -> Batcher:
        async with batching(client, flush_s=60, batch=5000) as batcher:
            for stream in streams(batcher, keys, 1000):
                await stream.push(b'{"n": 1}')
            await batcher.drain()
        return batcher

    batcher = asyncio.run(scenario())
    assert (batcher.flushes, client.sends) == (1, 1)
    assert chunks(server, keys, "r999") == [b'{"n": 1}']


def test_a_batch_that_failed_for_want_of_redis_is_sent_again_whole_and_in_order(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    client = Flaky(server)

    async def scenario() -> None:
        async with batching(client, flush_s=0.001, batch=3) as batcher:
            stream = streams(batcher, keys, 1)[0]
            client.down = True
            for number in range(10):
                await stream.push(b"%d" % number)
            await asyncio.sleep(0.2)  # a few sends fail meanwhile
            assert batcher.buffered == 10
            client.down = False
            await stream.end()

    asyncio.run(scenario())
    assert client.sends > 4
    assert chunks(server, keys, "r0") == [b"%d" % number for number in range(10)] + [b""]


def test_pushes_wait_for_room_while_redis_is_away_and_go_on_when_it_is_back(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    client = Flaky(server)

    async def scenario() -> None:
        async with batching(client, flush_s=0.001, buffer_bytes=1000) as batcher:
            stream = streams(batcher, keys, 1)[0]
            client.down = True
            pushing = asyncio.gather(*(stream.push(b"x" * 100) for _ in range(30)))
            await asyncio.sleep(0.1)
            assert not pushing.done() and batcher.buffered < 30  # held back: memory stays bounded
            client.down = False
            await asyncio.wait_for(pushing, 10)
            await batcher.drain()

    asyncio.run(scenario())
    assert len(chunks(server, keys, "r0")) == 30


def test_once_the_gate_closes_nothing_buffered_is_written_and_waiters_hear_why(keys: Keys) -> None:
    server = fakeredis.FakeServer()

    async def closed() -> bool:
        return False

    async def scenario() -> None:
        async with batching(fakeredis.FakeAsyncRedis(server=server), flush_s=0.001, gate=closed) as batcher:
            stream = streams(batcher, keys, 1)[0]
            await stream.push(b"late")
            with pytest.raises(Discarded):
                await stream.end()

    asyncio.run(scenario())
    assert chunks(server, keys, "r0") == []


def test_a_calls_own_command_waits_out_a_redis_that_is_away_instead_of_failing_the_call() -> None:
    answers: list[object] = [redis.ConnectionError("Connection refused"), redis.TimeoutError("Timeout"), "ok"]

    async def command() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert asyncio.run(patiently(command, "claiming a request")) == "ok"


def test_a_command_redis_refuses_for_good_is_not_retried() -> None:
    async def command() -> object:
        raise redis.ResponseError("NOPERM this user has no permissions")

    with pytest.raises(redis.ResponseError):
        asyncio.run(patiently(command, "claiming a request"))


def test_a_start_reaches_a_redis_that_lacks_the_script_which_is_loaded_then_sent_again(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)

    async def scenario() -> None:
        async with batching(client, flush_s=0.001) as batcher:
            first, second = streams(batcher, keys, 2)
            await first.start({}, "auto", "chat")
            await client.script_flush()  # a restarted Redis, or one failed over to
            await asyncio.gather(second.start({}, "auto", "chat"), first.push(b"after"))

    asyncio.run(scenario())
    assert [kinds(server, keys, rid) for rid in ("r0", "r1")] == [["start", "chunk"], ["start"]]


def test_a_close_sends_the_start_again_when_a_failover_lost_it_and_only_then(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)

    async def scenario() -> None:
        async with batching(client, flush_s=0.001) as batcher:
            lost, kept = streams(batcher, keys, 2)
            for stream in (lost, kept):
                await stream.start({"n": 1}, "auto", "chat")
                await stream.push(b"one")
            # What a promoted replica that never received the start looks like: no owner key, no control entry,
            # no start envelope; the chunk pushed after it arrived.
            start_id = (await client.xrange(keys.chunks("r0"), count=1))[0][0]
            await client.xdel(keys.chunks("r0"), start_id)
            await client.delete(keys.owner("r0"), keys.requests(0))
            await kept.push(b"two")
            for stream in (lost, kept):
                await stream.end()

    asyncio.run(scenario())
    assert kinds(server, keys, "r0") == ["chunk", "start", "end"]
    assert kinds(server, keys, "r1") == ["start", "chunk", "chunk", "end"]
    control = fakeredis.FakeRedis(server=server).xrange(keys.requests(0))
    assert [fields[b"rid"] for _, fields in control] == [b"r0"]  # the lost one announced again; nothing for r1
