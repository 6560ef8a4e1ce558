"""``python -m worker health``: is the pool being served? For container probes: fast and read-only.

Healthy when Redis answers, the worker group exists on every shard's control stream, and the pool is
served: a worker's stats record is fresh (refreshed every 2 s, stale after three misses and a second), or a
consumer without one touched Redis within a claim timeout - or, with no live worker, nothing waits: no unclaimed request older than a claim timeout and no
request held by a consumer that stopped. Two round trips at most; nothing is written.
"""

from __future__ import annotations

from typing import Any

import redis

from streamfold.connection import unavailable
from streamfold.errors import RedisUnavailable
from streamfold.settings import Settings
from worker.broker import parse_id
from worker.housekeeping import is_fresh, read_worker_records, redis_time_ms
from worker.stats import group_named, present


def check(client: redis.Redis, settings: Settings) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    keys, group, limit_ms = settings.keys, settings.group, settings.claim_timeout * 1000
    r: Any = client
    try:
        with unavailable():
            with r.pipeline(transaction=False) as pipe:
                pipe.execute_command("TIME")  # not pipe.time(), which a cluster pipeline refuses
                pipe.hgetall(keys.workers())
                for shard in keys.shard_ids():
                    pipe.xinfo_groups(keys.requests(shard))
                seconds_micros, raw_records, *infos = map(present, pipe.execute(raise_on_error=False))
            now_ms = redis_time_ms(seconds_micros)
            groups = []
            for shard, info in zip(keys.shard_ids(), infos):
                mine = group_named(info, group)
                if mine is None:
                    return False, f"no consumer group {group!r} on {keys.requests(shard)}: no worker has joined"
                groups.append(mine)
            records = read_worker_records(raw_records)
            live = sum(is_fresh(record, now_ms) for record in records.values())
            if live:
                return True, f"{live} live workers"
            with r.pipeline(transaction=False) as pipe:
                for shard, mine in zip(keys.shard_ids(), groups):
                    pipe.xinfo_consumers(keys.requests(shard), group)
                    pipe.xrange(keys.requests(shard), "(" + mine["last-delivered-id"].decode(), "+", count=1)
                replies = pipe.execute()
    except RedisUnavailable as exc:
        return False, str(exc)
    except redis.RedisError as exc:
        return False, f"Redis error: {type(exc).__name__}: {exc}"
    consumers, oldest = replies[0::2], replies[1::2]
    # A consumer whose worker's record went stale touched Redis lately only because it died lately.
    if any(member["idle"] <= limit_ms and member["name"].decode() not in records
           for members in consumers for member in members):
        return True, "a consumer of the group without a stats record is active"
    waiting = [now_ms - parse_id(entries[0][0])[0] for entries in oldest if entries]
    if waiting and max(waiting) > limit_ms:
        return False, f"no live worker, and a request has waited {max(waiting) / 1000:.1f} s unclaimed"
    held = sum(g["pending"] for g in groups)
    if held:
        return False, f"no live worker, and {held} claimed requests are held by consumers that stopped"
    return True, "no live worker, and nothing waits longer than the claim timeout"
