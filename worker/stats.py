"""What the worker pool is doing, read from Redis without changing anything, and how many workers it needs.

``python -m worker stats`` takes two samples ``--interval`` seconds apart (one when the interval is 0):

    backlog          requests no worker has claimed yet: control entries after the group's last-delivered id
                     (XINFO GROUPS lag; counted with XRANGE where Redis cannot tell the lag), and the age
                     of the oldest, from its id's timestamp
    in flight        requests claimed and not finished: the group's pending count, per consumer too
    rates            arrivals (control streams' entries-added), finishes (results streams' entries-added) and
                     backlog growth, per second, between the samples
    workers          every consumer of the group and every worker stats record (worker/metrics.py), with its
                     state (live, quiet, dead: ``housekeeping.consumer_state``)
    streams          lengths of the results, usage and dead-letter streams

The recommended worker count (``recommend``), with C = concurrency per worker, W = the mean time a request
holds a slot, claim to finish (from the live workers' stats records), and D = ``--drain``, the time in
which to clear the backlog:

    slots   = max(arrivals/s x W, in_flight) + backlog x min(1, W / D)
    workers = ceil(slots / C)

Requests to hold at once: by Little's law arrivals x W keep up with arrivals at steady state, but never
fewer than are held now; and starting the backlog within D takes backlog x W / D more (never more than one
slot per waiting request). Each worker holds up to C. Before any worker has finished a request W is
unknown and the recommendation is the live workers (at least 1 while anything waits).

All shards are read from one Redis; every command names one key, so on Redis Cluster the client splits a
pipeline of them by slot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from streamfold.connection import unavailable
from streamfold.settings import Settings
from worker.broker import parse_id
from worker.housekeeping import consumer_state, is_fresh, read_worker_records, record_state, redis_time_ms
from worker.metrics import WorkerRecord

_ABSENT = ("no such key", "NOGROUP")
_COUNT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ShardSample:
    """One shard's control stream as the worker group sees it."""

    shard: int
    stream: str
    group: bool
    backlog: int
    oldest_unclaimed_ms: int | None
    pending: int
    entries_added: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the pool, at ``time_ms`` on Redis's clock. ``consumers`` maps a consumer name to its
    pending count and idle time (ms), summed and least over the shards; ``streams`` holds the output
    streams' lengths summed over the shards, and the results streams' entries-added."""

    time_ms: int
    records: dict[str, WorkerRecord]
    shards: list[ShardSample] = field(default_factory=list)
    consumers: dict[str, tuple[int, int]] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("results_added", "results", "usage", "dead_letters"), 0))

    @property
    def backlog(self) -> int:
        return sum(shard.backlog for shard in self.shards)

    @property
    def in_flight(self) -> int:
        return sum(shard.pending for shard in self.shards)

    @property
    def arrivals(self) -> int:
        return sum(shard.entries_added for shard in self.shards)

    @property
    def oldest_unclaimed_ms(self) -> int | None:
        return min((shard.oldest_unclaimed_ms for shard in self.shards if shard.oldest_unclaimed_ms is not None),
                   default=None)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A worker count, what it rests on, and the formula with the numbers filled in (``basis``)."""

    workers: int
    slots: float | None
    mean_hold_s: float | None
    concurrency: int
    drain_s: float
    basis: str


def recommend(*, arrivals_per_s: float | None, backlog: int, in_flight: int, mean_hold_s: float | None,
              concurrency: int, drain_s: float, live_workers: int) -> Recommendation:
    """The worker count that keeps up with arrivals and clears the backlog within ``drain_s`` (module doc)."""
    if mean_hold_s is None:
        workers = max(live_workers, 1 if backlog or in_flight else 0)
        return Recommendation(workers, None, None, concurrency, drain_s,
                              "no finished request measured yet: the live workers, at least 1 while work waits")
    arrivals = arrivals_per_s or 0.0
    slots = max(arrivals * mean_hold_s, in_flight) + backlog * min(1.0, mean_hold_s / drain_s)
    basis = (f"ceil((max({arrivals:.3g}/s x {mean_hold_s:.3g} s, {in_flight}) + {backlog} x "
             f"min(1, {mean_hold_s:.3g} s / {drain_s:g} s)) / {concurrency})")
    return Recommendation(_ceil(slots / concurrency), slots, mean_hold_s, concurrency, drain_s, basis)


