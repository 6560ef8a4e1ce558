"""Microseconds per chunk: Streamfold's Assembler beside the orjson floor and the peer accumulators.

Run by hand (``make bench`` installs the peers first)::

    python bench/assembler.py [--repeats N] [--baseline REVISION] [--dialects chat,anthropic,responses,gemini]

Every contender folds the same chunks, raw JSON bytes exactly as a producer pushes them: the recorded and
seed streams of ``fixtures/`` plus long synthetic streams built from recorded chunks. Each row pays for
turning those bytes into its own natural input, so the rows compare whole paths from bytes to a final
completion. All rows are timed in one run, interleaved pass by pass; on a shared, noisy machine the ratios
of one run are what count. For chat chunks a second table checks each peer's result against Streamfold's on
known fault cases, and ``--baseline`` adds the Assembler as it was at a git revision, to measure a change
before and after in one run. Each native dialect (Anthropic Messages, OpenAI Responses, Gemini) gets its
own table beside its SDK's accumulator, where there is one. Peers that are not installed are reported as
such; the contenders are in ``assembler_contenders.py``.
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

from assembler_contenders import (Contender, Stream, baseline, completion_outcome, contenders,
                                  native_contenders, streamfold)

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "fixtures" / "recorded"
SEEDS = ROOT / "fixtures" / "seeds"

# --- the corpus ----------------------------------------------------------------------------------------


def load(path: Path) -> Stream:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def fixture(name: str) -> Stream:
    return load(RECORDED / name if (RECORDED / name).exists() else SEEDS / name)


WORDS = ("the", "stream", "of", "a", "chunk", "is", "folded", "into", "one", "completion", "and", "every",
         "worker", "reads", "its", "request", "in", "order", "Redis", "keeps", "café", "naïve", "東京",
         "数据", "🙂", "\"quoted\"", "(aside)", "x = 1;", "\\path", "tab\there")


def text_pieces(pieces: int, seed: int = 7) -> list[str]:
    """``pieces`` short pieces of an answer: words with spaces, full stops and paragraph breaks."""
    rng = random.Random(seed)
    return [("\n\n" if number % 97 == 96 else " ") + rng.choice(WORDS) + ("." if number % 13 == 12 else "")
            for number in range(pieces)]


def argument_pieces(index: int, pieces: int, rng: random.Random) -> list[str]:
    """A tool call's JSON arguments (an order of eight items) cut into ``pieces`` fragments at random points."""
    items = [{"sku": f"SKU-{rng.randrange(10**6):06d}", "qty": rng.randrange(1, 9), "note": "gift wrap, «fragile»"}
             for _ in range(8)]
    arguments = orjson.dumps({"customer": f"c-{index}", "items": items, "express": index == 1}).decode()
    arguments = arguments.replace('":', '": ').replace(',"', ', "')
    cuts = sorted(rng.sample(range(1, len(arguments)), pieces - 1))
    return [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)])]


def long_text_stream(pieces: int, seed: int = 7) -> Stream:
    """A plain text answer of ``pieces`` content chunks, built on the chunks of a recorded OpenAI stream."""
    template = [orjson.loads(line) for line in fixture("openai_n3_multiple_choices.jsonl")]
    first = [c for c in template if c["choices"] and c["choices"][0]["index"] == 0]
    role, text, finish = first[0], first[1], next(c for c in first if c["choices"][0]["finish_reason"])
    usage = template[-1]
    chunks = [role, *(_with_delta(text, {"content": piece}) for piece in text_pieces(pieces, seed)), finish, usage]
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
        parts = argument_pieces(index, pieces_per_call, rng)
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


# --- native dialects' corpus ----------------------------------------------------------------------------

NATIVE = ROOT / "fixtures" / "native"


def native_events(dialect: str, name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in load(NATIVE / dialect / name)]


def anthropic_streams(pieces: int, pieces_per_call: int, seed: int = 13) -> dict[str, Stream]:
    """A long text answer and two long tool calls, on the events of a recorded Anthropic stream."""
    events = native_events("anthropic", "anthropic_parallel_tool_use.jsonl")
    start, stop = events[0], {"type": "message_stop"}

    def block(index: int, content: dict[str, Any], kind: str, key: str, parts: list[str]) -> list[dict[str, Any]]:
        return [{"type": "content_block_start", "index": index, "content_block": content},
                *({"type": "content_block_delta", "index": index, "delta": {"type": kind, key: part}}
                  for part in parts),
                {"type": "content_block_stop", "index": index}]

    def end(reason: str, output: int) -> list[dict[str, Any]]:
        return [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
                 "usage": {"output_tokens": output}}, stop]

    text = [start, *block(0, {"type": "text", "text": ""}, "text_delta", "text", text_pieces(pieces, seed)),
            *end("end_turn", pieces)]
    rng = random.Random(seed)
    tools = [start]
    for index in (0, 1):
        content = {"type": "tool_use", "id": f"toolu_{rng.randrange(16**20):020x}", "name": "place_order", "input": {}}
        tools += block(index, content, "input_json_delta", "partial_json", argument_pieces(index, pieces_per_call, rng))
    tools += end("tool_use", 2 * pieces_per_call)
    return {"anthropic_text_2000": [orjson.dumps(event) for event in text],
            "anthropic_tools_2x200": [orjson.dumps(event) for event in tools]}


