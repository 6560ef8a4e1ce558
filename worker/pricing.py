"""What a request cost, from the ``genai-prices`` library's bundled prices, or from prices set in settings.

``genai-prices`` is pinned (its API changed between releases) and used offline, from the price data it ships
with: no network, no update behind anyone's back. It prices the normalized counts every dialect produces -
input including cache reads and writes (each at its own rate where the model has one), output including
reasoning - for the model the upstream named, at the provider (its ``gen_ai.provider.name``, mapped to the
library's provider ids). ``STREAMFOLD_PRICES`` overrides or adds prices for negotiated or custom models:
``{"<provider>/<model>" or "<model>": {"input_mtok": 2.5, "output_mtok": 10, "cache_read_mtok": 1.25,
"cache_write_mtok": 3.75, "currency": "USD"}}`` (prices per million tokens).

A model with no price gets ``cost: null`` and ``cost_reason`` says why: never a guess.
"""

from __future__ import annotations

import warnings
from decimal import Decimal
from importlib.metadata import version
from typing import Any, TypedDict

import genai_prices

from streamfold.genai import PriceOverride

# gen_ai.provider.name -> the provider id genai-prices knows it by.
PRICE_PROVIDERS = {
    "openai": "openai", "anthropic": "anthropic", "gcp.gemini": "google", "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google", "azure.ai.openai": "azure", "azure.ai.inference": "azure", "aws.bedrock": "aws",
    "deepseek": "deepseek", "groq": "groq", "mistral_ai": "mistral", "x_ai": "x-ai", "perplexity": "perplexity",
    "cohere": "cohere", "cerebras": "cerebras", "openrouter": "openrouter",
}
SOURCE = f"genai-prices {version('genai-prices')}"


class Cost(TypedDict):
    """What a request cost: ``input`` (prompt, cache reads and writes), ``output`` (reasoning included),
    ``total``, in ``currency``; ``source`` says where the prices came from."""

    input: float
    output: float
    total: float
    currency: str
    source: str


class PriceBook:
    """Prices a request's normalized usage; see the module docstring."""

    def __init__(self, overrides: dict[str, PriceOverride] | None = None) -> None:
        self._overrides = dict(overrides or {})

    def cost(self, provider: str | None, model: str | None, usage: dict[str, Any] | None
             ) -> tuple[Cost | None, str | None]:
        """(cost, None), or (None, the reason there is none)."""
        if not model:
            return None, "the upstream named no model"
        counts = _counts(usage)
        if counts is None:
            return None, "the upstream reported no token counts"
        override = self._overrides.get(f"{provider}/{model}") or self._overrides.get(model)
        if override is not None:
            return _priced(override, counts), None
        if provider is None:
            return None, "unknown provider: name it with the upstream's \"provider\" (or Publisher.start(provider=))"
        provider_id = PRICE_PROVIDERS.get(provider, provider)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the library warns about usage keys it does not price
                price = genai_prices.calc_price(genai_prices.Usage(**counts), model_ref=model, provider_id=provider_id)
        except LookupError:
            return None, f"no price for model {model!r} at provider {provider!r} in {SOURCE}"
        return Cost(input=_money(price.input_price), output=_money(price.output_price),
                    total=_money(price.total_price), currency="USD", source=SOURCE), None


def _counts(usage: dict[str, Any] | None) -> dict[str, int] | None:
    """The genai-prices usage of a chat-shaped usage: input with its cache reads and writes, output with its
    reasoning; None when neither count is known."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    counts = {"input_tokens": prompt or 0, "output_tokens": completion or 0}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        for source, target in (("cached_tokens", "cache_read_tokens"), ("cache_write_tokens", "cache_write_tokens")):
            if (value := _int(details.get(source))) is not None:
                counts[target] = value
    return counts


def _priced(override: PriceOverride, counts: dict[str, int]) -> Cost:
    million = Decimal(1_000_000)
    read, write = counts.get("cache_read_tokens", 0), counts.get("cache_write_tokens", 0)
    fresh = max(counts["input_tokens"] - read - write, 0)
    input_cost = (fresh * override.input_mtok + read * (override.cache_read_mtok or override.input_mtok)
                  + write * (override.cache_write_mtok or override.input_mtok)) / million
    output_cost = counts["output_tokens"] * override.output_mtok / million
    return Cost(input=_money(input_cost), output=_money(output_cost), total=_money(input_cost + output_cost),
                currency=override.currency, source="STREAMFOLD_PRICES")


def _money(value: Decimal) -> float:
    return float(round(value, 10))


def _int(value: Any) -> int | None:
    return value if type(value) is int else None
