"""Shared fixtures: paths to the recorded streams, a fakeredis client, and a real Redis when one answers.

Tests marked ``redis`` need a real server (``STREAMFOLD_TEST_REDIS_URL``, default db 15 on localhost).
They skip when none answers, except where ``STREAMFOLD_REQUIRE_REDIS`` or ``CI`` is set: there they fail,
so CI can never go green without having run them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fixtures" / "seeds"
RECORDED = ROOT / "fixtures" / "recorded"
TEST_REDIS_URL = os.environ.get("STREAMFOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def process_env(**settings: Any) -> dict[str, str]:
    """The environment of a Streamfold process a test starts: this one's without its STREAMFOLD_ variables,
    then ``settings`` as STREAMFOLD_ variables (tables as JSON, booleans as true/false)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool) \
            else str(value)
        env[f"STREAMFOLD_{name.upper()}"] = text
    return env


def load_jsonl(path: Path) -> list[bytes]:
    """The raw lines of a captured stream, as a producer would have pushed them."""
    return [line for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests on one Redis never see each other's keys."""
    return f"sftest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def real_redis_url(namespace: str) -> Iterator[str]:
    """The URL of a real Redis; every key of this test's namespace is deleted afterwards."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        message = f"no Redis at {TEST_REDIS_URL}: {exc}"
        if os.environ.get("STREAMFOLD_REQUIRE_REDIS") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield TEST_REDIS_URL
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def real_redis(real_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(real_redis_url)
    yield client
    client.close()