def take_sample(client: redis.Redis, settings: Settings) -> Sample:
    """Read the pool's state in two pipelined round trips: everything, then the oldest unclaimed entries."""
    keys, group, shards = settings.keys, settings.group, list(settings.keys.shard_ids())
    r: Any = client
    with unavailable():
        with r.pipeline(transaction=False) as pipe:
            pipe.execute_command("TIME")  # not pipe.time(), which redis-py's cluster pipeline refuses
            pipe.hgetall(keys.workers())
            for shard in shards:
                pipe.xinfo_stream(keys.requests(shard))
                pipe.xinfo_groups(keys.requests(shard))
                pipe.xinfo_consumers(keys.requests(shard), group)
                pipe.xinfo_stream(keys.results(shard))
                pipe.xlen(keys.usage(shard))
                pipe.xlen(keys.dead_letters(shard))
            replies = [present(reply) for reply in pipe.execute(raise_on_error=False)]
        now_ms, records = redis_time_ms(replies[0]), read_worker_records(replies[1] or {})
        per_shard = [replies[2 + 6 * index: 8 + 6 * index] for index in range(len(shards))]
        groups = [group_named(info, group) for _, info, *_ in per_shard]
        with r.pipeline(transaction=False) as pipe:
            for shard, mine in zip(shards, groups):
                if mine is not None:
                    pipe.xrange(keys.requests(shard), "(" + mine["last-delivered-id"].decode(), "+", count=1)
            oldest = iter(pipe.execute())
        sample = Sample(now_ms, records)
        for shard, mine, (stream, _, members, result_stream, usage, dead) in zip(shards, groups, per_shard):
            sample.shards.append(_shard(r, shard, keys.requests(shard), stream, mine,
                                        next(oldest) if mine is not None else None))
            for member in members or []:
                name = member["name"].decode()
                pending, idle = sample.consumers.get(name, (0, member["idle"]))
                sample.consumers[name] = (pending + member["pending"], min(idle, member["idle"]))
            sample.streams["results_added"] += result_stream["entries-added"] if result_stream else 0
            sample.streams["results"] += result_stream["length"] if result_stream else 0
            sample.streams["usage"] += usage or 0
            sample.streams["dead_letters"] += dead or 0
    return sample


