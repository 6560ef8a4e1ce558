"""``python -m worker``: parse arguments and call the library; no logic lives here."""

from __future__ import annotations

import argparse
import os
import shlex
import textwrap
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import orjson

from streamfold import cli
from streamfold.acl import ROLES, setuser
from streamfold.capture import read_capture
from streamfold.connection import connect
from streamfold.contract import FORMATS, MODES, ResultRecord
from streamfold.errors import ConfigError, RedisUnavailable, StreamfoldError
from streamfold.logs import LOG_FORMATS
from streamfold.settings import load_settings
from worker import health, runner, stats
from worker.capture_streams import CaptureStreams

STATS_HELP = """\
Read the pool's state from Redis (nothing is written) in two samples --interval seconds apart:
backlog (requests no worker has claimed, and the oldest one's age), requests in flight, arrival and
finish rates, every worker and consumer with its pending entries, idle time and state (live, quiet,
dead), the results, usage and dead-letter stream lengths, and a recommended worker count:

    slots   = max(arrivals/s x W, in_flight) + backlog x min(1, W / D)
    workers = ceil(slots / C)

C is the concurrency of a worker, W the mean time a request holds a slot (claim to finish), both from
the live workers' stats records, and D is --drain. slots is how many requests must be held at once:
enough to keep up with arrivals (Little's law) and never fewer than are held now, plus what starts the
backlog within D. Before any request has finished W is unknown and the live worker count stands (at
least 1 while work waits). Exit status: 0, or 2 for bad settings, 4 when Redis cannot be reached, 5 when
it refuses (see python -m worker --help).
"""

ACL_HELP = """\
Print the ACL SETUSER line that gives a Redis user exactly what one role needs, for the namespace of
STREAMFOLD_NAMESPACE, on one line that redis-cli reads from stdin:

    python -m worker acl --role worker --password-env WORKER_PASSWORD | redis-cli

    producer    writes requests (ns:in:*) and takes and reports rq jobs (rq:*); cannot read results or usage
    worker      reads and acknowledges ns:in:*, writes ns:out:* and ns:usage:*, publishes result notices
    backend     enqueues, cancels, follows and reads requests (ns:in:*, rq:*; ns:out:* read only), the gateway
    analytics   reads usage events (ns:usage:*) through consumer groups; nothing else

Then connect each process as its user: redis://USER:PASSWORD@host:6379/0, or STREAMFOLD_REDIS_USERNAME and
STREAMFOLD_REDIS_PASSWORD. Needs Redis 7 (read-only key patterns and selectors).
"""

PROG = "python -m worker"
_CONNECTION = ("redis_url", "redis_cluster", "redis_sentinels", "redis_sentinel_service", "namespace", "shards",
               "socket_timeout")

