"""Usage events in the ecosystem's terms: OpenTelemetry GenAI attributes, and a cost from the price library or
from prices in settings - never a guess."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline_rig import recorded
from streamfold.contract import encode_chunk, encode_end, encode_start
from streamfold.errors import ConfigError
from streamfold.genai import provider_of
from streamfold.settings import Settings
from tests.conftest import ROOT, load_jsonl
from worker.pricing import PriceBook
from worker.request import RequestState

NATIVE = ROOT / "fixtures" / "native"


def finish(chunks: list[bytes], *, provider: str | None = "openai", request_model: str | None = "gpt-4o",
           prices: PriceBook | None = None) -> dict[str, Any]:
    state = RequestState("r1", "1-0", 0.0, prices=prices)
    entries = [encode_start({}, "auto", attempt=0, ts_ms=1_000, provider=provider, request_model=request_model),
               *(encode_chunk(chunk, seq=seq, attempt=0, ts_ms=1_250) for seq, chunk in enumerate(chunks)),
               encode_end(attempt=0, ts_ms=2_000)]
    for number, fields in enumerate(entries, start=1):
        state.feed(f"{number}-0", {key.encode(): value for key, value in fields.items()}, 0.0)
    return dict(state.outcome(3_000).usage)


def usage_chunk(**usage: Any) -> bytes:
    import orjson
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": usage.pop("model"),
                         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                         "usage": usage})


def test_a_usage_event_carries_the_genai_attributes_of_its_call() -> None:
    event = finish(recorded("openai_parallel_tool_calls"))
    assert {name: value for name, value in event.items() if name.startswith(("gen_ai.", "error."))} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.response.id": "chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63",
        "gen_ai.response.finish_reasons": ["tool_calls"],
        "gen_ai.usage.input_tokens": 149,
        "gen_ai.usage.output_tokens": 60,
        "gen_ai.usage.reasoning.output_tokens": 0,
        "gen_ai.response.time_to_first_chunk": 0.25,
    }
    assert (event["provider"], event["request_model"]) == ("openai", "gpt-4o")


def test_anthropic_cache_counts_are_input_tokens_and_their_own_attributes() -> None:
    chunks = load_jsonl(NATIVE / "anthropic" / "anthropic_thinking_then_tool_use_no_args.jsonl")
    event = finish(chunks, provider="anthropic", request_model="claude-haiku-4-5")
    assert event["gen_ai.usage.input_tokens"] == event["prompt_tokens"] == 598
    assert (event["gen_ai.usage.cache_read.input_tokens"], event["gen_ai.usage.cache_creation.input_tokens"]) == (0, 0)
    assert event["gen_ai.usage.reasoning.output_tokens"] == 53


def test_a_failed_call_names_its_error_type_and_reports_no_counts_it_does_not_have() -> None:
    state = RequestState("r1", "1-0", 0.0)
    state.feed("1-0", {b"k": b"start", b"att": b"0", b"ts": b"1", b"d": b'{"provider": "openai"}'}, 0.0)
    state.feed("2-0", {b"k": b"error", b"att": b"0", b"ts": b"2", b"d": b'{"message": "x", "type": "rate_limited"}'},
               0.0)
    event = state.outcome(3).usage
    assert event["error.type"] == "rate_limited"  # type: ignore[typeddict-item]
    assert "gen_ai.usage.input_tokens" not in event and event["cost"] is None


# Hand-checked against the providers' list prices in the bundled data: gpt-4o $2.50 input, $1.25 cached input,
# $10 output per million tokens; claude-sonnet-4-5 $3 input, $0.30 cache reads, $3.75 cache writes, $15 output.
@pytest.mark.parametrize(("provider", "model", "usage", "expected"), [
    ("openai", "gpt-4o-2024-08-06", {"prompt_tokens": 1000, "completion_tokens": 100,
                                     "prompt_tokens_details": {"cached_tokens": 200}},
     {"input": 800 * 2.5e-6 + 200 * 1.25e-6, "output": 100 * 10e-6}),
    ("anthropic", "claude-sonnet-4-5-20250929", {"prompt_tokens": 1000, "completion_tokens": 100,
                                                 "prompt_tokens_details": {"cached_tokens": 500,
                                                                           "cache_write_tokens": 200}},
     {"input": 300 * 3e-6 + 500 * 0.3e-6 + 200 * 3.75e-6, "output": 100 * 15e-6}),
])
def test_cost_prices_cache_reads_and_writes_at_their_own_rates(provider: str, model: str, usage: dict[str, Any],
                                                               expected: dict[str, float]) -> None:
    event = finish([usage_chunk(model=model, **usage)], provider=provider, request_model=model)
    cost = event["cost"]
    assert cost["input"] == pytest.approx(expected["input"]) and cost["output"] == pytest.approx(expected["output"])
    assert cost["total"] == pytest.approx(expected["input"] + expected["output"])
    assert (cost["currency"], cost["source"][:12], event["cost_reason"]) == ("USD", "genai-prices", None)


@pytest.mark.parametrize(("provider", "model", "reason"), [
    ("openai", "no-such-model-9000", "no price for model 'no-such-model-9000' at provider 'openai'"),
    (None, "gpt-4o", "unknown provider"),
])
def test_a_model_without_a_price_gets_no_cost_and_the_reason(provider: str | None, model: str, reason: str) -> None:
    event = finish([usage_chunk(model=model, prompt_tokens=10, completion_tokens=5)], provider=provider)
    assert event["cost"] is None and reason in event["cost_reason"]


def test_prices_in_settings_replace_or_add_to_the_bundled_ones() -> None:
    settings = Settings(prices='{"openai/gpt-4o-2024-08-06": {"input_mtok": 1, "output_mtok": 2, '
                               '"cache_read_mtok": 0.5}, "house-model": {"input_mtok": 0.1, "output_mtok": 0.2, '
                               '"currency": "EUR"}}')
    book = PriceBook(settings.prices)
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 200}}
    negotiated = finish([usage_chunk(model="gpt-4o-2024-08-06", **usage)], prices=book)["cost"]
    assert negotiated["input"] == pytest.approx(800e-6 + 200 * 0.5e-6) and negotiated["source"] == "STREAMFOLD_PRICES"
    house = finish([usage_chunk(model="house-model", prompt_tokens=1000, completion_tokens=1000)], provider=None,
                   prices=book)["cost"]
    assert (house["total"], house["currency"]) == (pytest.approx(300e-6), "EUR")


@pytest.mark.parametrize("prices", ['{"m": {"input_mtok": 1}}', '{"m": {"input_mtok": -1, "output_mtok": 1}}',
                                    '{"m": {"input_mtok": 1, "output_mtok": 1, "typo": 2}}', "[1]", "not json"])
def test_bad_prices_are_a_config_error_naming_the_entry(prices: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamfold.settings import load_settings
    monkeypatch.setenv("STREAMFOLD_PRICES", prices)
    with pytest.raises(ConfigError, match="STREAMFOLD_PRICES"):
        load_settings().require("prices")


@pytest.mark.parametrize(("base_url", "named", "provider"), [
    ("https://api.openai.com/v1", None, "openai"),
    ("https://api.anthropic.com/v1", None, "anthropic"),
    ("https://generativelanguage.googleapis.com/v1beta", None, "gcp.gemini"),
    ("https://us-central1-aiplatform.googleapis.com/v1", None, "gcp.vertex_ai"),
    ("https://acme.openai.azure.com/openai/deployments/x?api-version=1", None, "azure.ai.openai"),
    ("https://dashscope.aliyuncs.com/compatible-mode/v1", None, "alibaba"),
    ("http://mock-upstream:8400/v1", None, None),
    ("http://mock-upstream:8400/v1", "openai", "openai"),
])
def test_the_provider_is_the_one_named_or_the_one_its_host_is_known_for(base_url: str, named: str | None,
                                                                        provider: str | None) -> None:
    assert provider_of(base_url, named) == provider
