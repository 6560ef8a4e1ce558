"""Usage summaries: aggregation of constructed events, exact percentiles, durations, and the CLI on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from producer.analytics import format_table, parse_duration, percentile, summarize
from producer.cli import main
from streamfold import contract
from streamfold.contract import Status, UsageEvent
from streamfold.keys import Keys


def event(request_id: str, *, model: str | None = "gpt-4o-mini", status: Status = "completed",
          tokens: tuple[int, int, int] | None = (10, 5, 15), latency_ms: float | None = 100,
          ttft_ms: float | None = 20, meta: dict[str, Any] | None = None, cost: float | None = 0.25,
          currency: str = "USD") -> UsageEvent:
    """A usage event shaped as workers publish it; ``tokens`` None is a stream that reported no usage."""
    prompt, completion, total = tokens if tokens is not None else (None, None, None)
    usage = None if tokens is None else {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": total}
    priced = None if cost is None or tokens is None else {"input": cost / 2, "output": cost / 2, "total": cost,
                                                          "currency": currency, "source": "test"}
    return UsageEvent(request_id=request_id, status=status, format="chat", provider="openai", request_model=model,
                      model=model, prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
                      prompt_tokens_details=None, completion_tokens_details=None, usage=usage, cost=priced,
                      cost_reason=None if priced else "no price", latency_ms=latency_ms, ttft_ms=ttft_ms, chunks=3,
                      error_type="upstream_error" if status == "failed" else None, meta=meta or {},
                      finished_at_ms=1_700_000_000_000)


# --- aggregation ---------------------------------------------------------------------------------------------

def test_summary_by_model_counts_requests_and_sums_tokens_per_model_and_in_total() -> None:
    summary = summarize([event("a", model="m1", tokens=(10, 5, 15)), event("b", model="m2", tokens=(1, 2, 3)),
                         event("c", model="m1", tokens=(20, 7, 27))], by="model")
    m1, m2 = summary.groups
    assert (m1.key, m1.requests, m2.key, m2.requests, summary.total.requests) == ("m1", 2, "m2", 1, 3)
    assert {name: count.reported for name, count in m1.tokens.items()} == {
        "prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
    assert summary.total.tokens["total_tokens"].reported == 45


def test_total_tokens_are_summed_as_reported_never_recomputed() -> None:
    # An upstream whose total counts more than prompt + completion (cached or reasoning tokens, say).
    summary = summarize([event("a", tokens=(10, 5, 40))])
    assert summary.total.tokens["total_tokens"].reported == 40


def test_missing_usage_counts_as_unknown_tokens_not_zero() -> None:
    summary = summarize([event("a", tokens=(10, 5, 15)), event("b", status="failed", tokens=None),
                         {**event("c", tokens=(3, 4, 7)), "total_tokens": None}])
    tokens = summary.total.tokens
    assert (tokens["prompt_tokens"].reported, tokens["prompt_tokens"].unknown) == (13, 1)
    assert (tokens["total_tokens"].reported, tokens["total_tokens"].unknown) == (15, 2)
    assert summary.total.no_usage == 1  # only b reported no count at all
    assert summary.total.requests == 3


def test_summary_by_tenant_reads_meta_tenant_and_puts_events_without_one_last() -> None:
    summary = summarize([event("a", meta={"tenant": "acme", "user": "u1"}), event("b", meta={"user": "u2"}),
                         event("c", meta={"tenant": "acme"}), event("d", meta={"tenant": "beta"})], by="tenant")
    assert [(group.key, group.requests) for group in summary.groups] == [("acme", 2), ("beta", 1), (None, 1)]


def test_summary_by_status_and_the_failed_and_incomplete_shares() -> None:
    counts: dict[Status, int] = {"completed": 6, "failed": 3, "incomplete": 1}
    summary = summarize([event(f"{status}-{n}", status=status) for status, count in counts.items()
                         for n in range(count)], by="status")
    assert [(group.key, group.requests) for group in summary.groups] == [
        ("completed", 6), ("failed", 3), ("incomplete", 1)]
    assert (summary.total.failed_share, summary.total.incomplete_share) == (0.3, 0.1)
    assert summary.total.statuses == {"completed": 6, "failed": 3, "incomplete": 1}


def test_percentiles_are_exact_nearest_rank_values() -> None:
    assert [percentile(list(range(1, 101)), p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert [percentile([1, 2, 3, 4], p) for p in (50, 90, 99)] == [2, 4, 4]
    assert [percentile([7], p) for p in (50, 99)] == [7, 7]
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_latency_percentiles_per_group_leave_out_requests_without_the_time() -> None:
    latencies = [300, 100, None, 200, 400, 500, 600, 700, 800, 900, 1000]
    summary = summarize([event(str(n), latency_ms=ms, ttft_ms=None if ms is None else ms / 10)
                         for n, ms in enumerate(latencies)])
    latency, ttft = summary.total.latency_ms, summary.total.ttft_ms
    assert (latency.p50, latency.p90, latency.p99, latency.measured) == (500, 900, 1000, 10)
    assert (ttft.p50, ttft.p90, ttft.p99, ttft.measured) == (50, 90, 100, 10)


def test_cost_is_summed_per_model_and_tenant_per_currency_with_the_unpriced_counted() -> None:
    events = [event("a", model="m1", cost=0.5, meta={"tenant": "acme"}),
              event("b", model="m1", cost=0.25, meta={"tenant": "globex"}),
              event("c", model="m2", cost=None, meta={"tenant": "acme"}),
              event("d", model="m2", cost=2.0, currency="EUR", meta={"tenant": "acme"})]
    by_model = {group.key: group for group in summarize(events, by="model").groups}
    assert (by_model["m1"].cost, by_model["m1"].unpriced) == ({"USD": 0.75}, 0)
    assert (by_model["m2"].cost, by_model["m2"].unpriced) == ({"EUR": 2.0}, 1)
    by_tenant = {group.key: group for group in summarize(events, by="tenant").groups}
    assert by_tenant["acme"].cost == {"EUR": 2.0, "USD": 0.5} and by_tenant["acme"].unpriced == 1
    assert "0.500000 USD + 2.000000 EUR" not in format_table(summarize(events, by="tenant"))  # ordered by name
    assert "2.000000 EUR + 0.500000 USD" in format_table(summarize(events, by="tenant"))


def test_no_events_summarise_to_an_empty_total() -> None:
    summary = summarize([])
    assert summary.groups == () and summary.total.requests == 0
    assert summary.total.failed_share is None and summary.total.latency_ms.p50 is None
    assert "(no usage events)" in format_table(summary)


def test_the_table_has_a_row_per_group_and_a_total_row() -> None:
    summary = summarize([event("a", model="m1", latency_ms=120, ttft_ms=30), event("b", model=None, tokens=None)])
    lines = format_table(summary).splitlines()
    assert lines[0].split()[:3] == ["model", "requests", "failed"]
    assert lines[1].split()[:2] == ["m1", "1"] and "120/120/120" in lines[1]
    assert lines[2].split()[:2] == ["(none)", "1"]
    assert lines[4].split()[:5] == ["TOTAL", "2", "0.0%", "0.0%", "10"]
    assert "0.250000 USD" in lines[4] and lines[4].split()[10] == "1"  # the unpriced one
    assert "leave out requests" in lines[-2] and "without a price" in lines[-1]


def test_the_json_summary_carries_every_figure() -> None:
    summary = summarize([event("a", meta={"tenant": "acme"})], by="tenant")
    body = orjson.loads(orjson.dumps(summary.to_json()))
    assert body["by"] == "tenant" and body["groups"][0]["key"] == "acme"
    assert body["total"] == {
        "key": None, "requests": 1, "statuses": {"completed": 1}, "failed_share": 0.0, "incomplete_share": 0.0,
        "tokens": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "tokens_unknown": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "no_usage": 0,
        "cost": {"USD": 0.25}, "unpriced": 0,
        "latency_ms": {"p50": 100, "p90": 100, "p99": 100, "measured": 1},
        "ttft_ms": {"p50": 20, "p90": 20, "p99": 20, "measured": 1}}


# --- durations ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "ms"), [("30s", 30_000), ("15m", 900_000), ("2h", 7_200_000),
                                          ("7d", 604_800_000), (" 1h ", 3_600_000)])
def test_durations_read_seconds_minutes_hours_and_days(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "30", "h", "1w", "1.5h", "-1h", "0s", "1h30m", "2 h"])
def test_a_duration_that_is_not_a_number_and_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="such as 30s, 15m, 2h or 7d"):
        parse_duration(text)


# --- the CLI -----------------------------------------------------------------------------------------------

def test_a_bad_since_exits_2_naming_the_accepted_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["usage", "--summary", "--since", "2 weeks"])
    assert exit_.value.code == 2
    assert "argument --since: expected a positive duration such as 30s" in capsys.readouterr().err


def test_summary_options_without_summary_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--by", "tenant"]) == 2
    assert "go with --summary" in capsys.readouterr().err


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=2)


@pytest.fixture
def client(real_redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A client of the test Redis, with STREAMFOLD_* pointing main() there; 2 per read to exercise paging."""
    for name, value in {"STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
                        "STREAMFOLD_SHARDS": "2", "STREAMFOLD_READ_COUNT": "2"}.items():
        monkeypatch.setenv(name, value)
    client = redis.Redis.from_url(real_redis_url)
    yield client
    client.close()