MODES_HELP = ("auto: incremental unless the stream is unmistakably cumulative; incremental: each chunk "
              "carries new text; cumulative: each chunk repeats the whole text so far (qwen-mt "
              "non-incremental output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "Streamfold worker: assemble streamed chat completions into finished results."),
        epilog=cli.exit_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = _adder(commands)

    assemble = add(
        "assemble", help="assemble captured streams and print one result record per stream",
        description=("Read captured streams - JSON Lines (one chunk per line), SSE text such as `curl -N` "
                     "prints, or chunks an SDK printed (print(chunk): ChatCompletionChunk(id=..., ...), on one "
                     "line or several; parsed, never evaluated) - and print one result record per stream, one "
                     "JSON object per line. A file whose chunks carry several ids holds several streams, even "
                     "interleaved: each id gets its own record (FILE#1, FILE#2, ... in first-seen order); a "
                     "chunk without an id stays with the stream before it. The stream may be OpenAI-compatible "
                     "chat chunks, Anthropic Messages events, OpenAI Responses events or Gemini chunks, told by "
                     "its first chunk unless --format names one. Needs no Redis. Exits 1 if a file cannot be "
                     "read or holds a chunk that cannot be assembled; the error names the file and the line."))
    assemble.add_argument("files", nargs="+", metavar="FILE", help="a captured stream; - reads stdin")
    assemble.add_argument("--mode", choices=MODES, default="auto",
                          help=MODES_HELP)
    assemble.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                          help="the stream's dialect: chat (chat.completion.chunk), anthropic (Messages events), "
                               "responses (OpenAI Responses events), gemini (GenerateContentResponse chunks); "
                               "auto: told by the first chunk (default)")
    assemble.add_argument("--single", action="store_true",
                          help="each file is one stream: a chunk id that differs from the first is an error "
                               "naming its line (exit 1), instead of a record per id")
    assemble.set_defaults(handler=run_assemble)

    run = add(
        "run", help="serve requests from Redis until stopped", epilog=cli.settings_help(runner.WORKER_SETTINGS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Claim requests from the control streams, assemble each from its chunk stream, and publish "
                     "exactly one result record and usage event per request. SIGTERM or SIGINT drains: no new "
                     "claims, in-flight requests finish for up to STREAMFOLD_SHUTDOWN_GRACE seconds, the rest "
                     "are handed back to other workers; a second signal hands back at once. Exits 0; 5 at "
                     "start when Redis refuses the credentials or database (see python -m worker --help).", 100))
    run.add_argument("--concurrency", type=int, metavar="N",
                     help="requests assembled at once (default: STREAMFOLD_CONCURRENCY)")
    run.add_argument("--burst", action="store_true",
                     help="exit 0 once nothing is claimable and nothing is in flight")
    run.add_argument("--name", help=("consumer name in the group; a restart under the same name resumes its own "
                                     "claims at once (default: host-pid-random)"))
    run.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: STREAMFOLD_METRICS_PORT; "
                          "off when neither is set)")
    run.add_argument("--log-format", choices=LOG_FORMATS,
                     help="text: a readable line per event; json: one object per line, for log pipelines "
                          "(default: STREAMFOLD_LOG_FORMAT, text)")
    run.set_defaults(handler=run_worker)

    show = add(
        "stats", help="show backlog, in-flight requests, workers and a recommended worker count",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=STATS_HELP,
        epilog=cli.settings_help((*_CONNECTION, "group", "claim_timeout", "concurrency")))
    show.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    show.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                      help="seconds between the two samples the rates come from; 0 takes one, without rates "
                           "(default: 1; longer gives steadier rates)")
    show.add_argument("--drain", type=float, default=60.0, metavar="SECONDS",
                      help="D in the formula: the time in which the recommended workers clear the backlog "
                           "(default: 60)")
    show.set_defaults(handler=run_stats)

    probe = add(
        "health", help="exit 0 if the pool is being served, 1 if not, 2 on a configuration error",
        description=textwrap.fill("For container probes; read-only, usually well under a second. Healthy when Redis answers, the "
                     "worker group exists on every shard, and the pool is served: a worker's stats record is "
                     "fresh (refreshed every 2 s) or a consumer without one touched Redis within the claim "
                     "timeout - or, with none live, no "
                     "request has waited unclaimed longer than that and none is held by a consumer that stopped. "
                     "Prints one line, the reason: on stdout when healthy, on stderr when not.", 100),
        epilog=cli.settings_help(("redis_url", "namespace", "shards", "group", "claim_timeout")),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    probe.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                       help="Redis connect and socket timeout (default: 2)")
    probe.set_defaults(handler=run_health)

    acl = add(
        "acl", help="print the ACL SETUSER line of a role (producer, worker, backend, analytics)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=ACL_HELP)
    acl.add_argument("--role", required=True, choices=ROLES, help="what the user does (see above)")
    acl.add_argument("--user", metavar="NAME", help="the ACL user (default: <namespace>-<role>)")
    acl.add_argument("--password-env", metavar="VAR",
                     help="switch the user on with the password in environment variable VAR, given to Redis as its "
                          "SHA-256 (default: the user stays off until it gets a password)")
    acl.set_defaults(handler=run_acl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse(build_parser(), argv)
    return cli.run(PROG, lambda: int(args.handler(args)), debug=args.debug)


def _adder(commands: Any) -> Callable[..., argparse.ArgumentParser]:
    """``commands.add_parser`` for a command that takes --debug and answers a bad flag with its own usage."""
    def add(name: str, **options: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, parents=[cli.debug_flag()], **options)
        parser.set_defaults(parser=parser)
        return parser
    return add


def run_worker(args: argparse.Namespace) -> int:
    return runner.serve(concurrency=args.concurrency, burst=args.burst, name=args.name,
                        metrics_port=args.metrics_port, log_format=args.log_format)


def run_stats(args: argparse.Namespace) -> int:
    if args.interval < 0 or args.drain <= 0:
        raise ConfigError("--interval must be >= 0 and --drain > 0")
    settings = load_settings()
    with connect(settings) as client:
        report = stats.collect(client, settings, interval=args.interval, drain_s=args.drain)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report) + b"\n")
        sys.stdout.flush()
    else:
        print(stats.render_table(report))
    return 0


def run_health(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        client = connect(settings.model_copy(update={"socket_timeout": args.timeout}))
    except StreamfoldError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 2
    try:
        healthy, reason = health.check(client, settings)
    finally:
        client.close()
    print(f"{'healthy' if healthy else 'unhealthy'}: {reason}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def run_acl(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        password = None
        if args.password_env is not None:
            password = os.environ.get(args.password_env)
            if not password:
                raise ConfigError(f"environment variable {args.password_env} is not set")
    except StreamfoldError as exc:
        print(f"{PROG} acl: {exc}", file=sys.stderr)
        return cli.USAGE
    line = setuser(args.role, settings.keys, user=args.user, password=password)
    print(shlex.join(["ACL", "SETUSER", *line]))
    if password is None:
        print("worker acl: the user stays off until it has a password: add --password-env VAR", file=sys.stderr)
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    failed = False
    format = None if args.format == "auto" else args.format
    for name in args.files:
        try:
            records = _assemble_file(name, CaptureStreams(args.mode, format, single=args.single))
            lines = b"".join(orjson.dumps(record) + b"\n" for record in records)
        except (OSError, StreamfoldError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed = True
            continue
        except orjson.JSONEncodeError as exc:  # a chunk nested deeper than JSON encoders write
            print(f"{name}: the result cannot be written as JSON: {exc}", file=sys.stderr)
            failed = True
            continue
        sys.stdout.buffer.write(lines)
        sys.stdout.flush()
    return 1 if failed else 0


def _assemble_file(name: str, streams: CaptureStreams) -> list[ResultRecord]:
    stream: BinaryIO = sys.stdin.buffer if name == "-" else open(name, "rb")
    with stream:
        for item in read_capture(stream):
            streams.feed(item)
    return streams.results(name)
