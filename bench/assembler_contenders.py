"""The contenders of bench/assembler.py: the orjson floor, Streamfold, and three peer accumulators.

Each folds one stream of raw chunk bytes into its final result, paying for turning the bytes into its own
natural input; each peer also says how to read the facts the correctness table compares out of its result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from worker import Assembler

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
