"""Soak: steady load for a given time while workers and call runners are killed and restarted and poison is fed.

Run by hand; it starts its own ``redis-server`` (free port, nothing saved), mock upstream, ``--workers`` stream
workers and ``--runners`` call runners, so it disturbs nobody::

    python bench/soak.py [--minutes 10] [--rate 10] [--workers 2] [--runners 2] [--kill-every 30]
                         [--poison-every 10] [--out docs/soak.png]

Load. ``--rate`` requests a second: most are enqueued as LLM calls (``enqueue_chat_completion``) that the call
runners stream from the mock upstream, which replays the recorded fixtures with ``--latency-ms`` before each
chunk; of those, one in twenty goes to an upstream that sends an error event after three chunks and one in
twenty to one that drops the connection after three (retried, then failed). ``--direct`` of them are written
straight onto Redis with the ``Publisher``, as a producer of its own would. Every ``--poison-every`` seconds
one poisoned request, in turn: a chunk that is not JSON, a usage object nested past the depth limit, a
chunk-stream key holding a string, a control entry whose request id is not UTF-8.

Faults. Every ``--kill-every`` seconds a random worker or runner gets SIGKILL and is started again at once
under the same name, as a supervisor would. The kills fall a few milliseconds after an enqueue (the two
schedules meet), when a runner is likeliest to hold a job it has just taken. A process that exits unasked is
started again and reported.

Retention. Results, usage events and dead letters are kept ``--retention`` seconds (chunks, result lookups,
the output streams' max ages, rq's job records), request id claims twice that and call claims (the cancel
keys: job timeout + cancel TTL) three times, so that Redis reaches a steady state within the run rather than
in a day. This process reads the results, usage and dead-letter streams
through consumer groups of its own, so that trimming never drops an entry before it was counted.

Samples, every ``--sample-every`` seconds: Redis ``used_memory``, DBSIZE and keys by kind, the streams'
lengths, requests pending in the worker group, calls held by runners, jobs queued in rq, and each process's
RSS (from /proc). Memory is flat when the median of the last minute is the first minute's after the warm-up
(three times the retention), and the least-squares slope after the warm-up is near zero.

Accounting, once the load stops and everything drained: every request has exactly one result (completed,
failed or incomplete) and one usage event, every poisoned one its dead letter and the status it must have,
nothing is pending, no result names a request never sent. Writes ``<out>.csv`` (the samples) and ``<out>``
(a plot), prints tables; exits 1 when anything is unaccounted for.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from rq import Queue
from rq.job import Job

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import free_port, machine, rss_mb  # noqa: E402

from producer import enqueue_chat_completion  # noqa: E402
from producer.jobs import job_id  # noqa: E402
from producer.publisher import Publisher, new_request_id  # noqa: E402
from streamfold.contract import encode_control  # noqa: E402
from streamfold.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "fixtures" / "recorded"
GROUP = "soak"  # this process's consumer group on the results, usage and dead-letter streams
POISONS = ("malformed", "deep-usage", "wrong-type", "bad-request-id")
# What each poisoned request must end as: its status (None: no result at all, only a dead letter).
POISON_STATUS = {"malformed": "failed", "deep-usage": "failed", "wrong-type": "failed", "bad-request-id": None}


def recorded(name: str) -> list[bytes]:
    return [line for line in (RECORDED / f"{name}.jsonl").read_bytes().splitlines() if line.strip()]


def deep(depth: int) -> bytes:
    """A JSON object nested ``depth`` levels: readable by the parser, deeper than an encoder writes."""
    return b'{"x":' * depth + b"1" + b"}" * depth


@dataclass
class Ledger:
    """What was sent and what came back, by request id."""

    sent: dict[str, str] = field(default_factory=dict)  # request id -> source (call, direct, poison:<kind>)
    bad_ids: set[bytes] = field(default_factory=set)  # the control entries' raw request ids that are not ids
    results: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    usage: Counter[str] = field(default_factory=Counter)
    dead: dict[bytes, list[str]] = field(default_factory=lambda: defaultdict(list))

    def record(self, stream: str, fields: dict[bytes, bytes]) -> None:
        rid = fields.get(b"rid", b"")
        if stream == "results":
            self.results[rid.decode()].append(orjson.loads(fields[b"d"]))
        elif stream == "usage":
            self.usage[rid.decode()] += 1
        else:
            self.dead[rid].append(fields.get(b"reason", b"").decode(errors="replace"))


class Soak:
    """The processes under test, the load sent to them, and what is sampled and counted of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.random = random.Random(args.seed)
        redis_port, mock_port = free_port(), free_port()
        self.url = f"redis://127.0.0.1:{redis_port}/0"
        self.namespace = f"soak-{uuid.uuid4().hex[:6]}"
        mock = f"http://127.0.0.1:{mock_port}/v1?mock_latency_ms={args.latency_ms}"
        upstreams = {"default": {"base_url": mock, "api_key_env": "BENCH_KEY"},
                     "erroring": {"base_url": mock + "&mock_error_after=3", "api_key_env": "BENCH_KEY"},
                     "cut": {"base_url": mock + "&mock_disconnect_after=3", "api_key_env": "BENCH_KEY"}}
        keep = args.retention
        # A call's claim lives job_timeout + cancel_ttl; rq keeps a job's record result_ttl (the enqueuer's).
        retention = {"chunk_ttl": keep, "result_ttl": keep, "results_max_age": keep, "usage_max_age": keep,
                     "dead_letter_max_age": keep, "stream_max_age": 2 * keep, "job_timeout": 2 * keep,
                     "cancel_ttl": keep}
        self.settings = Settings(redis_url=self.url, namespace=self.namespace, queue=self.namespace,
                                 upstreams=upstreams, **retention)
        self.keys = self.settings.keys
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("STREAMFOLD_")},
                    "STREAMFOLD_REDIS_URL": self.url, "STREAMFOLD_NAMESPACE": self.namespace,
                    "STREAMFOLD_QUEUE": self.namespace, "STREAMFOLD_UPSTREAMS": json.dumps(upstreams),
                    "BENCH_KEY": "sk-bench", **{f"STREAMFOLD_{name.upper()}": str(value)
                                                for name, value in retention.items()}}
        self.commands = {"redis": [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                   "--save", "", "--appendonly", "no"],
                         "mock": [sys.executable, "-m", "producer", "mock-upstream", "--port", str(mock_port)]}
        for n in range(args.workers):
            self.commands[f"worker-{n}"] = [sys.executable, "-m", "worker", "run", "--name", f"worker-{n}"]
        for n in range(args.runners):
            self.commands[f"runner-{n}"] = [sys.executable, "-m", "producer", "work", "--name", f"runner-{n}",
                                            "--log-level", "WARNING"]
        self.victims = [name for name in self.commands if name.startswith(("worker-", "runner-"))]
        self.logs = Path(tempfile.mkdtemp(prefix="soak-logs-"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.kills: list[tuple[float, str]] = []
        self.unasked: list[tuple[float, str, int]] = []  # (t, process, exit status): exits nobody caused
        self.ledger = Ledger()
        self.samples: list[dict[str, float]] = []
        self.client = redis.Redis.from_url(self.url)
        self.queue = Queue(self.settings.queue, connection=self.client)
        self.models = sorted(path.stem for path in RECORDED.glob("*.jsonl"))
        self.sent_count = 0
        self.started = 0.0

    # --- processes ---------------------------------------------------------------------------------------

    def __enter__(self) -> Soak:
        self._start("redis")
        self._wait(self.client.ping)
        for shard in self.keys.shard_ids():
            for stream in (self.keys.results(shard), self.keys.usage(shard), self.keys.dead_letters(shard)):
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        for name in self.commands:
            if name != "redis":
                self._start(name)
        self.publisher = Publisher(self.client, self.keys, batch_size=1000, max_age=self.settings.stream_max_age)
        time.sleep(2)  # registered
        return self

    def _start(self, name: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(self.commands[name], cwd=ROOT, env=self.env,
                                                    stdout=subprocess.DEVNULL, stderr=log)

    @staticmethod
    def _wait(ready: Any) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                ready()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL one worker or runner at random and start it again under the same name."""
        name = self.random.choice(self.victims)
        process = self.processes[name]
        process.kill()
        process.wait()
        self.kills.append((self.elapsed(), name))
        print(f"  {time.strftime('%H:%M:%S')} killed {name}", file=sys.stderr)
        self._start(name)

    def restart_the_exited(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                self.unasked.append((self.elapsed(), name, process.returncode))
                print(f"  {name} exited unasked with status {process.returncode}; started again", file=sys.stderr)
                self._start(name)

    def __exit__(self, *exc: object) -> None:
        for names in ([n for n in self.processes if n not in ("redis", "mock")], ["mock"], ["redis"]):
            for name in names:
                self.processes[name].send_signal(signal.SIGTERM)
            for name in names:
                try:
                    self.processes[name].wait(40)
                except subprocess.TimeoutExpired:
                    self.processes[name].kill()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # --- load ----------------------------------------------------------------------------------------------

    def send(self) -> None:
        """One request: a direct publish (``--direct`` of them) or an LLM call through rq and the runners."""
        model = self.models[self.sent_count % len(self.models)]
        self.sent_count += 1
        if self.random.random() < self.args.direct:
            request_id = new_request_id()
            self._publish(request_id, recorded(model))
            self.ledger.sent[request_id] = "direct"
            return
        upstream = self.random.choices(["default", "erroring", "cut"], weights=[18, 1, 1])[0]
        params = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        request_id = enqueue_chat_completion(params, upstream=upstream, client=self.client, settings=self.settings)
        self.ledger.sent[request_id] = "call" if upstream == "default" else f"call, {upstream} upstream"

    def _publish(self, request_id: str, chunks: list[bytes]) -> None:
        self.publisher.start(request_id)
        for chunk in chunks:
            self.publisher.push(request_id, chunk)
        self.publisher.end(request_id)
        self.publisher.flush()

    def poison(self, number: int) -> None:
        """One poisoned request, made as tests/worker/test_fault_isolation.py makes them."""
        kind = POISONS[number % len(POISONS)]
        request_id = f"poison-{kind}-{number}"
        chunks = recorded("openai_refusal")
        if kind == "malformed":
            self._publish(request_id, [*chunks[:3], b"{not json", *chunks[3:]])
        elif kind == "deep-usage":
            bad = b'{"id":"chatcmpl-poison","object":"chat.completion.chunk","created":1,"model":"m","choices":[],' \
                  b'"usage":' + deep(300) + b"}"
            self._publish(request_id, [*chunks[:3], bad, *chunks[3:]])
        elif kind == "wrong-type":
            self.client.set(self.keys.chunks(request_id), b"a string, not a stream")
            self.client.xadd(self.keys.requests(self.keys.shard(request_id)), encode_control(request_id, ts=b"1"))
        else:
            raw = b"\xff\xfe-" + request_id.encode()
            self.client.xadd(self.keys.requests(0), {"rid": raw, "ts": b"1"})
            self.ledger.bad_ids.add(raw)
        self.ledger.sent[request_id] = f"poison: {kind}"

    # --- observing -------------------------------------------------------------------------------------------

    def read_outputs(self) -> None:
        """Count every new result, usage event and dead letter, through this process's groups."""
        streams = {}
        for shard in self.keys.shard_ids():
            streams.update({self.keys.results(shard): "results", self.keys.usage(shard): "usage",
                            self.keys.dead_letters(shard): "dead"})
        while True:
            replies = self.client.xreadgroup(GROUP, "reader", {key: ">" for key in streams}, count=1000)
            if not replies:
                return
            for key, entries in replies:
                for _, fields in entries:
                    self.ledger.record(streams[key.decode()], fields)
                self.client.xack(key, GROUP, *[entry_id for entry_id, _ in entries])

    def sample(self) -> None:
        keys: Counter[str] = Counter()
        calls_held = 0
        for key in self.client.scan_iter(count=1000):
            kind = key_kind(key.decode(errors="replace"))
            keys[kind] += 1
            if kind == "runner calls":
                calls_held += int(self.client.hlen(key))
        shard = range(self.keys.shards)
        row: dict[str, float] = {
            "t_s": round(self.elapsed(), 1),
            "used_memory_mb": int(self.client.info("memory")["used_memory"]) / 2**20,
            "dbsize": int(self.client.dbsize()),
            **{f"keys: {kind}": keys[kind] for kind in KEY_KINDS},
            "control entries": sum(self._xlen(self.keys.requests(s)) for s in shard),
            "results stream": sum(self._xlen(self.keys.results(s)) for s in shard),
            "usage stream": sum(self._xlen(self.keys.usage(s)) for s in shard),
            "dead letters": sum(self._xlen(self.keys.dead_letters(s)) for s in shard),
            "pending: workers": sum(self._pending(self.keys.requests(s), self.settings.group) for s in shard),
            "pending: runner calls": calls_held,
            "pending: rq queued": int(self.client.llen(self.queue.key)),
            "pending: rq taken, not started": int(self.client.llen(self.queue.intermediate_queue_key)),
            "sent": len(self.ledger.sent),
            "results": sum(len(records) for records in self.ledger.results.values()),
        }
        for name, process in self.processes.items():
            row[f"rss MB: {name}"] = round(rss_mb(process.pid), 1)
        self.samples.append(row)

    def _xlen(self, key: str) -> int:
        return int(self.client.xlen(key))

    def _pending(self, key: str, group: str) -> int:
        try:
            return int(self.client.xpending(key, group)["pending"])
        except redis.ResponseError:  # no group yet
            return 0

    def whereabouts(self, request_id: str) -> str:
        """Where a call without a result was left: its chunk stream, its rq job, the runners' records."""
        queue = self.queue
        job = Job.fetch(job_id(self.keys, request_id), connection=self.client)
        held = [key.decode() for key in self.client.scan_iter(match=self.keys.runner_calls("*"))
                if self.client.hexists(key, request_id)]
        return (f"chunk stream entries {self._xlen(self.keys.chunks(request_id))}; rq job {job.get_status()} "
                f"(enqueued {job.enqueued_at:%H:%M:%S.%f}), "
                f"worker {job.worker_name}, in the started registry {job.id in queue.started_job_registry}, "
                f"in the intermediate queue {self.client.lpos(queue.intermediate_queue_key, job.id) is not None}; "
                f"held by {held or 'no runner'}")

    def drained(self) -> bool:
        ledger, last = self.ledger, self.samples[-1]
        waiting = [rid for rid, source in ledger.sent.items()
                   if not ledger.results.get(rid) and POISON_STATUS.get(source.removeprefix("poison: "), "") is not None]
        return (not waiting and ledger.bad_ids <= set(ledger.dead) and last["pending: workers"] == 0
                and last["pending: runner calls"] == 0 and last["pending: rq queued"] == 0
                and last["pending: rq taken, not started"] == 0)


KEY_KINDS = ("chunk streams", "result lookups", "done markers", "id claims", "call claims", "rq", "runner calls",
             "other")


def key_kind(key: str) -> str:
    for marker, kind in ((":chunks:", "chunk streams"), (":result:", "result lookups"), (":done:", "done markers"),
                         (":owner:", "id claims"), (":cancel:", "call claims"), (":calls:", "runner calls")):
        if marker in key:
            return kind
    return "rq" if key.startswith("rq:") else "other"


def account(soak: Soak) -> tuple[list[str], list[str]]:
    """The accounting table's rows, by source, and every problem found (none: all accounted for)."""
    ledger, problems = soak.ledger, []
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    errors: dict[str, set[str]] = defaultdict(set)
    for rid, source in ledger.sent.items():
        records, counts = ledger.results.get(rid, []), rows[source]
        counts["sent"] += 1
        counts["no result" if not records else records[0]["status"]] += 1
        counts["more than one result"] += len(records) > 1
        counts["usage events != results"] += ledger.usage[rid] != len(records)
        dead = rid.encode() in ledger.dead or b"\xff\xfe-" + rid.encode() in ledger.dead
        counts["dead-lettered"] += dead
        errors[source].update(str((record.get("error") or {}).get("type")) for record in records
                              if record["status"] != "completed")
        kind = source.removeprefix("poison: ")
        expected = POISON_STATUS.get(kind, "")
        if expected is None and records:
            problems.append(f"{rid}: a result for a request id that is not one")
        elif source.startswith("poison") and records and records[0]["status"] != expected:
            problems.append(f"{rid}: ended {records[0]['status']}, not {expected}")
        elif expected is not None and not records:
            where = f"; {soak.whereabouts(rid)}" if source.startswith("call") else ""
            problems.append(f"{rid} ({source}): no result{where}")
        if source.startswith("poison") and not dead:
            problems.append(f"{rid}: not dead-lettered")
        if len(records) > 1:
            problems.append(f"{rid} ({source}): {len(records)} results")
        if ledger.usage[rid] != len(records):
            problems.append(f"{rid} ({source}): {ledger.usage[rid]} usage events for {len(records)} results")
    strangers = set(ledger.results) - set(ledger.sent)
    problems += [f"{rid}: a result for a request never sent" for rid in sorted(strangers)]
    last = soak.samples[-1]
    for name in ("pending: workers", "pending: runner calls", "pending: rq queued", "pending: rq taken, not started"):
        if last[name]:
            problems.append(f"{name} at the end: {last[name]:.0f}")
    problems += [f"{name} exited unasked at {t:.0f} s with status {status}" for t, name, status in soak.unasked]
    columns = ("sent", "completed", "failed", "incomplete", "no result", "more than one result",
               "usage events != results", "dead-lettered")
    table = ["| source | " + " | ".join(columns) + " | error types |", "| --- |" + " ---: |" * len(columns) + " --- |"]
    total: Counter[str] = Counter()
    for source in sorted(rows, key=lambda s: (s.startswith("poison"), s)):
        total.update(rows[source])
        table.append(f"| {source} | " + " | ".join(f"{rows[source][c]:,}" for c in columns)
                     + f" | {', '.join(sorted(errors[source])) or '-'} |")
    table.append("| **all** | " + " | ".join(f"**{total[c]:,}**" for c in columns) + " | |")
    return table, problems


def flatness(samples: list[dict[str, float]], load_end: float, warmup: float) -> list[str]:
    """Per series: the median of the first minute, of the first minute after the warm-up and of the last
    minute of load, and the least-squares slope per minute after the warm-up."""
    load = [s for s in samples if s["t_s"] <= load_end]
    windows = ([s for s in load if s["t_s"] < 60], [s for s in load if warmup <= s["t_s"] < warmup + 60],
               [s for s in load if s["t_s"] >= load_end - 60])
    steady = [s for s in load if s["t_s"] >= warmup]
    rows = [f"| series | first minute | minute after the warm-up ({warmup:.0f} s) | last minute "
            "| slope after the warm-up, per minute |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in [key for key in samples[0] if key not in ("t_s", "sent", "results")]:
        medians = [statistics.median(s[name] for s in window) if window else float("nan") for window in windows]
        slope = float("nan")
        if len(steady) > 2 and len({s[name] for s in steady}) > 1:
            slope = statistics.linear_regression([s["t_s"] for s in steady], [s[name] for s in steady]).slope * 60
        rows.append(f"| {name} | " + " | ".join(f"{m:,.1f}" for m in medians) + f" | {slope:+,.2f} |")
    return rows


def plot(soak: Soak, path: Path, load_end: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = soak.samples
    minutes = [s["t_s"] / 60 for s in samples]
    panels = [("Redis used_memory, MB", ["used_memory_mb"]),
              ("keys by kind", [f"keys: {kind}" for kind in KEY_KINDS] + ["dbsize"]),
              ("pending", [key for key in samples[0] if key.startswith("pending: ")]),
              ("process RSS, MB", [key for key in samples[0] if key.startswith("rss MB: ")])]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 11), sharex=True)
    for axis, (title, names) in zip(axes, panels):
        for name in names:
            axis.plot(minutes, [s[name] for s in samples], label=name.removeprefix("keys: ").removeprefix("rss MB: "),
                      linewidth=1.2)
        for t, victim in soak.kills:
            axis.axvline(t / 60, color="tab:red" if victim.startswith("worker") else "tab:blue", alpha=0.25,
                         linewidth=0.8)
        axis.axvline(load_end / 60, color="black", linestyle="--", linewidth=0.8)
        axis.set_title(title, fontsize=10, loc="left")
        axis.legend(fontsize=7, ncol=4, loc="best")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes (thin lines: SIGKILL of a worker, red, or a runner, blue; dashed: load stops)")
    args = soak.args
    figure.suptitle(f"soak: {args.rate:g} requests/s, {args.workers} workers, {args.runners} runners, "
                    f"a kill every {args.kill_every:g} s, poison every {args.poison_every:g} s", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_csv(samples: list[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)


def run(soak: Soak) -> None:
    """The load for ``--minutes``, kills and poison included; then wait for everything to drain."""
    args = soak.args
    load_end = args.minutes * 60
    due = {"send": 0.0, "poison": args.poison_every, "kill": args.kill_every, "sample": 0.0}
    poisons = 0
    soak.started = time.monotonic()
    while (now := soak.elapsed()) < load_end:
        if now >= due["send"]:
            soak.send()
            due["send"] = max(due["send"] + 1 / args.rate, now - 1)  # behind by more than a second: skip ahead
        if now >= due["poison"]:
            soak.poison(poisons)
            poisons += 1
            due["poison"] += args.poison_every
        if now >= due["kill"]:
            soak.kill()
            due["kill"] += args.kill_every
        if now >= due["sample"]:
            observe(soak)
            due["sample"] += args.sample_every
        time.sleep(max(0.0, min(due.values()) - soak.elapsed()))
    deadline = load_end + args.drain_timeout
    while True:
        observe(soak)
        if soak.drained() or soak.elapsed() > deadline:
            break
        time.sleep(args.sample_every)
    time.sleep(2 * args.sample_every)  # a result published twice would show up late
    observe(soak)


def observe(soak: Soak) -> None:
    soak.restart_the_exited()
    soak.read_outputs()
    soak.sample()
    row = soak.samples[-1]
    print(f"  {row['t_s']:6.0f} s  sent {row['sent']:,.0f}  results {row['results']:,.0f}  "
          f"used_memory {row['used_memory_mb']:.1f} MB  keys {row['dbsize']:,.0f}  "
          f"pending {row['pending: workers']:.0f} / {row['pending: runner calls']:.0f} / "
          f"{row['pending: rq queued']:.0f}  kills {len(soak.kills)}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests a second, calls and direct (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="python -m worker run processes (default 2)")
    parser.add_argument("--runners", type=int, default=2, help="python -m producer work processes (default 2)")
    parser.add_argument("--kill-every", type=float, default=30.0, metavar="S",
                        help="SIGKILL a random worker or runner every S seconds and restart it (default 30)")
    parser.add_argument("--poison-every", type=float, default=10.0, metavar="S",
                        help="publish one poisoned request every S seconds (default 10)")
    parser.add_argument("--direct", type=float, default=0.2, metavar="FRACTION",
                        help="share of the requests published straight to Redis, not called (default 0.2)")
    parser.add_argument("--latency-ms", type=int, default=50, help="mock upstream delay before each chunk (default 50)")
    parser.add_argument("--retention", type=int, default=60, metavar="S",
                        help="seconds results, usage, dead letters and finished chunks are kept (default 60)")
    parser.add_argument("--sample-every", type=float, default=5.0, metavar="S", help="seconds between samples")
    parser.add_argument("--drain-timeout", type=float, default=300.0, metavar="S",
                        help="longest wait for everything to drain once the load stops (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random choices (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.png",
                        help="the plot (PNG); the samples go beside it as .csv (default docs/soak.png)")
    args = parser.parse_args()
    load_end = args.minutes * 60
    warmup = min(3.0 * args.retention, load_end / 2)
    # SIGTERM ends the run as Ctrl-C does: through Soak.__exit__, which stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    with Soak(args) as soak:
        print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the start")
        print(f"logs: {soak.logs}, Redis: {soak.url}, namespace and queue: {soak.namespace}", file=sys.stderr)
        run(soak)
        table, problems = account(soak)
    write_csv(soak.samples, args.out.with_suffix(".csv"))
    plot(soak, args.out, load_end)
    print(f"\n{args.minutes:g} min at {args.rate:g} requests/s, {args.workers} workers, {args.runners} runners, "
          f"retention {args.retention} s; drained {soak.samples[-1]['t_s'] - load_end:.0f} s after the load stopped")
    killed = Counter(name.split("-")[0] for _, name in soak.kills)
    print(f"SIGKILLs: {len(soak.kills)} ({killed['worker']} of a worker, {killed['runner']} of a runner), "
          f"exits nobody caused: {len(soak.unasked)}\n")
    print("\n".join(flatness(soak.samples, load_end, warmup)))
    print()
    print("\n".join(table))
    print(f"\nsamples: {args.out.with_suffix('.csv')}, plot: {args.out}")
    if problems:
        print(f"\n{len(problems)} unaccounted for:", *problems[:50], sep="\n  ")
        return 1
    print("\nevery request accounted for")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
