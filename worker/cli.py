"""``python -m worker``: parse arguments and call the library; no logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

import orjson

from streamfold.capture import read_capture
from streamfold.errors import StreamfoldError
from worker import runner
from worker.assembler import Assembler

MODES_HELP = ("auto: incremental unless the stream is unmistakably cumulative; incremental: each chunk "
              "carries new text; cumulative: each chunk repeats the whole text so far (qwen-mt "
              "non-incremental output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=(
        "Streamfold worker: assemble streamed chat completions into finished results."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    assemble = commands.add_parser(
        "assemble", help="assemble captured streams and print one result record per file",
        description=("Read captured streams - JSON Lines (one chunk per line) or SSE text such as `curl -N` "
                     "prints - and print one result record per file, one JSON object per line. Needs no "
                     "Redis. Exits 1 if a file cannot be read or holds a chunk that cannot be assembled; "
                     "the error names the file and the chunk's position."))
    assemble.add_argument("files", nargs="+", metavar="FILE", help="a captured stream; - reads stdin")
    assemble.add_argument("--mode", choices=["auto", "incremental", "cumulative"], default="auto",
                          help=MODES_HELP)
    assemble.set_defaults(handler=run_assemble)

    run = commands.add_parser(
        "run", help="serve requests from Redis until stopped", epilog=runner.settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Claim requests from the control streams, assemble each from its chunk stream, and publish "
                     "exactly one result record and usage event per request. SIGTERM or SIGINT drains: no new "
                     "claims, in-flight requests finish for up to STREAMFOLD_SHUTDOWN_GRACE seconds, the rest "
                     "are handed back to other workers; a second signal hands back at once. Exits 0."))
    run.add_argument("--concurrency", type=int, metavar="N",
                     help="requests assembled at once (default: STREAMFOLD_CONCURRENCY)")
    run.add_argument("--burst", action="store_true",
                     help="exit 0 once nothing is claimable and nothing is in flight")
    run.add_argument("--name", help=("consumer name in the group; a restart under the same name resumes its own "
                                     "claims at once (default: host-pid-random)"))
    run.set_defaults(handler=run_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return code


def run_worker(args: argparse.Namespace) -> int:
    try:
        return runner.serve(concurrency=args.concurrency, burst=args.burst, name=args.name)
    except StreamfoldError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2


def run_assemble(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        try:
            record = _assemble_file(name, args.mode)
        except (OSError, StreamfoldError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed = True
            continue
        sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
        sys.stdout.flush()
    return 1 if failed else 0


def _assemble_file(name: str, mode: Any) -> dict[str, Any]:
    assembler = Assembler(mode)
    stream: BinaryIO = sys.stdin.buffer if name == "-" else open(name, "rb")
    with stream:
        for item in read_capture(stream):
            if item.kind == "chunk":
                assembler.feed(item.data)
            elif item.kind == "error":
                assembler.fail(_error_payload(item.data))
    return dict(assembler.result(request_id=name, meta={"source": name}))


def _error_payload(data: bytes) -> dict[str, Any] | str:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")
    return payload if isinstance(payload, dict) else str(payload)
