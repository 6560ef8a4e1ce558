"""Leases and takeover on fakeredis: an expired runner's calls move to exactly one live runner, with their re-runs
counted, and a runner whose lease was taken finds out before it writes again."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from producer.runner.leases import Lease, LeaseLost
from streamfold.keys import Keys

@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace)


def lease(server: fakeredis.FakeServer, keys: Keys, name: str, seconds: float = 10.0) -> Lease:
    return Lease(fakeredis.FakeAsyncRedis(server=server), keys, name, seconds)


def expire(client: fakeredis.FakeRedis, keys: Keys, name: str) -> None:
    client.zadd(keys.runner_leases(), {name: 1})  # an expiry long past: the runner stopped renewing


def test_a_live_runner_takes_over_the_calls_of_an_expired_one_counting_a_rerun_each(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    dead, live = lease(server, keys, "dead"), lease(server, keys, "live")

    async def scenario() -> tuple[list[str], list[tuple[str, int]]]:
        await dead.join()
        await live.join()
        await dead.hold("r1")
        await dead.hold("r2", reruns=1)
        expire(redis, keys, "dead")
        return await live.expired_peers(), sorted(await live.take_over("dead", 10))

    peers, taken = asyncio.run(scenario())
    assert peers == ["dead"]
    assert taken == [("r1", 1), ("r2", 2)]
    assert redis.hgetall(keys.runner_calls("live")) == {b"r1": b"1", b"r2": b"2"}
    assert redis.exists(keys.runner_calls("dead")) == 0
    assert redis.zscore(keys.runner_leases(), "dead") is None  # nothing left: its lease goes too


def test_a_lease_still_running_is_never_taken(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    alive, other = lease(server, keys, "alive"), lease(server, keys, "other")

    async def scenario() -> tuple[list[str], list[tuple[str, int]]]:
        await alive.join()
        await other.join()
        await alive.hold("r1")
        return await other.expired_peers(), await other.take_over("alive", 10)

    assert asyncio.run(scenario()) == ([], [])


def test_two_runners_taking_over_at_once_never_both_get_a_call(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    dead, first, second = (lease(server, keys, name) for name in ("dead", "first", "second"))

    async def scenario() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        for runner in (dead, first, second):
            await runner.join()
        for number in range(50):
            await dead.hold(f"r{number}")
        expire(redis, keys, "dead")
        one, two = await asyncio.gather(first.take_over("dead", 30), second.take_over("dead", 30))
        return one, two

    one, two = asyncio.run(scenario())
    assert len(one) + len(two) == 50
    assert not {rid for rid, _ in one} & {rid for rid, _ in two}


def test_a_takeover_takes_no_more_than_there_is_room_for_and_leaves_the_rest(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    dead, live = lease(server, keys, "dead"), lease(server, keys, "live")

    async def scenario() -> list[tuple[str, int]]:
        await dead.join()
        await live.join()
        for number in range(5):
            await dead.hold(f"r{number}")
        expire(redis, keys, "dead")
        return await live.take_over("dead", 2)

    assert len(asyncio.run(scenario())) == 2
    assert redis.hlen(keys.runner_calls("dead")) == 3
    assert redis.zscore(keys.runner_leases(), "dead") is not None  # its lease stays until every call is taken


def test_a_runner_whose_lease_was_taken_learns_it_at_its_next_renewal_and_its_gate_closes(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    stalled, live = lease(server, keys, "stalled", seconds=0.001), lease(server, keys, "live")

    async def scenario() -> bool:
        await stalled.join()
        await live.join()
        await stalled.hold("r1")
        expire(redis, keys, "stalled")
        await live.take_over("stalled", 10)
        with pytest.raises(LeaseLost):
            await stalled.renew()
        return await stalled.check()

    assert asyncio.run(scenario()) is False


def test_a_handed_back_lease_is_taken_over_at_once_with_its_calls(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    leaving, staying = lease(server, keys, "leaving"), lease(server, keys, "staying")

    async def scenario() -> list[tuple[str, int]]:
        await leaving.join()
        await staying.join()
        await leaving.hold("r1")
        await leaving.hand_back()
        assert await staying.expired_peers() == ["leaving"]
        return await staying.take_over("leaving", 10)

    assert asyncio.run(scenario()) == [("r1", 1)]


def test_a_clean_leave_removes_the_lease_calls_and_stats(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    runner = lease(server, keys, "a")

    async def scenario() -> None:
        await runner.join()
        await runner.publish({"in_flight": 0})
        await runner.leave()

    asyncio.run(scenario())
    assert redis.zcard(keys.runner_leases()) == 0 and redis.hlen(keys.runner_stats()) == 0


def test_calls_left_by_a_crashed_runner_of_the_same_name_are_set_aside_for_the_takeover(keys: Keys) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeRedis(server=server)
    crashed, restarted, peer = lease(server, keys, "a"), lease(server, keys, "a"), lease(server, keys, "peer")

    async def scenario() -> list[tuple[str, int]]:
        await crashed.join()
        await crashed.hold("r1")
        await restarted.join()  # the same name, a new process: r1 must not stay in a live lease's hash
        await peer.join()
        (lost,) = await peer.expired_peers()
        assert lost.startswith("a-lost-")
        return await peer.take_over(lost, 10)

    assert asyncio.run(scenario()) == [("r1", 1)]
    assert redis.hlen(keys.runner_calls("a")) == 0
