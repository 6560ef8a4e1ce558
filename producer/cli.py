"""``python -m producer``: enqueue LLM calls and run their rq worker, look up and follow results, read usage
events, replay captures, run a mock upstream.

Arguments are parsed here and handed to the library; settings are read once, from ``STREAMFOLD_*``. Every
error ends the command with one line on stderr and an exit status that tells its kind (``streamfold.cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis

from producer.analytics import GROUP_BYS, format_table, parse_duration, summarize
from producer.publisher import Publisher
from producer.replay import replay
from producer.results import (UsageReader, follow_results, get_result, stored_usage,
                              wait_for_result)
from streamfold import cli
from streamfold.connection import connect
from streamfold.contract import MODES
from streamfold.errors import ConfigError, StreamfoldError
from streamfold.logs import LOG_FORMATS
from streamfold.settings import Settings, load_settings

PROG = "python -m producer"
# How long replay waits out a Redis behind Sentinel that cannot serve: a failover takes a few seconds.
FAILOVER_PATIENCE = 30.0
Command = Callable[[argparse.Namespace, Settings], int]

_CONNECTION = ("redis_url", "redis_cluster", "redis_sentinels", "redis_sentinel_service", "namespace", "shards",
               "socket_timeout")
_READING = (*_CONNECTION, "block_ms", "read_count")
_ENQUEUING = (*_CONNECTION, "queue_redis_url", "queue", "job_timeout")
_PUBLISHING = (*_CONNECTION, "stream_max_age")
_GATEWAY = (*_ENQUEUING, "block_ms", "read_count", "gateway_host", "gateway_port", "gateway_keys", "gateway_link_ttl",
            "result_ttl", "shutdown_grace", "metrics_port", "log_format")
_WORKING = (*_ENQUEUING, "runner_concurrency", "runner_lease", "runner_reruns", "runner_flush_ms", "runner_batch",
            "runner_buffer_bytes", "shutdown_grace", "upstream_connect_timeout", "upstream_read_timeout",
            "upstream_retries", "upstream_backoff", "upstream_backoff_max", "cancel_ttl", "stream_max_age",
            "metrics_port", "log_format")


MOCK_UPSTREAM_HELP = textwrap.fill(
    "Serve the recorded streams in fixtures/ as an OpenAI-compatible upstream, to test the upstream path "
    "without any LLM. POST /v1/chat/completions with \"stream\": true answers as OpenAI does: one "
    "`data: <chunk>` event per line of the fixture named by the request's model (a *.jsonl file stem), byte "
    "for byte, then `data: [DONE]`. GET /v1/models lists the fixtures. Request headers or query parameters "
    "inject the failures real upstreams show (below).", width=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mock-upstream"]:
        return cli.run(PROG, lambda: _mock_upstream(argv[1:]), quiet_interrupt=True)
    args = cli.parse(build_parser(), argv)
    command: Command = args.command
    return cli.run(PROG, lambda: command(args, load_settings()), debug=args.debug, quiet_interrupt=args.follows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=("Streamfold producer tools: LLM calls through rq, results, usage events, replays, "
                                "a mock upstream."),
        epilog=cli.exit_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    result = _command(commands, "result", _result, _CONNECTION, "print one request's result record",
                      "Print one request's result record as a JSON line. Exit status: 0 completed, 1 failed or "
                      "incomplete (the record is printed all the same), or no result (yet).")
    result.add_argument("request_id", metavar="REQUEST_ID")
    result.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait up to SECONDS for the result to be published (woken by pub/sub, no polling)")

    live = _command(commands, "follow", _follow, _READING, "follow a request live, as it streams",
                    "Print a request's content as it streams - only the content, on stdout, so that what is "
                    "printed is exactly the final content - with reasoning, tool calls (once complete) and how it "
                    "ended on stderr. Works while the request streams, after it finished, and resumes after a "
                    "dropped connection with --after. Exit status: 0 completed, 1 failed or incomplete, 3 when a "
                    "retried upstream call replaced text already printed.")
    live.add_argument("request_id", metavar="REQUEST_ID")
    live.add_argument("--after", metavar="TOKEN", help="continue after the event with this resume token (see --json)")
    live.add_argument("--json", action="store_true", help="print every event as a JSON line, each with its token")
    live.add_argument("--wait", type=float, metavar="SECONDS",
                      help="give up (exit 1) if the request has not started within SECONDS (default: wait)")

    results = _command(commands, "results", _results, _READING, "print result records as they are published",
                       "Print result records from every shard's results stream, one JSON line each: with "
                       "--from-start every record still stored, with --follow each new one as it is published.")
    _reading_options(results, what="result")

    usage = _command(commands, "usage", _usage, _READING, "print usage events through a consumer group",
                     "Print usage events as JSON lines through a consumer group of their own; each event is "
                     "acknowledged after it is printed, and a restart first re-delivers what was not. With "
                     "--summary, print token totals, error shares and latency percentiles of the stored events "
                     "instead, read without a group.")
    _reading_options(usage, what="event")
    usage.add_argument("--group", default="analytics", metavar="NAME",
                       help="consumer group: every group sees every event once (default: analytics)")
    usage.add_argument("--consumer", default="reader", metavar="NAME",
                       help="consumer name within the group; keep it stable across restarts (default: reader)")
    usage.add_argument("--summary", action="store_true", help="summarise the stored events per group key")
    usage.add_argument("--by", choices=GROUP_BYS, help="summary per model (default), meta tenant or status")
    usage.add_argument("--since", type=_duration, metavar="DURATION",
                       help="summarise the events published in the last DURATION: 30s, 15m, 2h, 7d")
    usage.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    usage.add_argument("--otel", action="store_true",
                       help="record each event as OpenTelemetry GenAI client metrics and export them over OTLP "
                            "(OTEL_EXPORTER_OTLP_ENDPOINT...) instead of printing it; needs the otel extra")

    play = _command(commands, "replay", _replay, _PUBLISHING, "push captured streams as new requests",
                    "Push captured streams (JSON Lines or SSE text) as new requests, exactly as a producer "
                    "would, and print one request id per line in input order.")
    play.add_argument("files", nargs="+", metavar="FILE", help="a capture file; - reads one from stdin")
    play.add_argument("--copies", type=_positive(int), default=1, metavar="N", help="requests per file (default: 1)")
    play.add_argument("--rate", type=_positive(float), metavar="CHUNKS_PER_S",
                      help="pace pushes at this many chunks per second overall (default: as fast as possible)")
    play.add_argument("--mode", choices=MODES, default="auto", help="output mode told to workers (default: auto)")
    play.add_argument("--open", type=_positive(int), default=1, metavar="N", dest="open_at_once",
                      help="stream N requests at once, their chunks interleaved as concurrent calls arrive "
                           "(default: 1, one request after another)")
    play.add_argument("--patience", type=float, metavar="SECONDS",
                      help="how long to wait out a Redis that cannot serve (a failover), pushing a request hit by "
                           f"it again (default: {FAILOVER_PATIENCE:g} with STREAMFOLD_REDIS_SENTINELS, else 0); "
                           "with --open above 1 the replay stops at once instead")

    enqueue = _command(commands, "enqueue", _enqueue, _ENQUEUING, "enqueue a chat completion as an rq job",
                       "Enqueue one streamed chat completion for a job runner (`python -m producer work` or "
                       "`rq worker`) and print its request id; with --wait, print its result record instead and "
                       "exit 0 when it completed, 1 when it failed or ended incomplete. Upstreams are named in "
                       "STREAMFOLD_UPSTREAMS.")
    enqueue.add_argument("--model", required=True, metavar="MODEL")
    enqueue.add_argument("--message", required=True, action="append", metavar="TEXT",
                         help="a user message; repeat for several")
    enqueue.add_argument("--upstream", default="default", metavar="NAME", help="upstream to call (default: default)")
    enqueue.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the result")

    stop = _command(commands, "cancel", _cancel, _ENQUEUING + ("cancel_ttl",), "cancel an enqueued call",
                    "Cancel a call enqueued through rq (enqueue, the gateway or enqueue_chat_completion): one that "
                    "has not started ends failed at once, one that is running stops within about 100 ms, "
                    "wherever it waits; either way its result says failed, error type cancelled, exactly once. Exit status: 0 "
                    "when it is being (or already was) cancelled, 1 when there is no such call or it had already "
                    "finished.")
    stop.add_argument("request_id", metavar="REQUEST_ID")

    work = _command(commands, "work", _work, _WORKING, "run a call runner: many upstream calls per process",
                    "Run a call runner on the STREAMFOLD_QUEUE queue: it takes the jobs enqueued there and runs up "
                    "to --concurrency upstream calls at once on one event loop, calling the upstreams named in "
                    "STREAMFOLD_UPSTREAMS with API keys read from the environment variables they name, and pushes "
                    "what they stream. It is one rq worker to rq (rq info lists it; job states stay true). Calls "
                    "of a runner that dies are re-run by a live one after STREAMFOLD_RUNNER_LEASE. SIGTERM "
                    "drains: no new jobs, calls in flight finish for up to STREAMFOLD_SHUTDOWN_GRACE seconds, the "
                    "rest are handed back; a second signal hands back at once. `rq worker --url URL QUEUE` runs "
                    "the same jobs one call per process.")
    work.add_argument("--concurrency", type=int, metavar="N",
                      help="calls held at once (default: STREAMFOLD_RUNNER_CONCURRENCY, 256)")
    work.add_argument("--burst", action="store_true", help="stop once the queue is empty and no call is in flight")
    work.add_argument("--name", metavar="NAME", help="runner and rq worker name (default: host-pid-random)")
    work.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: STREAMFOLD_METRICS_PORT)")
    work.add_argument("--log-format", choices=LOG_FORMATS,
                      help="text or json, one event per line (default: STREAMFOLD_LOG_FORMAT, text)")
    work.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="log level (default: INFO)")

    gateway = _command(commands, "serve", _serve, _GATEWAY, "run the HTTP gateway (OpenAI-compatible, live streams)",
                       "Serve POST /v1/chat/completions (enqueued through rq; streamed back as chat.completion.chunks "
                       "relayed from the request's chunk stream, or answered with the assembled chat.completion), "
                       "GET /v1/requests/{id}/stream (resumes after Last-Event-ID), GET and DELETE /v1/requests/{id}, "
                       "and a live page at /requests/{id}. Clients authenticate with STREAMFOLD_GATEWAY_KEYS; without "
                       "keys the gateway serves loopback only. SIGTERM drains for STREAMFOLD_SHUTDOWN_GRACE seconds.")
    gateway.add_argument("--host", metavar="HOST", help="address to listen on (default: STREAMFOLD_GATEWAY_HOST)")
    gateway.add_argument("--port", type=int, metavar="PORT", help="port to listen on (default: STREAMFOLD_GATEWAY_PORT)")
    gateway.add_argument("--metrics-port", type=int, metavar="PORT",
                         help="serve Prometheus metrics on this port (default: STREAMFOLD_METRICS_PORT; off when unset)")
    gateway.add_argument("--log-format", choices=["text", "json"], help="default: STREAMFOLD_LOG_FORMAT")
    gateway.add_argument("--probe", action="store_true",
                         help="do not serve: ask the gateway at --host/--port for /healthz and exit 0 when it is "
                              "healthy, 1 when not (for container probes)")

    runners = _command(commands, "runners", _runners, _CONNECTION + ("runner_lease",),
                       "show the call runners, or check that one is live",
                       "Show every call runner from Redis (read-only): its lease (live, or expired: its calls "
                       "wait for a live runner to take them over), calls held, concurrency, calls done, chunks and "
                       "re-runs. With --check, exit 0 when a runner holds a live lease and no expired one holds "
                       "calls, 1 otherwise, printing the reason: a probe for containers.")
    runners.add_argument("--json", action="store_true", help="print one JSON object")
    runners.add_argument("--check", action="store_true", help="exit 0 if served, 1 if not (one line says why)")

    commands.add_parser("mock-upstream", add_help=False,
                        help="serve an OpenAI-compatible mock upstream (see: mock-upstream --help)")
    return parser


def _command(commands: Any, name: str, run: Command, settings: Sequence[str], summary: str,
             description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, 100),
        epilog=cli.settings_help(settings), formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[cli.debug_flag()])
    parser.set_defaults(command=run, follows=False, parser=parser)
    return parser


def _reading_options(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument("--follow", action="store_true", dest="follows",
                        help=f"keep waiting for new {what}s (Ctrl-C stops)")
    parser.add_argument("--from-start", action="store_true",
                        help=f"begin with the oldest {what} still stored rather than the next new one")


# --- commands -------------------------------------------------------------------------------------------

def _result(args: argparse.Namespace, settings: Settings) -> int:
    with connect(settings) as client:
        if args.wait is None:
            record = get_result(client, settings.keys, args.request_id)
        else:
            record = wait_for_result(args.request_id, args.wait, client=client, settings=settings)
    if record is None:
        return _fail(f"no result for {args.request_id}", cli.NO)
    _emit(record)
    return _status(record)


def _follow(args: argparse.Namespace, settings: Settings) -> int:
    from producer.follow import follow
    from producer.terminal import show_events
    try:
        events = follow(args.request_id, after=args.after, wait=args.wait, settings=settings)
        return show_events(events, sys.stdout, sys.stderr, as_json=args.json)
    except ValueError as exc:  # a resume token that is not one
        raise ConfigError(str(exc)) from None


def _results(args: argparse.Namespace, settings: Settings) -> int:
    with connect(settings) as client:
        for record in follow_results(client, settings.keys, from_start=args.from_start, follow=args.follows,
                                     block_ms=settings.block_ms, count=settings.read_count):
            _emit(record)
    return 0


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.summary:
        return _usage_summary(args, settings)
    if args.by or args.since or args.json:
        raise ConfigError("--by, --since and --json go with --summary")
    handle: Callable[[dict[str, Any]], None] = _emit
    provider = None
    if args.otel:
        try:
            from producer.otel import UsageMetrics, otlp_meter
        except ImportError as exc:
            raise ConfigError(f"--otel needs the otel extra: pip install 'streamfold[otel]' ({exc.name} is missing)")
        meter, provider = otlp_meter()
        handle = UsageMetrics(meter).record
    try:
        with connect(settings) as client:
            reader = UsageReader(client, settings.keys, group=args.group, consumer=args.consumer,
                                 from_start=args.from_start, count=settings.read_count)
            existing = reader.create_groups()
            if args.from_start and existing:
                print(f"warning: consumer group {args.group!r} exists already and keeps its place: --from-start "
                      "only places a new group. Name a new --group, or delete this one first "
                      f"(redis-cli XGROUP DESTROY {existing[0]} {args.group})", file=sys.stderr)
            reader.consume(handle, follow=args.follows, block_ms=settings.block_ms)
    finally:
        if provider is not None:
            provider.shutdown()  # the last readings are exported before the process ends
    return 0


def _usage_summary(args: argparse.Namespace, settings: Settings) -> int:
    if args.follows:
        raise ConfigError("--summary reads the events stored now; it cannot --follow")
    since_ms = None if args.since is None else time.time_ns() // 1_000_000 - args.since
    with connect(settings) as client:
        summary = summarize(stored_usage(client, settings.keys, since_ms=since_ms, count=settings.read_count),
                            by=args.by or "model")
    if args.json:
        _emit(summary.to_json())
    else:
        sys.stdout.write(format_table(summary))
        sys.stdout.flush()
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    with connect(settings) as client, Publisher(client, settings.keys, max_age=settings.stream_max_age) as publisher:
        patience = args.patience if args.patience is not None else FAILOVER_PATIENCE if settings.redis_sentinels else 0
        request_ids = replay(publisher, args.files, copies=args.copies, rate=args.rate, mode=args.mode,
                             patience=patience, open_at_once=args.open_at_once)
    sys.stdout.write("".join(f"{request_id}\n" for request_id in request_ids))
    sys.stdout.flush()
    return 0


def _enqueue(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: rq and aiohttp load only for the commands that need them.
    from producer.jobs import enqueue_chat_completion
    params = {"model": args.model, "messages": [{"role": "user", "content": text} for text in args.message]}
    with connect(settings) as client:
        request_id = enqueue_chat_completion(params, upstream=args.upstream, client=client, settings=settings)
        if args.wait is None:
            print(request_id, flush=True)
            return 0
        record = wait_for_result(request_id, args.wait, client=client, settings=settings)
    _emit(record)
    return _status(record)


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from producer.jobs import cancel
    if cancel(args.request_id, settings=settings):
        print(f"cancelled: {args.request_id}", flush=True)
        return cli.OK
    return _fail(f"nothing to cancel: no call {args.request_id} is waiting or running", cli.NO)


def _work(args: argparse.Namespace, settings: Settings) -> int:
    from producer.work import run_worker
    return run_worker(settings, burst=args.burst, name=args.name, concurrency=args.concurrency,
                      metrics_port=args.metrics_port, log_format=args.log_format, log_level=args.log_level)


def _runners(args: argparse.Namespace, settings: Settings) -> int:
    from producer.runner import view
    with connect(settings) as client:
        report = view.collect(client, settings)
    if args.check:
        healthy, reason = view.check(report)
        print(f"{'healthy' if healthy else 'unhealthy'}: {reason}", file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    if args.json:
        _emit(report)
    else:
        sys.stdout.write(view.render(report))
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from producer.gateway import probe, serve
    if args.probe:
        healthy, reason = probe(args.host or settings.gateway_host, args.port or settings.gateway_port)
        print(f"{'healthy' if healthy else 'unhealthy'}: {reason}", file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    return serve(host=args.host, port=args.port, metrics_port=args.metrics_port, log_format=args.log_format)


def _mock_upstream(argv: Sequence[str]) -> int:
    # Imported only here: the other commands do not need the HTTP server.
    from producer import mock_upstream

    parser = argparse.ArgumentParser(prog=f"{PROG} mock-upstream", description=MOCK_UPSTREAM_HELP)
    mock_upstream.add_arguments(parser)
    return mock_upstream.run(parser.parse_args(argv))


# --- plumbing -------------------------------------------------------------------------------------------

def _emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once so a pipe sees each record as it comes."""
    out = sys.stdout.buffer
    out.write(orjson.dumps(record) + b"\n")
    out.flush()


def _status(record: dict[str, Any]) -> int:
    """A command's exit status for a request's result: it completed, or not."""
    return cli.OK if record.get("status") == "completed" else cli.NO


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: Callable[[str], int | float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse
