"""Microseconds per chunk: Streamfold's Assembler beside the orjson floor and three peer accumulators.

Run by hand (``make bench`` installs the peers first)::

    python bench/assembler.py [--repeats N]

Every contender folds the same chunks, raw JSON bytes exactly as a producer pushes them: the recorded and
seed streams of ``fixtures/`` plus long synthetic streams built from recorded chunks. Each row pays for
turning those bytes into its own natural input, so the rows compare whole paths from bytes to a final
completion. All rows are timed in one run, interleaved pass by pass; on a shared, noisy machine the ratios
of one run are what count. A second table checks each peer's result against Streamfold's on known fault
cases. Peers that are not installed are reported as such; the contenders are in ``assembler_contenders.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from assembler_contenders import Contender, Stream, completion_outcome, contenders, streamfold

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "fixtures" / "recorded"
SEEDS = ROOT / "fixtures" / "seeds"

# --- the corpus ----------------------------------------------------------------------------------------


def load(path: Path) -> Stream:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def fixture(name: str) -> Stream:
    return load(RECORDED / name if (RECORDED / name).exists() else SEEDS / name)


def long_text_stream(pieces: int, seed: int = 7) -> Stream:
    """A plain text answer of ``pieces`` content chunks, built on the chunks of a recorded OpenAI stream."""
    template = [orjson.loads(line) for line in fixture("openai_n3_multiple_choices.jsonl")]
    first = [c for c in template if c["choices"] and c["choices"][0]["index"] == 0]
    role, text, finish = first[0], first[1], next(c for c in first if c["choices"][0]["finish_reason"])
    usage = template[-1]
    words = ("the", "stream", "of", "a", "chunk", "is", "folded", "into", "one", "completion", "and", "every",
             "worker", "reads", "its", "request", "in", "order", "Redis", "keeps", "café", "naïve", "東京",
             "数据", "🙂", "\"quoted\"", "(aside)", "x = 1;", "\\path", "tab\there")
    rng = random.Random(seed)
    chunks = [role]
    for number in range(pieces):
        piece = rng.choice(words)
        piece = ("\n\n" if number % 97 == 96 else " ") + piece + ("." if number % 13 == 12 else "")
        chunks.append(_with_delta(text, {"content": piece}))
    chunks += [finish, usage]
    return [orjson.dumps(chunk) for chunk in chunks]


def long_tool_call_stream(pieces_per_call: int, seed: int = 11) -> Stream:
    """Two parallel tool calls whose arguments arrive in ``pieces_per_call`` fragments each."""
    template = [orjson.loads(line) for line in fixture("openai_parallel_tool_calls.jsonl")]
    role, opening = template[0], template[1]
    fragment = template[2]
    finish, usage = template[-2], template[-1]
    rng = random.Random(seed)
    chunks = [role]
    for index in (0, 1):
        items = [{"sku": f"SKU-{rng.randrange(10**6):06d}", "qty": rng.randrange(1, 9), "note": "gift wrap, «fragile»"}
                for _ in range(8)]
        arguments = orjson.dumps({"customer": f"c-{index}", "items": items, "express": index == 1}).decode()
        arguments = arguments.replace('":', '": ').replace(',"', ', "')
        cuts = sorted(rng.sample(range(1, len(arguments)), pieces_per_call - 1))
        parts = [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)])]
        call = opening["choices"][0]["delta"]["tool_calls"][0]
        opened = {**call, "index": index, "id": f"call_{index}{rng.randrange(16**20):020x}",
                  "function": {"name": "place_order", "arguments": ""}}
        chunks.append(_with_delta(opening, {"tool_calls": [opened]}))
        for part in parts:
            chunks.append(_with_delta(fragment, {"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
    chunks += [finish, usage]
    return [orjson.dumps(chunk) for chunk in chunks]


def _with_delta(template: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    choice = {**template["choices"][0], "delta": delta}
    return {**template, "choices": [choice]}


def corpus() -> dict[str, dict[str, Stream]]:
    """The timed streams, in three parts: every fixture, one long text answer, two long tool calls."""
    fixtures = {path.stem: load(path) for folder in (RECORDED, SEEDS) for path in sorted(folder.glob("*.jsonl"))}
    return {"fixtures": fixtures,
            "long text": {"text_2000": long_text_stream(2000)},
            "long tool calls": {"tools_2x200": long_tool_call_stream(200)}}


def fault_cases() -> dict[str, Stream]:
    """Streams on which some accumulators are known to go wrong; Streamfold's result is the reference."""
    parallel = fixture("openai_parallel_tool_calls.jsonl")
    return {
        "parallel tool calls": parallel,
        "parallel calls reusing index 0": _rewrite_calls(parallel, lambda call, first: {**call, "index": 0}),
        "id and name repeated on every fragment": _rewrite_calls(parallel, lambda call, first: {
            **first, **call, "function": {**first["function"], **call["function"]}}),
        "tool call without index": fixture("mistral_tool_call_no_index.jsonl"),
        "id \"\" and type repeated on fragments": fixture("alibaba_qwen3max_tool_call.jsonl"),
        "n=3 choices interleaved": fixture("openai_n3_multiple_choices.jsonl"),
        "cumulative usage on every chunk": fixture("perplexity_cumulative_usage_every_chunk.jsonl"),
        "total_tokens != prompt + completion": fixture("xai_grok_reasoning_tool_call.jsonl"),
        "finish chunk sent twice": fixture("qwen_mt_flash_incremental.jsonl"),
        "cumulative content (qwen-mt-plus)": fixture("qwen_mt_plus_cumulative.jsonl"),
        "stream cut before finish_reason": fixture("alibaba_qwen3max_reasoning.jsonl")[:150],
    }


def _rewrite_calls(stream: Stream, rewrite: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> Stream:
    """The stream with each tool-call fragment rewritten, given the first fragment of the same call."""
    first: dict[int, dict[str, Any]] = {}
    out = []
    for line in stream:
        chunk = orjson.loads(line)
        for choice in chunk["choices"]:
            calls = choice["delta"].get("tool_calls")
            if calls:
                for call in calls:
                    first.setdefault(call["index"], call)
                choice["delta"]["tool_calls"] = [rewrite(call, first[call["index"]]) for call in calls]
        out.append(orjson.dumps(chunk))
    return out


# --- measuring -------------------------------------------------------------------------------------------


def failures(contender: Contender, streams: dict[str, Stream]) -> dict[str, str]:
    """The streams a contender cannot fold at all, with the exception it raised."""
    failed = {}
    for name, stream in streams.items():
        try:
            contender.fold(stream)
        except Exception as exc:  # noqa: BLE001 - any exception is a failure to report, not to crash on
            message = str(exc).splitlines()[0][:50] if str(exc) else ""
            failed[name] = f"{type(exc).__name__}: {message}".rstrip(" ;:") if message else type(exc).__name__
    return failed


def best_times(rows: list[Contender], streams: list[Stream], repeats: int) -> list[int]:
    """Best of ``repeats`` passes over ``streams`` per contender, in ns; passes interleave the contenders."""
    for row in rows:
        for stream in streams:
            row.fold(stream)
    best = [sys.maxsize] * len(rows)
    for _ in range(repeats):
        for position, row in enumerate(rows):
            gc.collect()
            start = time.perf_counter_ns()
            for stream in streams:
                row.fold(stream)
            best[position] = min(best[position], time.perf_counter_ns() - start)
    return best


def correctness(rows: list[Contender], cases: dict[str, Stream]) -> dict[str, dict[str, str]]:
    """Per case and contender: ok, wrong (differs from Streamfold), or the exception raised."""
    reference = {case: completion_outcome(streamfold(stream)["completion"]) for case, stream in cases.items()}
    table: dict[str, dict[str, str]] = {}
    for case, stream in cases.items():
        table[case] = {}
        for row in rows:
            if row.outcome is None:
                continue
            try:
                got = row.outcome(row.fold(stream))
            except Exception as exc:  # noqa: BLE001
                table[case][row.name] = f"error ({type(exc).__name__})"
                continue
            table[case][row.name] = "ok" if got == reference[case] else "wrong"
    return table


# --- reporting -------------------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for package in ("orjson", "openai", "litellm", "langchain-core", "pydantic"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return [f"machine: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}",
            f"python: {platform.python_implementation()} {platform.python_version()}",
            "packages: " + ", ".join(versions)]


def markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    lines = [header, ["-" * width for width in widths], *body]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per contender; the best counts")
    args = parser.parse_args(argv)
    # The peers' pydantic models warn about provider fields they do not model; a warning is not a result.
    warnings.simplefilter("ignore")

    rows, missing = contenders()
    parts = corpus()
    every = {name: stream for part in parts.values() for name, stream in part.items()}
    left_out: dict[str, list[str]] = {}
    for row in rows:
        for name, error in failures(row, every).items():
            left_out.setdefault(name, []).append(f"{row.name}: {error}")
    timed = {part: [stream for name, stream in streams.items() if name not in left_out]
             for part, streams in parts.items()}
    counts = {part: sum(len(stream) for stream in streams) for part, streams in timed.items()}
    total = sum(counts.values())

    times = {part: best_times(rows, streams, args.repeats) for part, streams in timed.items()}
    overall = [sum(times[part][position] for part in times) for position in range(len(rows))]
    cases = fault_cases()
    checks = correctness(rows, cases)
    floor, ours = overall[0], overall[1]

    print("\n".join(machine()))
    print(f"corpus: {total} chunks timed in {sum(len(s) for s in timed.values())} streams "
          + ", ".join(f"{part} {counts[part]}" for part in timed)
          + f"; best of {args.repeats} interleaved passes, perf_counter_ns, GC on and collected before each pass")
    for name, errors in left_out.items():
        print(f"left out of the timing for every row, as a contender raised on it: {name} ({'; '.join(errors)})")
    for name in missing:
        print(f"{name}: not installed")
    print()
    body = []
    for position, row in enumerate(rows):
        per_chunk = overall[position] / total / 1000
        score = [result for result in (checks[case].get(row.name) for case in cases) if result is not None]
        correct = "reference" if position == 1 else f"{score.count('ok')}/{len(score)}" if score else "-"
        body.append([row.name, f"{per_chunk:.2f}", f"{1e6 / per_chunk:,.0f}", f"{overall[position] / floor:.2f}x",
                     f"{overall[position] / ours:.2f}x", correct])
    print(markdown(["contender", "µs/chunk", "chunks/s", "time ÷ floor", "time ÷ Streamfold",
                    "fault cases right"], body))
    print()
    print(markdown(["contender", *(f"µs/chunk: {part} ({counts[part]})" for part in timed)],
                   [[row.name, *(f"{times[part][position] / counts[part] / 1000:.2f}" for part in timed)]
                    for position, row in enumerate(rows)]))
    print()
    print("what each row includes:")
    for row in rows:
        print(f"- {row.name}: {row.includes}")
    print()
    peers = [row.name for row in rows[2:]]
    if peers:
        print(markdown(["fault case (vs Streamfold's result)", *peers],
                       [[case, *(checks[case][peer] for peer in peers)] for case in cases]))
        print("compared: per choice content, finish_reason and tool calls (id, name, arguments); usage token counts.")
        print()
    within = ours / floor
    print(f"goal: Streamfold within 2x of the orjson floor: {'met' if within <= 2 else 'NOT met'} ({within:.2f}x)")
    goal = "goal: Streamfold at least 50x faster than the OpenAI SDK accumulator"
    sdk = [position for position, row in enumerate(rows) if row.name.startswith("OpenAI SDK")]
    if sdk:
        faster = overall[sdk[0]] / ours
        print(f"{goal}: {'met' if faster >= 50 else 'NOT met'} ({faster:.1f}x with validated chunks; "
              f"{overall[sdk[1]] / ours:.1f}x with chunks as its client builds them)")
    else:
        print(f"{goal}: not measured (openai not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