def responses_streams(pieces: int, pieces_per_call: int, seed: int = 17) -> dict[str, Stream]:
    """A long text answer and two long function calls, on the events of a recorded Responses stream."""
    events = native_events("responses", "responses_text_then_function_call_phase.jsonl")
    created, in_progress, completed = events[0], events[1], events[-1]
    message, text_delta, call, arguments_delta = events[4]["item"], events[6], events[22]["item"], events[23]
    ids = random.Random(seed)

    def stream(items: list[tuple[dict[str, Any], list[dict[str, Any]]]], final: list[dict[str, Any]]) -> Stream:
        out = [created, in_progress]
        for output_index, (item, body) in enumerate(items):
            out.append({"type": "response.output_item.added", "item": item, "output_index": output_index})
            out += [{**event, "output_index": output_index} for event in body]
        out.append({**completed, "response": {**completed["response"], "output": final}})
        return [orjson.dumps({**event, "sequence_number": number}) for number, event in enumerate(out)]

    parts = text_pieces(pieces, seed)
    whole = "".join(parts)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    done = {**message, "status": "completed", "content": [{**part, "text": whole}]}
    body = [{"type": "response.content_part.added", "content_index": 0, "item_id": message["id"], "part": part},
            *({**text_delta, "delta": piece} for piece in parts),
            {"type": "response.output_text.done", "content_index": 0, "item_id": message["id"], "text": whole},
            {"type": "response.content_part.done", "content_index": 0, "item_id": message["id"],
             "part": done["content"][0]},
            {"type": "response.output_item.done", "item": done}]
    text = stream([(message, body)], [done])
    rng, calls = random.Random(seed), []
    for index in (0, 1):
        opened = {**call, "id": f"fc_{ids.randrange(16**20):020x}", "call_id": f"call_{ids.randrange(16**20):020x}"}
        parts = argument_pieces(index, pieces_per_call, rng)
        finished = {**opened, "status": "completed", "arguments": "".join(parts)}
        calls.append((opened, [*({**arguments_delta, "item_id": opened["id"], "delta": piece} for piece in parts),
                               {"type": "response.function_call_arguments.done", "item_id": opened["id"],
                                "arguments": finished["arguments"]},
                               {"type": "response.output_item.done", "item": finished}]))
    tools = stream(calls, [events[-1]["response"]["output"][0], *(body[-1]["item"] for _, body in calls)])
    return {"responses_text_2000": text, "responses_tools_2x200": tools}


def gemini_streams(pieces: int, fragments: int, seed: int = 19) -> dict[str, Stream]:
    """A long text answer with usage on every chunk, and a Vertex call whose arguments stream in fragments."""
    chunks = native_events("gemini", "gemini_thinking_final_empty_part_signature.jsonl")
    template = chunks[2]
    candidate, usage = template["candidates"][0], template["usageMetadata"]

    def chunk(parts: list[dict[str, Any]], number: int, finish: str | None = None) -> dict[str, Any]:
        out = {**candidate, "content": {"parts": parts, "role": "model"}}
        if finish:
            out["finishReason"] = finish
        counts = {**usage, "candidatesTokenCount": number + 1, "totalTokenCount": usage["totalTokenCount"] + number}
        return {**template, "candidates": [out], "usageMetadata": counts}

    text = [chunk([{"text": piece}], number) for number, piece in enumerate(text_pieces(pieces, seed))]
    text[-1]["candidates"][0]["finishReason"] = "STOP"
    note = text_pieces(fragments, seed)
    vertex = [chunk([{"functionCall": {"name": "place_order", "willContinue": True}}], 0)]
    vertex += [chunk([{"functionCall": {"partialArgs": [{"jsonPath": "$.note", "stringValue": piece,
                                                         "willContinue": True}], "willContinue": True}}], number)
               for number, piece in enumerate(note, 1)]
    vertex.append(chunk([{"functionCall": {"partialArgs": [{"jsonPath": "$.qty", "numberValue": 3}]}}], fragments + 1))
    vertex.append(chunk([{"functionCall": {}}], fragments + 2, "STOP"))
    return {"gemini_text_2000": [orjson.dumps(item) for item in text],
            "vertex_partial_args_200": [orjson.dumps(item) for item in vertex]}


