"""OpenTelemetry GenAI names for what Streamfold knows of a call: its provider, and a usage event's attributes.

The attributes follow the OpenTelemetry semantic conventions for generative AI as published in semantic
conventions v1.41.0 (the GenAI documents, status Development, since moved unchanged in these names to the
semantic-conventions-genai repository): ``gen_ai.provider.name`` (not the deprecated ``gen_ai.system``),
``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.response.id``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` (cached input included, as the convention
says), ``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``, ``gen_ai.usage.reasoning.output_tokens``, and
``gen_ai.response.time_to_first_chunk`` in seconds; ``error.type`` for a call that failed.

A provider is named by the upstream table's ``provider`` or, when it names none, by the host of its base URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

SEMCONV_VERSION = "1.41.0"

# Well-known API hosts and the gen_ai.provider.name of each; a host ending in one (after "." or a regional
# prefix's "-") counts.
PROVIDER_HOSTS: dict[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "aiplatform.googleapis.com": "gcp.vertex_ai",
    "openai.azure.com": "azure.ai.openai",
    "services.ai.azure.com": "azure.ai.inference",
    "amazonaws.com": "aws.bedrock",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
    "dashscope.aliyuncs.com": "alibaba",
    "dashscope-intl.aliyuncs.com": "alibaba",
    "api.cerebras.ai": "cerebras",
    "openrouter.ai": "openrouter",
}


def provider_of(base_url: str, named: str | None = None) -> str | None:
    """The gen_ai.provider.name of an upstream: the one it names, or the one its host is known for."""
    if named:
        return named
    host = (urlsplit(base_url).hostname or "").lower()
    for known, provider in PROVIDER_HOSTS.items():
        if host == known or host.endswith(("." + known, "-" + known)):  # us-central1-aiplatform...
            return provider
    return None


def usage_attributes(*, provider: str | None, request_model: str | None, completion: dict[str, Any],
                     ttft_s: float | None, error_type: str | None) -> dict[str, Any]:
    """A usage event's ``gen_ai.*`` attributes (and ``error.type``), from the record's chat.completion; a count
    the provider did not report is left out, never given as zero."""
    usage = _object(completion.get("usage"))
    prompt_details = _object(usage.get("prompt_tokens_details"))
    output_details = _object(usage.get("completion_tokens_details"))
    reasons = [choice.get("finish_reason") for choice in completion.get("choices") or []
               if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str)]
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": request_model,
        "gen_ai.response.model": completion.get("model") or None,
        "gen_ai.response.id": completion.get("id") or None,
        "gen_ai.response.finish_reasons": reasons,
        "gen_ai.usage.input_tokens": _count(usage.get("prompt_tokens")),
        "gen_ai.usage.output_tokens": _count(usage.get("completion_tokens")),
        "gen_ai.usage.cache_read.input_tokens": _count(prompt_details.get("cached_tokens")),
        "gen_ai.usage.cache_creation.input_tokens": _count(prompt_details.get("cache_write_tokens")),
        "gen_ai.usage.reasoning.output_tokens": _count(output_details.get("reasoning_tokens")),
        "gen_ai.response.time_to_first_chunk": ttft_s,
        "error.type": error_type,
    }
    return {name: value for name, value in attributes.items() if value is not None}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    return value if type(value) is int else None


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """Prices per million tokens set in ``STREAMFOLD_PRICES``."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None
    currency: str = "USD"


def read_price_overrides(table: dict[str, Any]) -> dict[str, PriceOverride]:
    """``STREAMFOLD_PRICES`` as overrides; ValueError naming the entry that is wrong."""
    overrides = {}
    for name, entry in table.items():
        try:
            prices = {key: Decimal(str(entry[key])) for key in ("input_mtok", "output_mtok")}
            optional = {key: Decimal(str(entry[key])) for key in ("cache_read_mtok", "cache_write_mtok")
                        if entry.get(key) is not None}
            unknown = set(entry) - {"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "currency"}
            if unknown or any(value < 0 for value in (*prices.values(), *optional.values())):
                raise ValueError(f"unknown fields {sorted(unknown)} or a negative price")
            overrides[name] = PriceOverride(**prices, **optional, currency=str(entry.get("currency", "USD")))
        except (KeyError, TypeError, ArithmeticError, ValueError) as exc:
            raise ValueError(f"STREAMFOLD_PRICES[{name!r}]: needs input_mtok and output_mtok, non-negative "
                             f"numbers ({exc})") from None
    return overrides
