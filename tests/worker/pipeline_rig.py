"""A small rig for the worker's Redis tests: publish requests, run a worker, read what it published.

Requests are written with the real ``producer.publisher.Publisher``; anything the Publisher will not write
(an entry that is not an envelope) goes straight onto the chunk stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from producer.publisher import Publisher
from streamfold.contract import decode_record
from streamfold.settings import Settings
from worker.broker import Broker
from worker.runner import Worker

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "fixtures" / "recorded"


def recorded(name: str) -> list[bytes]:
    """The raw chunks of one recorded stream."""
    return [line for line in (RECORDED / f"{name}.jsonl").read_bytes().splitlines() if line.strip()]


def recorded_names() -> list[str]:
    return sorted(path.stem for path in RECORDED.glob("*.jsonl"))


def mixed_corpus(count: int) -> dict[str, list[bytes]]:
    """``count`` requests by id, their chunks taken from the recorded streams in turn."""
    names = recorded_names()
    return {f"{names[n % len(names)]}-{n}": recorded(names[n % len(names)]) for n in range(count)}


class Rig:
    """One namespace on one Redis (fake or real), with the settings every test starts from."""

    def __init__(self, client: redis.Redis, namespace: str, **settings: Any) -> None:
        defaults: dict[str, Any] = dict(namespace=namespace, claim_timeout=5.0, stall_timeout=5.0, block_ms=50, socket_timeout=2.0,
                                        shutdown_grace=0.0)
        self.client = client
        self.settings = Settings(**{**defaults, **settings})
        self.keys = self.settings.keys
        self.publisher = Publisher(client, self.keys, batch_size=1000)

    def publish(self, request_id: str, chunks: Iterable[bytes], *, end: bool = True, **start: Any) -> None:
        self.publisher.start(request_id, **start)
        for chunk in chunks:
            self.publisher.push(request_id, chunk)
        if end:
            self.publisher.end(request_id)
        self.publisher.flush()

    def broker(self, consumer: str = "w1", **settings: Any) -> Broker:
        return Broker.from_settings(self.client, self.settings.model_copy(update=settings), consumer)

    def worker(self, consumer: str = "w1", *, concurrency: int | None = None, burst: bool = True,
               **settings: Any) -> Worker:
        changed = self.settings.model_copy(update=settings)
        return Worker(Broker.from_settings(self.client, changed, consumer), changed, concurrency=concurrency,
                      burst=burst)

    def results(self) -> list[dict[str, Any]]:
        return self._records(self.keys.results)

    def usage(self) -> list[dict[str, Any]]:
        return self._records(self.keys.usage)

    def result(self, request_id: str) -> dict[str, Any]:
        (record,) = [record for record in self.results() if record["request_id"] == request_id]
        return record

    def dead_letters(self) -> list[dict[bytes, bytes]]:
        return [fields for shard in self.keys.shard_ids()
                for _, fields in self.client.xrange(self.keys.dead_letters(shard))]

    def pending(self) -> list[dict[str, Any]]:
        """Every control entry handed out and not yet acknowledged; none before a worker made the group."""
        entries = []
        for shard in self.keys.shard_ids():
            try:
                entries += self.client.xpending_range(self.keys.requests(shard), self.settings.group, "-", "+", 1000)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        return entries

    def _records(self, stream: Callable[[int], str]) -> list[dict[str, Any]]:
        return [decode_record(fields[b"d"]) for shard in self.keys.shard_ids()
                for _, fields in self.client.xrange(stream(shard))]


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.redis)])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """The same test against fakeredis and, when one answers, a real Redis."""
    if request.param == "fake":
        fake: fakeredis.FakeRedis = request.getfixturevalue("fake_redis")
        yield fake
    else:
        yield request.getfixturevalue("real_redis")


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
