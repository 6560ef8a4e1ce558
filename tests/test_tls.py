"""Transport security on a real redis-server that speaks only TLS and wants client certificates: the pipeline
runs over rediss:// with a CA, a client certificate and AUTH (from the URL or from settings), and refuses to
run without them; so does a 3-master Redis Cluster whose nodes and bus speak only TLS, and a primary found
through Sentinels that all speak only TLS. Certificates are made with openssl (tests/topology.py)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Publisher, afollow, enqueue_chat_completion, wait_for_result
from producer.mock_upstream import MockUpstream
from streamfold.connection import connect, preflight
from streamfold.errors import ConfigError, RedisUnavailable
from streamfold.settings import Settings, load_settings, redacted_url
from tests.conftest import RECORDED, ROOT, TEST_REDIS_URL, load_jsonl, process_env
from tests.topology import (SENTINEL_SERVICE, make_certificates, require_redis_server, start_cluster,
                            start_sentinel_group)
from worker.broker import Broker
from worker.live import Final
from worker.runner import Worker

pytestmark = pytest.mark.redis

PASSWORD = "tls-test-password"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """(port, certificate directory) of a redis-server that accepts TLS with a client certificate only."""
    require_redis_server(tls=True)
    directory = tmp_path_factory.mktemp("tls")
    make_certificates(directory)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes", "--user", "default", "off",
         "--user", "streamfold", "on", f">{PASSWORD}", "~*", "&*", "+@all"],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the TLS redis-server did not start"
            time.sleep(0.05)
    yield port, directory
    server.terminate()
    server.wait(10)


def _settings(port: int, certs: Path, **changes: object) -> Settings:
    values: dict[str, object] = dict(
        redis_url=f"rediss://streamfold:{PASSWORD}@127.0.0.1:{port}/0", redis_tls_ca=certs / "ca.crt",
        redis_tls_cert=certs / "client.crt", redis_tls_key=certs / "client.key", block_ms=50, socket_timeout=2,
        stall_timeout=5, claim_timeout=5)
    return Settings(**{**values, **changes})  # type: ignore[arg-type]


def _process_env(certs: Path, upstreams: dict[str, object], **settings: object) -> dict[str, str]:
    """The environment of a Streamfold process with the client certificate, the upstream table and ``settings``."""
    return process_env(redis_tls_ca=certs / "ca.crt", redis_tls_cert=certs / "client.crt",
                       redis_tls_key=certs / "client.key", upstreams=upstreams, **settings)


def test_the_pipeline_runs_over_tls_with_a_client_certificate_and_auth(tls_redis: tuple[int, Path]) -> None:
    port, certs = tls_redis
    for settings in (_settings(port, certs),
                     _settings(port, certs, redis_url=f"rediss://127.0.0.1:{port}/0", redis_username="streamfold",
                               redis_password=PASSWORD)):
        client = connect(settings)
        request_id = f"tls-{settings.redis_username or 'url'}"
        publisher = Publisher(client, settings.keys, batch_size=100)
        publisher.start(request_id)
        for chunk in load_jsonl(RECORDED / "openai_refusal.jsonl"):
            publisher.push(request_id, chunk)
        publisher.end(request_id)
        assert Worker(Broker.from_settings(client, settings, "w1"), settings, burst=True).run() == 0
        assert wait_for_result(request_id, 5, client=client, settings=settings)["status"] == "completed"

        async def last_event() -> object:
            return [event async for event in afollow(request_id, settings=settings)][-1]

        assert isinstance(asyncio.run(last_event()), Final)  # the asyncio client speaks TLS too
        client.close()


def test_a_call_runner_takes_and_publishes_calls_over_tls(tls_redis: tuple[int, Path]) -> None:
    """The runner keeps a pool of its own for the chunks it publishes: it too speaks TLS with the client
    certificate and logs in as the configured user."""
    port, certs = tls_redis
    settings = _settings(port, certs, redis_url=f"rediss://127.0.0.1:{port}/0", redis_username="streamfold",
                         redis_password=PASSWORD, namespace="tls-runner", queue="tls-runner")
    client = connect(settings)
    with MockUpstream() as upstream:
        table = {"default": {"base_url": upstream.base_url}}
        env = _process_env(certs, table, redis_url=settings.redis_url, redis_username="streamfold",
                           redis_password=PASSWORD, namespace="tls-runner", queue="tls-runner")
        request_id = enqueue_chat_completion({"model": "openai_refusal", "messages": []}, client=client,
                                             settings=settings.model_copy(update={"upstreams": table}))
        done = subprocess.run([sys.executable, "-m", "producer", "work", "--burst"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Worker(Broker.from_settings(client, settings, "w1"), settings, burst=True).run() == 0
    assert wait_for_result(request_id, 5, client=client, settings=settings)["status"] == "completed"
    client.close()


@pytest.mark.parametrize("change", [
    {"redis_tls_cert": None, "redis_tls_key": None},  # no client certificate
    {"redis_tls_ca": None},  # the system's CAs do not know the test CA
])
def test_without_the_right_certificates_redis_is_unavailable(tls_redis: tuple[int, Path],
                                                            change: dict[str, object]) -> None:
    port, certs = tls_redis
    client = connect(_settings(port, certs, **change))
    with pytest.raises((redis.ConnectionError, RedisUnavailable)):
        client.ping()
    client.close()


def test_tls_settings_need_rediss_and_a_key_with_the_certificate(tls_redis: tuple[int, Path]) -> None:
    port, certs = tls_redis
    with pytest.raises(ValueError, match="rediss://"):
        _settings(port, certs, redis_url=f"redis://127.0.0.1:{port}/0")
    with pytest.raises(ValueError, match="go together"):
        _settings(port, certs, redis_tls_key=None)


def test_passwords_are_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redacted_url("rediss://alice:s3cret@redis:6380/0") == "rediss://alice:[redacted]@redis:6380/0"
    assert redacted_url("redis://redis:6379/0") == "redis://redis:6379/0"
    monkeypatch.setenv("STREAMFOLD_REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("STREAMFOLD_REDIS_TLS_CA", "/no/such/ca.pem")
    with pytest.raises(ConfigError) as failure:
        load_settings()
    assert "s3cret" not in str(failure.value) and "STREAMFOLD_REDIS_TLS_CA" in str(failure.value)
    monkeypatch.delenv("STREAMFOLD_REDIS_TLS_CA")
    assert "s3cret" not in repr(load_settings())
    shown = repr(Settings(redis_url="redis://alice:url-s3cret@redis:6379/0", gateway_keys={"acme": "gw-s3cret"}))
    assert "url-s3cret" not in shown and "gw-s3cret" not in shown and "'acme': '[redacted]'" in shown


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """(a node's port, certificate directory) of a 3-master Redis Cluster that speaks only TLS, its bus too."""
    require_redis_server(tls=True)
    certs = tmp_path_factory.mktemp("tls-cluster-certs")
    make_certificates(certs)
    topology, nodes = start_cluster(tmp_path_factory.mktemp("tls-cluster"), 3, certs=certs)
    try:
        yield nodes[0].port, certs
    finally:
        topology.close()


def test_a_cluster_over_tls_runs_calls_assembles_and_follows(tls_cluster: tuple[int, Path]) -> None:
    """Every client of a cluster - blocking and asyncio, the runner's batches among them - speaks TLS with the
    client certificate to each node it is sent to."""
    port, certs = tls_cluster
    namespace = f"sftest-tlscl-{uuid.uuid4().hex[:8]}"
    settings = _settings(port, certs, redis_url=f"rediss://127.0.0.1:{port}", redis_cluster=True,
                         queue_redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace, shards=6)
    client = connect(settings)
    preflight(client)
    with MockUpstream() as upstream:
        table = {"default": {"base_url": upstream.base_url}}
        env = _process_env(certs, table, redis_url=settings.redis_url, redis_cluster="true",
                           queue_redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace, shards=6)
        request_ids = [enqueue_chat_completion({"model": model, "messages": []}, client=client,
                                               settings=settings.model_copy(update={"upstreams": table}))
                       for model in ("openai_refusal", "openai_parallel_tool_calls", "qwen_mt_flash_incremental")]
        done = subprocess.run([sys.executable, "-m", "producer", "work", "--burst"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert Worker(Broker.from_settings(client, settings, "w1"), settings, burst=True).run() == 0
        for request_id in request_ids:
            assert wait_for_result(request_id, 5, client=client, settings=settings)["status"] == "completed"

        async def last_event() -> object:
            return [event async for event in afollow(request_ids[0], settings=settings)][-1]

        assert isinstance(asyncio.run(last_event()), Final)
    finally:
        client.close()
        with redis.Redis.from_url(TEST_REDIS_URL) as queue:
            for key in queue.scan_iter(match=f"rq:*{namespace}*"):
                queue.delete(key)


def test_through_sentinels_over_tls_the_pipeline_runs_and_follows(tmp_path: Path) -> None:
    """The Sentinels, the primary and its replica speak only TLS: the client asks the Sentinels over TLS with
    the same certificates, then speaks TLS to the primary they name, blocking and asyncio alike."""
    require_redis_server(tls=True)
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    group = start_sentinel_group(tmp_path / "group", certs=certs)
    try:
        settings = _settings(0, certs, redis_url="rediss://", redis_sentinels=group.addresses,
                             redis_sentinel_service=SENTINEL_SERVICE, namespace=f"sftest-tlss-{uuid.uuid4().hex[:8]}")
        client = connect(settings)
        preflight(client)
        publisher = Publisher(client, settings.keys, batch_size=100)
        publisher.start("tls-sentinel")
        for chunk in load_jsonl(RECORDED / "openai_refusal.jsonl"):
            publisher.push("tls-sentinel", chunk)
        publisher.end("tls-sentinel")
        assert Worker(Broker.from_settings(client, settings, "w1"), settings, burst=True).run() == 0
        assert wait_for_result("tls-sentinel", 5, client=client, settings=settings)["status"] == "completed"

        async def last_event() -> object:
            return [event async for event in afollow("tls-sentinel", settings=settings)][-1]

        assert isinstance(asyncio.run(last_event()), Final)
        client.close()
    finally:
        group.topology.close()
