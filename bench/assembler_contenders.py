"""The contenders of bench/assembler.py: the orjson floor, Streamfold, and the peer accumulators.

Each folds one stream of raw chunk bytes into its final result, paying for turning the bytes into its own
natural input; each chat peer also says how to read the facts the correctness table compares out of its
result. ``baseline`` loads Streamfold's Assembler as it was at a git revision, so a change is measured
before and after in one run; ``native_contenders`` are the rows of each native dialect's table.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from worker import Assembler

ROOT = Path(__file__).resolve().parent.parent

Stream = list[bytes]
# (index, content, finish_reason, ((id, name, arguments), ...)) per choice, and (prompt, completion, total).
Outcome = tuple[tuple[tuple[int, str, str | None, tuple[tuple[str, str, str], ...]], ...], tuple[Any, ...] | None]

@dataclass(frozen=True)
class Contender:
    name: str
    includes: str  # what the time of one chunk pays for
    fold: Callable[[Stream], Any]  # one whole stream, bytes in, final result out
    outcome: Callable[[Any], Outcome] | None = None  # for the correctness table; None for the floor


def orjson_floor(stream: Stream) -> None:
    loads = orjson.loads
    for raw in stream:
        loads(raw)


def streamfold(stream: Stream) -> Any:
    assembler = Assembler()
    for raw in stream:
        assembler.feed(raw)
    return assembler.result()


def baseline(revision: str) -> Contender:
    """Streamfold's Assembler at a git revision, imported beside the current one (same streamfold package)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "worker"], check=True,
                             capture_output=True).stdout
    current = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "worker"}
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        for name in current:
            del sys.modules[name]
        sys.path.insert(0, folder)
        try:
            old = importlib.import_module("worker.assembler").Assembler
        finally:
            sys.path.remove(folder)
            for name in [name for name in sys.modules if name.split(".")[0] == "worker"]:
                del sys.modules[name]
            sys.modules.update(current)

    def fold(stream: Stream) -> Any:
        assembler = old()
        for raw in stream:
            assembler.feed(raw)
        return assembler.result()

    return Contender(f"Streamfold Assembler at {revision}", "the same, as the code was at that revision", fold,
                     lambda record: completion_outcome(record["completion"]))


def completion_outcome(completion: dict[str, Any]) -> Outcome:
    """The facts compared between contenders: per choice text, finish_reason and tool calls; usage counts."""
    choices = []
    for choice in sorted(completion.get("choices") or (), key=lambda c: c.get("index") or 0):
        message = choice.get("message") or {}
        calls = tuple((call.get("id") or "", (call.get("function") or {}).get("name") or "",
                       (call.get("function") or {}).get("arguments") or "")
                      for call in message.get("tool_calls") or ())
        choices.append((choice.get("index") or 0, message.get("content") or "", choice.get("finish_reason"), calls))
    usage = completion.get("usage")
    counts = None if not usage else (usage.get("prompt_tokens"), usage.get("completion_tokens"),
                                     usage.get("total_tokens"))
    return tuple(choices), counts


def openai_sdk() -> list[Contender]:
    """The SDK's accumulator, fed chunks built two ways: the cheapest, and the way its own client builds them."""
    from openai._models import construct_type
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    def validated(stream: Stream) -> Any:
        state: Any = ChatCompletionStreamState()
        for raw in stream:
            state.handle_chunk(ChatCompletionChunk.model_validate(orjson.loads(raw)))
        return state.get_final_completion()

    def as_client_builds(stream: Stream) -> Any:
        state: Any = ChatCompletionStreamState()
        for raw in stream:
            # What the client's stream does with each event (after json.loads): construct_type, no validation.
            state.handle_chunk(construct_type(type_=ChatCompletionChunk, value=orjson.loads(raw)))
        return state.get_final_completion()

    def outcome(final: Any) -> Outcome:
        return completion_outcome(final.model_dump())

    return [Contender("OpenAI SDK ChatCompletionStreamState",
                      "orjson.loads + ChatCompletionChunk.model_validate + handle_chunk per chunk; "
                      "get_final_completion per stream", validated, outcome),
            Contender("OpenAI SDK, chunks as its client builds them",
                      "the same with construct_type in place of model_validate, as "
                      "client.chat.completions.create(stream=True) builds each chunk", as_client_builds, outcome)]


def litellm_builder() -> list[Contender]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the import would fetch it otherwise
    import litellm

    litellm.suppress_debug_info = True

    def fold(stream: Stream) -> Any:
        return litellm.stream_chunk_builder([orjson.loads(raw) for raw in stream])

    return [Contender("LiteLLM stream_chunk_builder",
                      "orjson.loads to dicts (the cheapest input it takes) + stream_chunk_builder(chunks) per stream",
                      fold, lambda final: completion_outcome(final.model_dump()))]


