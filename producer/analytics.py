"""Usage analytics: token totals, request counts, error shares and latency percentiles of usage events.

Pure: usage events (``UsageEvent`` dicts, as workers publish them) in, a ``Summary`` out - no Redis, no clock.
``python -m producer usage --summary`` feeds it the events stored in the usage streams.

Two choices a reader of the numbers must know:

- Token counts are the upstream's own, summed as reported; ``total_tokens`` is never recomputed from the
  other two. A count an event does not carry (the stream failed or stalled before its usage chunk, or the
  upstream reports none) is *unknown*, not zero: it stays out of the sum and is counted in ``unknown``, so a
  sum whose ``unknown`` is above 0 is a lower bound.
- Cost is summed per currency from each event's ``cost.total``; an event without a cost (a model without a
  price, no token counts) is counted in ``unpriced`` instead, so, as with tokens, a sum with unpriced
  requests is a lower bound.
- Percentiles are exact, by nearest rank: the p-th percentile of n sorted values is the value at rank
  ceil(p/100 * n), counting from 1. It is always a value that was observed (p50 of 1, 2, 3, 4 is 2). Events
  without the time (``latency_ms`` / ``ttft_ms`` null: the stream never got that far) are left out of it;
  ``measured`` says how many were in. Every value is kept until the summary is built, so memory grows with
  the number of events summarised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

GroupBy = Literal["model", "tenant", "status"]
GROUP_BYS: tuple[str, ...] = get_args(GroupBy)
PERCENTILES = (50, 90, 99)
TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """Milliseconds in a duration such as ``30s``, ``15m``, ``2h`` or ``7d``; ValueError saying so otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"expected a positive duration such as 30s, 15m, 2h or 7d, got {text!r}")
    return int(match[1]) * _UNIT_MS[match[2]]


