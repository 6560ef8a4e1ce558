"""Usage events as OpenTelemetry GenAI client metrics, read back from the SDK's in-memory metric reader."""

from __future__ import annotations

from typing import Any

import pytest

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from producer.otel import UsageMetrics


def _event(**overrides: Any) -> dict[str, Any]:
    return {"request_id": "r1", "status": "completed", "latency_ms": 1500, "ttft_ms": 250,
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 149,
            "gen_ai.usage.output_tokens": 60, **overrides}


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    return {metric.name: list(metric.data.data_points) for resource in data.resource_metrics
            for scope in resource.scope_metrics for metric in scope.metrics}


def test_each_event_records_token_usage_duration_and_time_to_first_chunk() -> None:
    reader = InMemoryMetricReader()
    metrics = UsageMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    metrics.record(_event())
    metrics.record(_event(request_id="r2", **{"gen_ai.usage.input_tokens": 51}))
    points = _points(reader)
    tokens = {point.attributes["gen_ai.token.type"]: point for point in points["gen_ai.client.token.usage"]}
    assert (tokens["input"].sum, tokens["input"].count, tokens["output"].sum) == (200, 2, 120)
    assert dict(tokens["input"].attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.token.type": "input"}
    (duration,) = points["gen_ai.client.operation.duration"]
    (first_chunk,) = points["gen_ai.client.operation.time_to_first_chunk"]
    assert (duration.sum, duration.count, first_chunk.sum) == (3.0, 2, 0.5)
    assert list(tokens["input"].explicit_bounds)[:3] == [1, 4, 16]


def test_a_failed_call_is_marked_and_unknown_counts_are_not_recorded_as_zero() -> None:
    reader = InMemoryMetricReader()
    metrics = UsageMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    failed = _event(status="failed", ttft_ms=None, **{"error.type": "rate_limited"})
    del failed["gen_ai.usage.input_tokens"], failed["gen_ai.usage.output_tokens"]
    metrics.record(failed)
    points = _points(reader)
    assert "gen_ai.client.token.usage" not in points and "gen_ai.client.operation.time_to_first_chunk" not in points
    (duration,) = points["gen_ai.client.operation.duration"]
    assert duration.attributes["error.type"] == "rate_limited"


@pytest.mark.redis
def test_the_usage_command_exports_the_metrics_over_otlp(real_redis_url: str, namespace: str,
                                                         tmp_path: Any) -> None:
    import http.server
    import os
    import subprocess
    import sys
    import threading

    import orjson
    import redis
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from streamfold.keys import Keys
    from tests.conftest import ROOT

    received: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = redis.Redis.from_url(real_redis_url)
    keys = Keys(namespace=namespace)
    client.xadd(keys.usage(0), {"rid": "r1", "d": orjson.dumps(_event())})
    env = {**os.environ, "STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "OTEL_SERVICE_NAME": "test"}
    done = subprocess.run([sys.executable, "-m", "producer", "usage", "--otel", "--from-start"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    server.shutdown()
    server.server_close()
    client.close()
    assert done.returncode == 0, done.stderr
    names = set()
    for body in received:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        names |= {metric.name for resource in request.resource_metrics for scope in resource.scope_metrics
                  for metric in scope.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "gen_ai.client.operation.time_to_first_chunk"} <= names
