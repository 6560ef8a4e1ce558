"""Usage events as OpenTelemetry GenAI client metrics (the ``otel`` extra).

Each usage event becomes the measurements an OpenTelemetry-instrumented client would have recorded for the
call (semantic conventions v1.41.0, GenAI, status Development):

    gen_ai.client.token.usage                    histogram, {token}: input and output, by gen_ai.token.type
    gen_ai.client.operation.duration             histogram, s: start envelope to end marker
    gen_ai.client.operation.time_to_first_chunk  histogram, s: start envelope to first chunk

with the attributes ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model`` and, for a call that failed, ``error.type``. A count the provider did not report is
not recorded (never as zero). ``python -m producer usage --otel`` reads usage events through a consumer group
and exports these through OTLP, configured by OpenTelemetry's own environment variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_SERVICE_NAME``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.metrics import Meter

# The bucket boundaries the conventions give for each instrument.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
SECONDS_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_ATTRIBUTES = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
               "error.type")


class UsageMetrics:
    """Records usage events on a meter as the GenAI client metrics."""

    def __init__(self, meter: Meter) -> None:
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)

    def record(self, event: Mapping[str, Any]) -> None:
        attributes = {name: event[name] for name in _ATTRIBUTES if event.get(name) is not None}
        attributes.setdefault("gen_ai.operation.name", "chat")
        for kind, count in (("input", event.get("gen_ai.usage.input_tokens")),
                            ("output", event.get("gen_ai.usage.output_tokens"))):
            if isinstance(count, int):
                self._tokens.record(count, {**attributes, "gen_ai.token.type": kind})
        latency_ms, ttft_ms = event.get("latency_ms"), event.get("ttft_ms")
        if isinstance(latency_ms, (int, float)):
            self._duration.record(latency_ms / 1000, attributes)
        if isinstance(ttft_ms, (int, float)):
            self._first_chunk.record(ttft_ms / 1000, attributes)


def otlp_meter() -> tuple[Meter, Any]:
    """A meter whose readings are exported through OTLP over HTTP, set up from OpenTelemetry's environment
    variables; and its provider, to ``shutdown()`` (which flushes) at the end."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    return provider.get_meter("streamfold"), provider