def percentile(ordered: Sequence[float], p: int) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of values sorted ascending; None for no values."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    if not ordered:
        return None
    rank = -(-p * len(ordered) // 100)  # ceil(p * n / 100) in integers: no float rounding at the edges
    return ordered[rank - 1]


def group_key(event: Mapping[str, Any], by: GroupBy) -> str | None:
    """The group an event falls in: its model, ``meta["tenant"]`` or status; None when it has none."""
    if by == "tenant":
        meta = event.get("meta")
        value = meta.get("tenant") if isinstance(meta, Mapping) else None
    else:
        value = event.get(by)
    return None if value is None or value == "" else str(value)


@dataclass(frozen=True, slots=True)
class TokenTotal:
    """One token count over a group: the sum of what was reported, and how many requests reported none."""

    reported: int
    unknown: int


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50, p90 and p99 of one time, in ms, over the ``measured`` requests that have it."""

    p50: float | None
    p90: float | None
    p99: float | None
    measured: int


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """Everything summarised for one group key (or, as ``Summary.total``, for all events)."""

    key: str | None
    requests: int
    statuses: dict[str, int]
    tokens: dict[str, TokenTotal]
    no_usage: int
    latency_ms: Percentiles
    ttft_ms: Percentiles
    cost: dict[str, float] = field(default_factory=dict)
    unpriced: int = 0

    @property
    def failed_share(self) -> float | None:
        """Failed requests over all requests of the group, 0 to 1; None for a group of none."""
        return self._share("failed")

    @property
    def incomplete_share(self) -> float | None:
        """Incomplete requests (stalled, or ended without a finish_reason) over all, 0 to 1."""
        return self._share("incomplete")

    def _share(self, status: str) -> float | None:
        return self.statuses.get(status, 0) / self.requests if self.requests else None

    def to_json(self) -> dict[str, Any]:
        """The group as a JSON-ready dict: token sums under ``tokens``, their unknowns under ``tokens_unknown``."""
        return {
            "key": self.key, "requests": self.requests, "statuses": dict(self.statuses),
            "failed_share": self.failed_share, "incomplete_share": self.incomplete_share,
            "tokens": {name: total.reported for name, total in self.tokens.items()},
            "tokens_unknown": {name: total.unknown for name, total in self.tokens.items()},
            "no_usage": self.no_usage, "cost": dict(self.cost), "unpriced": self.unpriced,
            "latency_ms": _percentiles_json(self.latency_ms), "ttft_ms": _percentiles_json(self.ttft_ms),
        }


@dataclass(frozen=True, slots=True)
class Summary:
    """Usage events summarised per group key, groups ordered by key (None last), plus a total over all."""

    by: GroupBy
    groups: tuple[GroupSummary, ...]
    total: GroupSummary

    def to_json(self) -> dict[str, Any]:
        """What ``usage --summary --json`` prints."""
        return {"by": self.by, "groups": [group.to_json() for group in self.groups], "total": self.total.to_json()}


def summarize(events: Iterable[Mapping[str, Any]], by: GroupBy = "model") -> Summary:
    """Summarise usage events per ``by`` key: see the module docstring for unknown tokens and percentiles."""
    if by not in GROUP_BYS:
        raise ValueError(f"cannot group by {by!r}; expected one of {', '.join(GROUP_BYS)}")
    tallies: dict[str | None, _Tally] = {}
    total = _Tally()
    for event in events:
        key = group_key(event, by)
        tally = tallies.get(key)
        if tally is None:
            tally = tallies[key] = _Tally()
        tally.add(event)
        total.add(event)
    keys = sorted(tallies, key=lambda key: (key is None, key or ""))
    return Summary(by, tuple(tallies[key].summary(key) for key in keys), total.summary(None))


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    reported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COUNTS, 0))
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COUNTS, 0))
    no_usage: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)
    unpriced: int = 0

    def add(self, event: Mapping[str, Any]) -> None:
        self.requests += 1
        status = str(event.get("status") or "unknown")
        self.statuses[status] = self.statuses.get(status, 0) + 1
        counts = {name: _count(event.get(name)) for name in TOKEN_COUNTS}
        for name, count in counts.items():
            if count is None:
                self.unknown[name] += 1
            else:
                self.reported[name] += count
        if all(count is None for count in counts.values()):
            self.no_usage += 1
        _append_time(self.latencies, event.get("latency_ms"))
        _append_time(self.ttfts, event.get("ttft_ms"))
        cost = event.get("cost")
        total = cost.get("total") if isinstance(cost, Mapping) else None
        if isinstance(total, (int, float)) and not isinstance(total, bool):
            currency = str(cost.get("currency") or "USD")  # type: ignore[union-attr]
            self.cost[currency] = self.cost.get(currency, 0.0) + total
        else:
            self.unpriced += 1

    def summary(self, key: str | None) -> GroupSummary:
        tokens = {name: TokenTotal(self.reported[name], self.unknown[name]) for name in TOKEN_COUNTS}
        cost = {currency: round(value, 10) for currency, value in sorted(self.cost.items())}
        return GroupSummary(key, self.requests, dict(sorted(self.statuses.items())), tokens, self.no_usage,
                            _percentiles(self.latencies), _percentiles(self.ttfts), cost, self.unpriced)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _append_time(values: list[float], value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values.append(value)


def _percentiles(values: list[float]) -> Percentiles:
    ordered = sorted(values)
    p50, p90, p99 = (percentile(ordered, p) for p in PERCENTILES)
    return Percentiles(p50, p90, p99, len(ordered))


def _percentiles_json(values: Percentiles) -> dict[str, Any]:
    return {"p50": values.p50, "p90": values.p90, "p99": values.p99, "measured": values.measured}


# --- the table ---------------------------------------------------------------------------------------------

_COLUMNS = ("requests", "failed", "incomplete", "prompt_tok", "compl_tok", "total_tok", "no_usage", "cost",
            "unpriced", "latency_ms p50/p90/p99", "ttft_ms p50/p90/p99")


def format_table(summary: Summary) -> str:
    """The summary as a plain-text table: one row per group, then the total row."""
    header = (summary.by, *_COLUMNS)
    rows = [_row(group, "(none)" if group.key is None else group.key) for group in summary.groups]
    last = _row(summary.total, "TOTAL")
    widths = [max(len(row[column]) for row in (header, *rows, last)) for column in range(len(header))]
    rule = tuple("-" * width for width in widths)
    lines = [_line(row, widths) for row in (header, *rows, rule, last)]
    notes = [] if summary.total.requests else ["(no usage events)"]
    if any(count.unknown for count in summary.total.tokens.values()):
        notes.append("token sums leave out requests that did not report that count (no_usage, or see --json)")
    if summary.total.unpriced and summary.total.requests:
        notes.append("cost leaves out requests without a price (unpriced; each event's cost_reason says why)")
    return "\n".join(lines + notes) + "\n"


def _row(group: GroupSummary, label: str) -> tuple[str, ...]:
    tokens = group.tokens
    return (label, str(group.requests), _share(group.failed_share), _share(group.incomplete_share),
            str(tokens["prompt_tokens"].reported), str(tokens["completion_tokens"].reported),
            str(tokens["total_tokens"].reported), str(group.no_usage), _money(group.cost), str(group.unpriced),
            _times(group.latency_ms), _times(group.ttft_ms))


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    first, rest = cells[0].ljust(widths[0]), (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
    return "  ".join((first, *rest)).rstrip()


def _money(cost: dict[str, float]) -> str:
    return " + ".join(f"{value:.6f} {currency}" for currency, value in cost.items()) or "-"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _times(values: Percentiles) -> str:
    if not values.measured:
        return "-"
    return "/".join("-" if value is None else f"{value:.0f}" for value in (values.p50, values.p90, values.p99))