def publish(client: redis.Redis, keys: Keys, usage: UsageEvent, entry_id: str = "*") -> None:
    """XADD a usage event as the worker's finish script does: ``rid`` and ``d`` on the request's shard."""
    client.xadd(keys.usage(keys.shard(usage["request_id"])),
                {contract.RID: usage["request_id"].encode(), contract.DATA: contract.encode_record(usage)},
                id=entry_id)


@pytest.mark.redis
def test_usage_summary_reads_every_shard_selects_by_time_and_takes_nothing_from_groups(
        client: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    three_hours_ago = time.time_ns() // 1_000_000 - 3 * 3_600_000
    old = [event(f"old-{n}", model="m-old", meta={"tenant": "acme"}) for n in range(4)]
    for n, usage in enumerate(old):  # written first: an explicit id must be above the stream's last one
        publish(client, keys, usage, f"{three_hours_ago}-{n}")
    new = [event(f"new-{n}", model="m1" if n % 2 else "m2", status="failed" if n == 0 else "completed",
                 tokens=None if n == 0 else (10, 5, 15), latency_ms=100 * (n + 1),
                 meta={"tenant": "acme" if n < 3 else "beta"}) for n in range(6)]
    for usage in new:
        publish(client, keys, usage)
    assert {keys.shard(usage["request_id"]) for usage in old + new} == {0, 1}

    assert main(["usage", "--summary", "--json"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    assert [(group["key"], group["requests"]) for group in body["groups"]] == [("m-old", 4), ("m1", 3), ("m2", 3)]
    assert body["total"]["tokens"]["total_tokens"] == 4 * 15 + 5 * 15

    assert main(["usage", "--summary", "--json", "--since", "2h", "--by", "tenant"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    assert [(group["key"], group["requests"]) for group in body["groups"]] == [("acme", 3), ("beta", 3)]
    total = body["total"]
    assert (total["requests"], total["failed_share"], total["no_usage"]) == (6, 1 / 6, 1)
    assert total["tokens_unknown"]["total_tokens"] == 1
    assert total["latency_ms"] == {"p50": 300, "p90": 600, "p99": 600, "measured": 6}

    assert main(["usage", "--summary", "--by", "status", "--since", "30m"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[1:3]] == [["completed", "5"], ["failed", "1"]]
    assert table[4].split()[:3] == ["TOTAL", "6", "16.7%"]

    assert all(client.xinfo_groups(keys.usage(shard)) == [] for shard in keys.shard_ids())
    assert main(["usage", "--from-start"]) == 0  # an analytics group still gets every event
    assert len(capsys.readouterr().out.splitlines()) == len(old) + len(new)


@pytest.mark.redis
def test_usage_summary_of_no_events_says_so(client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--summary"]) == 0
    assert "(no usage events)" in capsys.readouterr().out
