"""A whole stack behind the gateway, started once per test module: the mock upstream, job runners, a stream
worker and two gateways (one open on loopback, one with client keys), on a real Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from producer.gateway import create_app
from producer.mock_upstream import MockUpstream
from streamfold.connection import connect
from streamfold.settings import Settings
from tests.conftest import ROOT, TEST_REDIS_URL

KEYS = {"acme": "gw-key-acme", "globex": "gw-key-globex"}


@dataclass
class Served:
    """One gateway app on a thread, at ``url``."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class GatewayStack:
    settings: Settings
    client: redis.Redis
    upstream: MockUpstream
    open: Served
    keyed: Served

    def calls(self, model: str) -> int:
        return sum(1 for seen in self.upstream.requests_seen if seen.model == model)


def serve_app(settings: Settings) -> Served:
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.02)
    return Served(url, server, thread)


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("STREAMFOLD_REQUIRE_REDIS") or os.environ.get("CI"):
            pytest.fail(f"no Redis at {TEST_REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {TEST_REDIS_URL}: {exc}")
    namespace = f"sftest-gw-{uuid.uuid4().hex[:8]}"
    processes: list[subprocess.Popen[bytes]] = []
    with MockUpstream() as upstream:
        table = {"default": {"base_url": upstream.base_url}, "slow": {"base_url": upstream.base_url + "?mock_latency_ms=40"},
                 "broken": {"base_url": upstream.base_url + "?mock_status=400"},
                 "anthropic": {"base_url": upstream.base_url, "api": "anthropic"},
                 "responses": {"base_url": upstream.base_url, "api": "responses"},
                 "gemini": {"base_url": upstream.root_url + "/v1beta", "api": "gemini"}}
        common: dict[str, Any] = dict(redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace, upstreams=table,
                                      block_ms=100, socket_timeout=3, stall_timeout=10, claim_timeout=5)
        env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
        env.update({f"STREAMFOLD_{name.upper()}": json.dumps(value) if isinstance(value, dict) else str(value)
                    for name, value in common.items()})
        env["STREAMFOLD_UPSTREAM_RETRIES"] = "0"
        with open(os.devnull, "wb") as quiet:
            for command in (["worker", "run"], ["producer", "work"], ["producer", "work"]):
                processes.append(subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=ROOT,
                                                  stdout=quiet, stderr=quiet))
        settings = Settings(**common)
        opened = serve_app(settings)
        keyed = serve_app(settings.model_copy(update={"gateway_keys": KEYS}))
        stack = GatewayStack(settings, connect(settings), upstream, opened, keyed)
        try:
            yield stack
        finally:
            opened.stop()
            keyed.stop()
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)
            for name in client.scan_iter(match=f"{namespace}:*", count=1000):
                client.delete(name)
            for name in client.scan_iter(match="rq:*", count=1000):
                if namespace in name.decode():
                    client.delete(name)
            client.srem("rq:queues", f"rq:queue:{namespace}")
            stack.client.close()
            client.close()


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each SSE event of a streaming response, as they arrive."""
    event_id, data = None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
