"""``python -m producer runners``: every call runner as Redis sees it, and whether the calls are served.

Read-only, one round trip: Redis's clock, the leases, each runner's calls count and stats record. A runner
is ``live`` while its lease runs, ``expired`` once it ran out: a runner that died, whose calls a live runner
takes over at its next pass (or that nobody takes over, when none is live).
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from streamfold.settings import Settings


def collect(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Every runner with its lease state, calls held and stats; a JSON-ready object."""
    keys = settings.keys
    with client.pipeline(transaction=False) as pipe:
        pipe.execute_command("TIME")  # type: ignore[no-untyped-call]  # pipe.time() is refused by a cluster pipeline
        pipe.zrange(keys.runner_leases(), 0, -1, withscores=True)
        pipe.hgetall(keys.runner_stats())
        (seconds, micros), leases, stats = pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    names = [name.decode() for name, _ in leases]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hlen(keys.runner_calls(name))
        held = pipe.execute()
    runners = []
    for (name, expiry), calls in zip(leases, held):
        record = _record(stats.get(name))
        runners.append({"name": name.decode(), "state": "live" if expiry >= now_ms else "expired",
                        "lease_left_s": round((expiry - now_ms) / 1000, 1), "held": calls,
                        "in_flight": record.get("in_flight"), "concurrency": record.get("concurrency"),
                        "calls": record.get("calls"), "chunks": record.get("chunks"), "reruns": record.get("reruns")})
    return {"runners": runners, "live": sum(r["state"] == "live" for r in runners),
            "waiting_takeover": sum(r["held"] for r in runners if r["state"] == "expired")}


def check(report: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, why): a live runner, and no expired one holding calls that nobody took over."""
    if not report["live"]:
        return False, f"no call runner holds a live lease; {report['waiting_takeover']} calls wait to be taken over"
    if report["waiting_takeover"]:
        return False, f"{report['waiting_takeover']} calls of expired runners wait to be taken over"
    return True, f"{report['live']} live runners"


def render(report: dict[str, Any]) -> str:
    header = f"{'runner':<44} {'state':<8} {'lease_s':>7} {'held':>5} {'slots':>5} {'calls':>7} {'chunks':>9} {'reruns':>6}"
    lines = [header]
    for r in report["runners"]:
        lines.append(f"{r['name']:<44} {r['state']:<8} {r['lease_left_s']:>7} {r['held']:>5} "
                     f"{_shown(r['concurrency']):>5} {_shown(r['calls']):>7} {_shown(r['chunks']):>9} "
                     f"{_shown(r['reruns']):>6}")
    lines.append(f"{report['live']} live; {report['waiting_takeover']} calls wait to be taken over")
    return "\n".join(lines) + "\n"


def _record(raw: bytes | None) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)