def collect(client: redis.Redis, settings: Settings, *, interval: float = 1.0, drain_s: float = 60.0,
            sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Sample, wait ``interval`` seconds, sample again; the report as ``stats --json`` prints it."""
    first = take_sample(client, settings) if interval > 0 else None
    if first is not None:
        sleep(interval)
    return report(first, take_sample(client, settings), settings, drain_s=drain_s)


def report(first: Sample | None, last: Sample, settings: Settings, *, drain_s: float) -> dict[str, Any]:
    """Two samples (or one) turned into the stats report: plain JSON types only."""
    now, rates = last.time_ms, None
    if first is not None and last.time_ms > first.time_ms:
        seconds = (last.time_ms - first.time_ms) / 1000
        rates = {"arrivals_per_s": _round(max(0, last.arrivals - first.arrivals) / seconds),
                 "finishes_per_s": _round(max(0, last.streams["results_added"] - first.streams["results_added"])
                                          / seconds),
                 "backlog_growth_per_s": _round((last.backlog - first.backlog) / seconds)}
    fresh = {name: record for name, record in last.records.items() if is_fresh(record, now)}
    finished = sum(record["finished"] for record in fresh.values())
    mean_hold = sum(record["held_ms"] for record in fresh.values()) / 1000 / finished if finished else None
    slots = [record["concurrency"] for record in fresh.values()]
    concurrency = round(sum(slots) / len(slots)) if slots else settings.concurrency
    advice = recommend(arrivals_per_s=rates["arrivals_per_s"] if rates else None, backlog=last.backlog,
                       in_flight=last.in_flight, mean_hold_s=mean_hold, concurrency=concurrency, drain_s=drain_s,
                       live_workers=len(fresh))
    workers = [_worker(name, last, settings) for name in sorted({*last.consumers, *last.records})]
    oldest = last.oldest_unclaimed_ms
    return {
        "namespace": settings.namespace, "group": settings.group, "shards": settings.shards,
        "time_ms": now, "interval_s": (last.time_ms - first.time_ms) / 1000 if first else 0.0,
        "backlog": {"requests": last.backlog, "oldest_age_s": _age(now, oldest)},
        "in_flight": last.in_flight,
        "rates": rates,
        "streams": {name: last.streams[name] for name in ("results", "usage", "dead_letters")},
        "live_workers": len(fresh),
        "workers": workers,
        "dead_consumers": [worker["name"] for worker in workers
                           if worker["state"] == "dead" and worker["name"] in last.consumers],
        "recommendation": {"workers": advice.workers, "slots": _round(advice.slots),
                           "mean_hold_s": _round(advice.mean_hold_s), "concurrency": advice.concurrency,
                           "drain_s": advice.drain_s, "basis": advice.basis},
        "per_shard": [{"shard": shard.shard, "stream": shard.stream, "group": shard.group, "backlog": shard.backlog,
                       "oldest_age_s": _age(now, shard.oldest_unclaimed_ms), "pending": shard.pending}
                      for shard in last.shards],
    }


def render_table(stats: Mapping[str, Any]) -> str:
    """The report for people: a summary, then one row per worker."""
    backlog, rates, streams, advice = stats["backlog"], stats["rates"], stats["streams"], stats["recommendation"]
    oldest = "" if backlog["oldest_age_s"] is None else f", oldest {backlog['oldest_age_s']:.1f} s old"
    lines = [f"namespace {stats['namespace']}  group {stats['group']}  shards {stats['shards']}  "
             f"sampled over {stats['interval_s']:g} s", "",
             f"backlog        {backlog['requests']} requests unclaimed{oldest}",
             f"in flight      {stats['in_flight']} requests, {stats['live_workers']} live workers"]
    if rates is not None:
        lines.append(f"rates          arrivals {rates['arrivals_per_s']:.2f}/s  "
                     f"finishes {rates['finishes_per_s']:.2f}/s  backlog growth {rates['backlog_growth_per_s']:+.2f}/s")
    lines += [f"streams        results {streams['results']}  usage {streams['usage']}  "
              f"dead letters {streams['dead_letters']}",
              f"recommended    {advice['workers']} workers: {advice['basis']}", ""]
    header = ("WORKER", "STATE", "PENDING", "IDLE_S", "IN_FLIGHT", "SLOTS", "FINISHED", "CHUNKS", "HOLD_S", "SEEN_S")
    rows = [header] + [(w["name"], w["state"], *(_cell(w[field]) for field in (
        "pending", "idle_s", "in_flight", "concurrency", "finished", "chunks", "mean_hold_s", "seen_s_ago")))
        for w in stats["workers"]]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines += ["  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                        for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    if stats["dead_consumers"]:
        lines += ["", f"dead consumers: {', '.join(stats['dead_consumers'])} (pending entries are recovered by "
                  "peers after the claim timeout; empty consumers are removed by housekeeping)"]
    return "\n".join(lines)


# --- helpers ----------------------------------------------------------------------------------------------

def _shard(r: Any, shard: int, key: str, stream: Any, group: Any, oldest: Any) -> ShardSample:
    """A shard's backlog and pending count, from its XINFO replies and its oldest unclaimed entry."""
    added = stream["entries-added"] if stream else 0
    if group is None:  # no group yet: every entry waits
        first = stream["first-entry"] if stream and stream["length"] else None
        return ShardSample(shard, key, False, stream["length"] if stream else 0,
                           parse_id(first[0])[0] if first else None, 0, added)
    backlog = group["lag"]
    if backlog is None:  # Redis cannot tell the lag (entries deleted in the range): count them
        backlog, cursor = 0, "(" + group["last-delivered-id"].decode()
        while page := r.xrange(key, cursor, "+", count=_COUNT_PAGE):
            backlog += len(page)
            cursor = "(" + page[-1][0].decode()
    return ShardSample(shard, key, True, int(backlog), parse_id(oldest[0][0])[0] if oldest else None,
                       int(group["pending"]), added)


def _worker(name: str, sample: Sample, settings: Settings) -> dict[str, Any]:
    record = sample.records.get(name)
    seen_ms = None if record is None else max(0, sample.time_ms - record["updated_at_ms"])
    pending, idle_ms = sample.consumers.get(name, (0, seen_ms if seen_ms is not None else 0))
    finished = record["finished"] if record else None
    return {"name": name, "state": consumer_state(pending, idle_ms, record_state(record, sample.time_ms), settings),
            "pending": pending, "idle_s": idle_ms / 1000 if name in sample.consumers else None,
            "in_flight": record["in_flight"] if record else None,
            "concurrency": record["concurrency"] if record else None, "finished": finished,
            "chunks": record["chunks"] if record else None,
            "mean_hold_s": _round(record["held_ms"] / 1000 / finished) if record and finished else None,
            "seen_s_ago": None if seen_ms is None else seen_ms / 1000}


def group_named(groups: Any, name: str) -> Any:
    """The group called ``name`` in an XINFO GROUPS reply (None or an error-free list); None if absent."""
    return next((g for g in groups or [] if g["name"].decode() == name), None)


def present(reply: Any) -> Any:
    """A pipelined reply; None for a stream or group that does not exist; other errors raise."""
    if isinstance(reply, redis.ResponseError) and any(word in str(reply) for word in _ABSENT):
        return None
    if isinstance(reply, Exception):
        raise reply
    return reply


def _age(now_ms: int, then_ms: int | None) -> float | None:
    return None if then_ms is None else max(0, now_ms - then_ms) / 1000


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _ceil(value: float) -> int:
    return math.ceil(value - 1e-9)  # 2.0000000001 from float division is 2 workers, not 3


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
