"""Every Lua script and every MULTI transaction touches keys of one hash slot, so each runs on a Redis Cluster.

The keys are the ones the code itself passes - the finish's, the start's, the claim-and-start's, the leases' and
takeover's, the dead-letter transaction's - for many request ids and shard counts. The inventories below name
every script file and every transaction site in the code: a new one fails here until its keys are checked."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.crc import key_slot

from producer.publisher import start_arguments
from producer.runner.leases import Lease
from producer.runner.publishing import Batcher, RequestStream
from streamfold.keys import Keys
from streamfold.settings import Settings
from tests.conftest import ROOT
from worker.broker import Broker, Finish
from worker.request import DeadLetter

SCRIPTS = {"worker/lua/finish.lua", "worker/lua/touch.lua", "worker/lua/leave.lua", "producer/lua/start.lua",
           "producer/lua/lease.lua", "producer/lua/takeover.lua",
           "producer/lua/requeue.lua"}  # rq's two lists, on rq's own Redis (producer/runner/bridge.py): never a cluster
# Where a transaction (a pipeline with transaction=True, redis-py's default) is opened, and on which Redis.
TRANSACTIONS = {
    "worker/broker.py": ("streams", 1),  # a rejected control entry's dead letter and its ack
    "producer/runner/leases.py": ("streams", 1),  # a restarted runner setting its leftover calls aside
    "producer/runner/bridge.py": ("queue", 5),  # rq's bookkeeping, on rq's own Redis: never a cluster
}
SHARD_COUNTS = (1, 3, 16, 256)


def slots(keys: list[str]) -> set[int]:
    return {key_slot(key.encode()) for key in keys}


def request_ids() -> Iterator[str]:
    yield from ("r", "chatcmpl-abc", "x:{y}", "{s01}", "tenant/call-7")
    for _ in range(40):
        yield uuid.uuid4().hex


def test_the_inventories_name_every_script_and_every_transaction_in_the_code() -> None:
    found = {str(path.relative_to(ROOT)) for package in ("worker", "producer", "streamfold")
             for path in (ROOT / package).rglob("*.lua")}
    assert found == SCRIPTS
    opened: dict[str, int] = {}
    for package in ("worker", "producer", "streamfold"):
        for path in (ROOT / package).rglob("*.py"):
            calls = re.findall(r"\.pipeline\(([^)]*)\)", path.read_text())
            count = sum(1 for arguments in calls if "transaction=False" not in arguments)
            if count:
                opened[str(path.relative_to(ROOT))] = count
    assert opened == {path: count for path, (_, count) in TRANSACTIONS.items()}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_no_script_builds_a_key_name_of_its_own(script: str) -> None:
    """Keys come in through KEYS; a name made inside a script could lie in any slot."""
    source = (ROOT / script).read_text()
    code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())
    assert "KEYS[" in code
    assert not re.search(r"redis\.call\(\s*'[A-Za-z]+'\s*,\s*'[^']*:", code), "a literal key name"
    assert not re.search(r"redis\.call\(\s*'[A-Za-z]+'\s*,\s*[^K,)]*\.\.", code), "a key built by concatenation"


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_the_finish_script_of_any_request_touches_one_slot(shards: int) -> None:
    keys = Keys("ns", shards)
    broker = Broker(fakeredis.FakeRedis(), keys, group="g", consumer="c", read_count=10, result_ttl=60,
                    chunk_ttl=60, claim_timeout_ms=1000)
    for request_id in request_ids():
        finish = Finish(request_id, ["1-0"], "completed", b"{}", b"{}", DeadLetter("1-0", "why", b""), "token")
        script_keys, _ = broker._finish_call(finish)
        assert len(script_keys) == 7 and len(slots(script_keys)) == 1, script_keys


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_the_start_and_the_claim_and_start_of_any_request_touch_one_slot(shards: int) -> None:
    keys = Keys("ns", shards)
    sent: list[tuple[Any, ...]] = []

    class Recording(Batcher):
        async def send(self, commands: Any, *, size: int = 0, reply: bool = False) -> Any:
            sent.extend(commands)
            return [0, b"cancelled"]

    async def claims() -> None:
        batcher = Recording(fakeredis.FakeAsyncRedis())
        for request_id in request_ids():
            stream = RequestStream(batcher, keys, request_id, token="t", max_age=60)
            await stream.claim_and_start({}, "auto", "chat", ttl=60)

    asyncio.run(claims())
    for request_id in request_ids():
        script_keys, _ = start_arguments(keys, request_id, {}, "auto", token="t", max_age=60)
        assert len(script_keys) == 3 and len(slots(script_keys)) == 1, script_keys
    assert len(sent) == len(list(request_ids()))
    for command in sent:
        assert command[0] == "EVALSHA"
        script_keys = list(command[3:3 + command[2]])
        assert len(script_keys) == 4 and len(slots(script_keys)) == 1, script_keys


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_touch_leave_and_the_dead_letter_transaction_stay_in_a_shards_slot(shards: int) -> None:
    keys = Keys("ns", shards)
    recorded: list[list[str]] = []

    class Transaction:
        def __init__(self) -> None:
            self.keys: list[str] = []

        def __enter__(self) -> Transaction:
            return self

        def __exit__(self, *exc: object) -> None:
            recorded.append(self.keys)

        def xadd(self, name: str, fields: object) -> None:
            self.keys.append(name)

        def xack(self, name: str, group: str, *ids: object) -> None:
            self.keys.append(name)

        def execute(self) -> list[Any]:
            return []

    class Client(fakeredis.FakeRedis):
        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            assert transaction
            return Transaction()

    broker = Broker(Client(), keys, group="g", consumer="c", read_count=10, result_ttl=60, chunk_ttl=60,
                    claim_timeout_ms=1000)
    for shard in keys.shard_ids():
        broker._claims(shard, [(b"1-0", {b"rid": b""}), (b"2-0", {})], junk=[b"0-1"])
    assert len(recorded) == shards
    for transaction in recorded:
        assert len(transaction) == 3 and len(slots(transaction)) == 1, transaction
    # touch.lua and leave.lua read KEYS[1] only: the one control stream they are given.
    for script in ("worker/lua/touch.lua", "worker/lua/leave.lua", "producer/lua/lease.lua"):
        assert set(re.findall(r"KEYS\[(\w+)\]", (ROOT / script).read_text())) == {"1"}, script


def test_the_leases_transaction_and_takeover_script_touch_the_runners_slot_only() -> None:
    keys = Keys("ns", 16)
    touched: list[list[str]] = []

    class Script:
        def __init__(self, reply: Any) -> None:
            self.reply = reply

        async def __call__(self, keys: list[str], args: list[Any]) -> Any:
            touched.append(list(keys))
            return self.reply

    class Pipeline:
        def __init__(self) -> None:
            self.keys: list[str] = []

        async def __aenter__(self) -> Pipeline:
            return self

        async def __aexit__(self, *exc: object) -> None:
            touched.append(self.keys)

        async def watch(self, *names: str) -> None:
            self.keys += names

        async def hlen(self, name: str) -> int:
            self.keys.append(name)
            return 2

        def multi(self) -> None:
            pass

        def execute_command(self, command: str, *names: str) -> None:
            assert command == "RENAME"
            self.keys += names

        def zadd(self, name: str, mapping: object) -> None:
            self.keys.append(name)

        async def execute(self) -> list[Any]:
            return []

    class Client:
        def __init__(self) -> None:
            self.scripts = iter([Script(12345), Script([])])

        def register_script(self, text: str) -> Script:
            return next(self.scripts)

        def pipeline(self, transaction: bool) -> Pipeline:
            assert transaction
            return Pipeline()

    for name in ("runner-a", "host-1-2-ab12", "{s00}"):
        lease = Lease(Client(), keys, name, 10.0)  # type: ignore[arg-type]
        asyncio.run(lease.join())
        asyncio.run(lease.take_over("peer-9", 10))
    assert len(touched) == 9
    runners = {key_slot(keys.runner_leases().encode())}
    for script_keys in touched:
        assert slots(script_keys) == runners, script_keys


def test_rq_never_meets_a_cluster() -> None:
    """The transactions of producer/runner/bridge.py run on rq's Redis: a cluster needs a queue Redis of its
    own, and the runner's rq client is the queue's."""
    with pytest.raises(ValueError, match="queue_redis_url"):
        Settings(redis_cluster=True)
    work = (ROOT / "producer" / "work.py").read_text()
    assert "with connect_queue(settings) as client:" in work and "Runner(settings, client," in work
    assert Path(ROOT / "producer" / "runner" / "bridge.py").read_text().count("self.client.pipeline()") == 5