def native_corpus(dialect: str) -> dict[str, Stream]:
    """Every recorded stream of the dialect, plus its long synthetic streams."""
    fixtures = {path.stem: load(path) for path in sorted((NATIVE / dialect).glob("*.jsonl"))}
    long = {"anthropic": lambda: anthropic_streams(2000, 200), "responses": lambda: responses_streams(2000, 200),
            "gemini": lambda: gemini_streams(2000, 200)}[dialect]()
    return {**fixtures, **long}


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
    for package in ("orjson", "openai", "anthropic", "litellm", "langchain-core", "pydantic"):
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
    parser.add_argument("--baseline", metavar="REVISION",
                        help="also time the Assembler as it was at this git revision, beside today's (chat table)")
    parser.add_argument("--dialects", default="chat,anthropic,responses,gemini",
                        help="comma-separated tables to run (default: all four)")
    args = parser.parse_args(argv)
    # The peers' pydantic models warn about provider fields they do not model; a warning is not a result.
    warnings.simplefilter("ignore")
    dialects = args.dialects.split(",")
    print("\n".join(machine()))
    print(f"best of {args.repeats} interleaved passes, perf_counter_ns, GC on and collected before each pass")
    if "chat" in dialects:
        chat_tables(args.repeats, args.baseline)
    native = [dialect for dialect in ("anthropic", "responses", "gemini") if dialect in dialects]
    if native:
        native_tables(native, args.repeats)
    return 0


def timed_corpus(rows: list[Contender], parts: dict[str, dict[str, Stream]]) -> tuple[dict[str, list[Stream]],
                                                                                      dict[str, list[str]]]:
    """The streams every row can fold, by part, and those left out with what each row raised on them."""
    every = {name: stream for part in parts.values() for name, stream in part.items()}
    left_out: dict[str, list[str]] = {}
    for row in rows:
        for name, error in failures(row, every).items():
            left_out.setdefault(name, []).append(f"{row.name}: {error}")
    return {part: [stream for name, stream in streams.items() if name not in left_out]
            for part, streams in parts.items()}, left_out


def chat_tables(repeats: int, revision: str | None) -> None:
    rows, missing = contenders()
    if revision:
        rows.insert(2, baseline(revision))
    timed, left_out = timed_corpus(rows, corpus())
    counts = {part: sum(len(stream) for stream in streams) for part, streams in timed.items()}
    total = sum(counts.values())

    times = {part: best_times(rows, streams, repeats) for part, streams in timed.items()}
    overall = [sum(times[part][position] for part in times) for position in range(len(rows))]
    cases = fault_cases()
    checks = correctness(rows, cases)
    floor, ours = overall[0], overall[1]

    print(f"\n## chat.completion.chunk\n\ncorpus: {total} chunks in {sum(len(s) for s in timed.values())} streams "
          + ", ".join(f"{part} {counts[part]}" for part in timed))
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
    if revision:
        print(f"before/after: Streamfold at {revision} {overall[2] / floor:.2f}x the floor, today "
              f"{ours / floor:.2f}x; today's time ÷ then: {ours / overall[2]:.3f} (overall), "
              + ", ".join(f"{part} {times[part][1] / times[part][2]:.3f}" for part in timed))
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


def native_tables(dialects: list[str], repeats: int) -> None:
    """Per dialect: every contender's µs per event; then one summary row per dialect and the goals."""
    summary = []
    for dialect in dialects:
        rows, note = native_contenders(dialect)
        timed, left_out = timed_corpus(rows, {"all": native_corpus(dialect)})
        streams = timed["all"]
        total = sum(len(stream) for stream in streams)
        times = best_times(rows, streams, repeats)
        floor, ours = times[0], times[1]
        print(f"\n## {dialect}\n\ncorpus: {total} events in {len(streams)} streams (every fixture in "
              f"fixtures/native/{dialect}/ and two long synthetic streams)")
        for name, errors in left_out.items():
            print(f"left out of the timing for every row, as a contender raised on it: {name} ({'; '.join(errors)})")
        if note:
            print(f"no SDK row: {note}")
        print()
        print(markdown(["contender", "µs/event", "events/s", "time ÷ floor", "time ÷ Streamfold"],
                       [[row.name, f"{time / total / 1000:.2f}", f"{total / time * 1e9:,.0f}", f"{time / floor:.2f}x",
                         f"{time / ours:.2f}x"] for row, time in zip(rows, times)]))
        for row in rows:
            print(f"- {row.name}: {row.includes}")
        for row, time in [*zip(rows[2:], times[2:])] or [(None, None)]:
            summary.append([dialect, f"{total}", f"{floor / total / 1000:.2f}", f"{ours / total / 1000:.2f}",
                            f"{ours / floor:.2f}x", "-" if row is None else row.name,
                            "-" if time is None else f"{time / total / 1000:.2f}",
                            "-" if time is None else f"{time / ours:.1f}x"])
    print("\n## native dialects, side by side\n")
    print(markdown(["dialect", "events", "floor µs/event", "Streamfold µs/event", "Streamfold ÷ floor",
                    "SDK row", "SDK µs/event", "SDK ÷ Streamfold"], summary))
    within = sorted({row[0] for row in summary if float(row[4][:-1]) > 2.5})
    slow = [f"{row[0]} ({row[5]})" for row in summary if row[7] != "-" and float(row[7][:-1]) < 20]
    print(f"goal: within 2.5x of the floor: {'met' if not within else 'NOT met for ' + ', '.join(within)}")
    unmeasured = [row[0] for row in summary if row[7] == "-"]
    print(f"goal: at least 20x faster than the SDK: {'met' if not slow else 'NOT met for ' + ', '.join(slow)}"
          + (f" (no SDK to measure for {', '.join(unmeasured)})" if unmeasured else ""))


if __name__ == "__main__":
    sys.exit(main())