def langchain_merge() -> list[Contender]:
    from langchain_core.messages import AIMessageChunk
    from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
    from langchain_core.messages.tool import tool_call_chunk

    def usage_metadata(usage: dict[str, Any]) -> UsageMetadata:
        """Usage as langchain-openai reads it from a chunk."""
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        inputs = InputTokenDetails()
        if (audio := prompt_details.get("audio_tokens")) is not None:
            inputs["audio"] = audio
        if (cached := prompt_details.get("cached_tokens")) is not None:
            inputs["cache_read"] = cached
        outputs = OutputTokenDetails()
        if (audio := completion_details.get("audio_tokens")) is not None:
            outputs["audio"] = audio
        if (reasoning := completion_details.get("reasoning_tokens")) is not None:
            outputs["reasoning"] = reasoning
        return UsageMetadata(input_tokens=prompt, output_tokens=completion,
                             total_tokens=usage.get("total_tokens") or prompt + completion,
                             input_token_details=inputs, output_token_details=outputs)

    def to_message_chunk(chunk: dict[str, Any]) -> Any:
        """One chunk as langchain-openai turns it into a message chunk (generation info in its metadata)."""
        usage = chunk.get("usage")
        metadata = usage_metadata(usage) if usage else None
        choices = chunk.get("choices") or []
        if not choices:
            return AIMessageChunk(content="", usage_metadata=metadata)
        choice = choices[0]
        delta = choice.get("delta")
        if delta is None:
            return None
        calls = []
        if raw_calls := delta.get("tool_calls"):
            try:
                calls = [tool_call_chunk(name=call["function"].get("name"), args=call["function"].get("arguments"),
                                         id=call.get("id"), index=call["index"]) for call in raw_calls]
            except KeyError:  # langchain-openai drops a chunk's tool calls when one has no index
                calls = []
        response_metadata: dict[str, Any] = {"model_provider": "openai"}
        if finish_reason := choice.get("finish_reason"):
            response_metadata["finish_reason"] = finish_reason
            if model := chunk.get("model"):
                response_metadata["model_name"] = model
        if logprobs := choice.get("logprobs"):
            response_metadata["logprobs"] = logprobs
        return AIMessageChunk(content=delta.get("content") or "", tool_call_chunks=calls,
                              usage_metadata=metadata, response_metadata=response_metadata)

    def fold(stream: Stream) -> Any:
        message = None
        for raw in stream:
            chunk = to_message_chunk(orjson.loads(raw))
            if chunk is not None:
                message = chunk if message is None else message + chunk
        return message

    def outcome(message: Any) -> Outcome:
        calls = tuple((call.get("id") or "", call.get("name") or "", call.get("args") or "")
                      for call in message.tool_call_chunks)
        content = message.content if isinstance(message.content, str) else repr(message.content)
        usage = message.usage_metadata
        counts = None if not usage else (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])
        return ((0, content, message.response_metadata.get("finish_reason"), calls),), counts

    return [Contender("LangChain AIMessageChunk +",
                      "orjson.loads to dicts + AIMessageChunk per chunk as langchain-openai converts it + `+`",
                      fold, outcome)]


def contenders() -> tuple[list[Contender], list[str]]:
    found = [Contender("orjson.loads floor", "orjson.loads of each chunk, nothing else", orjson_floor),
             Contender("Streamfold Assembler", "Assembler().feed(bytes) per chunk + .result() per stream",
                       streamfold, lambda record: completion_outcome(record["completion"]))]
    missing = []
    for name, make in (("OpenAI SDK (openai)", openai_sdk), ("LiteLLM (litellm)", litellm_builder),
                       ("LangChain (langchain-core)", langchain_merge)):
        try:
            found += make()
        except ImportError:
            missing.append(name)
    return found, missing


# --- native dialects --------------------------------------------------------------------------------------


def native_contenders(dialect: str) -> tuple[list[Contender], str | None]:
    """The floor, Streamfold with the dialect named, and the dialect's SDK accumulator (or why there is none)."""

    def fold(stream: Stream) -> Any:
        assembler = Assembler(format=dialect)  # type: ignore[arg-type]
        for raw in stream:
            assembler.feed(raw)
        return assembler.result()

    rows = [Contender("orjson.loads floor", "orjson.loads of each event, nothing else", orjson_floor),
            Contender("Streamfold Assembler", f"Assembler(format={dialect!r}).feed(bytes) per event + .result() "
                      "per stream", fold)]
    try:
        if dialect == "anthropic":
            rows += anthropic_sdk()
        elif dialect == "responses":
            rows.append(responses_sdk())
        else:
            return rows, "google-genai has no stream accumulator: its stream yields each chunk as it is"
    except ImportError as exc:
        return rows, f"not installed ({exc.name})"
    return rows, None


def anthropic_sdk() -> list[Contender]:
    """The SDK's accumulator alone, and the whole per-event path of its MessageStream helper."""
    from anthropic._models import construct_type
    from anthropic.lib.streaming._messages import accumulate_event, build_events
    from anthropic.types import RawMessageStreamEvent

    def accumulator(stream: Stream) -> Any:
        snapshot, json_bufs = None, {}
        for raw in stream:
            event = construct_type(type_=RawMessageStreamEvent, value=orjson.loads(raw))
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
        return snapshot

    def message_stream(stream: Stream) -> Any:
        snapshot, json_bufs = None, {}
        for raw in stream:
            data = orjson.loads(raw)
            if data.get("type") == "ping":  # its Stream drops pings before they are built
                continue
            event = construct_type(type_=RawMessageStreamEvent, value=data)
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
            build_events(event=event, message_snapshot=snapshot)
        return snapshot

    return [Contender("Anthropic SDK accumulate_event", "orjson.loads + construct_type(RawMessageStreamEvent) + "
                      "accumulate_event per event", accumulator),
            Contender("Anthropic SDK, events as its MessageStream handles them", "the same + build_events per "
                      "event (the text/input_json events with snapshots the helper yields); pings dropped first",
                      message_stream)]


def responses_sdk() -> Contender:
    from openai._models import construct_type
    from openai._types import omit
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent

    def fold(stream: Stream) -> Any:
        state: Any = ResponseStreamState(input_tools=omit, text_format=omit)
        for raw in stream:
            state.handle_event(construct_type(type_=ResponseStreamEvent, value=orjson.loads(raw)))
        return state._completed_response

    return Contender("OpenAI SDK ResponseStreamState", "orjson.loads + construct_type(ResponseStreamEvent) + "
                     "handle_event per event, as the SDK's ResponseStream does", fold)
