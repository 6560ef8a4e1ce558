"""Follow events as canonical ``chat.completion.chunk`` objects: what the gateway relays, whatever the dialect.

An OpenAI client's own accumulator must end with exactly the assembled message, so each piece of state goes
out once and in the shape OpenAI streams it: a choice's first chunk carries its ``role``; a tool call's first
chunk its ``index``, ``id``, ``type`` and ``name`` (later ones only ``index`` and argument pieces, since
accumulators concatenate every string they see twice); ``finish_reason`` on a chunk of its own; with
``include_usage``, one last chunk with no choices and the usage. What a chunk cannot say - text already sent
being replaced (an upstream retry, a cumulative stream that stopped extending) - ``ChunkWriter`` reports as
``Superseded``, and the gateway ends the stream with an error rather than let a client assemble a wrong answer.
"""

from __future__ import annotations

from typing import Any

from worker.live import (AttemptRestarted, ChoiceFinished, LiveEvent, TextDelta, ToolCallArguments,
                         ToolCallStarted, UsageReported)


class Superseded(Exception):
    """Text already sent was replaced; a chat chunk stream cannot take it back."""


class ChunkWriter:
    """Turns one request's events into chunks. Feed every event, sent or not (a resumed stream skips what the
    client had, but the writer must still know which choices and calls it announced)."""

    def __init__(self, *, include_usage: bool = False) -> None:
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self._announced: set[int] = set()
        self._sent_text = False
        # The completion's id, created and model, from the upstream's own chunks: set by the relay as they come.
        self.meta: dict[str, Any] = {"id": "", "created": 0, "model": ""}

    def chunks(self, event: LiveEvent) -> list[dict[str, Any]]:
        """The chunks one event becomes (none for what a chat stream does not show, such as a call being done)."""
        if isinstance(event, AttemptRestarted):
            if self._sent_text:
                raise Superseded(f"the upstream call was retried (attempt {event.attempt}) after part of the "
                                 "answer was sent")
            return []
        if isinstance(event, UsageReported):
            self.usage = event.usage
            return []
        if isinstance(event, TextDelta):
            if event.reset and self._sent_text:
                raise Superseded("the upstream replaced text that was already sent")
            self._sent_text = True
            return [*self._role(event.choice), self._chunk(event.choice, {event.field: event.text})]
        if isinstance(event, ToolCallStarted):
            call = {"index": event.index, "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""}}
            return [*self._role(event.choice), self._chunk(event.choice, {"tool_calls": [call]})]
        if isinstance(event, ToolCallArguments):
            call = {"index": event.index, "function": {"arguments": event.text}}
            return [self._chunk(event.choice, {"tool_calls": [call]})]
        if isinstance(event, ChoiceFinished):
            return [*self._role(event.choice), self._chunk(event.choice, {}, finish_reason=event.finish_reason)]
        return []

    def closing(self) -> list[dict[str, Any]]:
        """The chunks after the last event: the usage chunk, when asked for and known."""
        if not self.include_usage or self.usage is None:
            return []
        return [{**self._head(), "choices": [], "usage": self.usage}]

    def _role(self, choice: int) -> list[dict[str, Any]]:
        if choice in self._announced:
            return []
        self._announced.add(choice)
        return [self._chunk(choice, {"role": "assistant"})]

    def _chunk(self, choice: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**self._head(), "choices": [{"index": choice, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]}

    def _head(self) -> dict[str, Any]:
        return {"id": self.meta["id"], "object": "chat.completion.chunk", "created": self.meta["created"],
                "model": self.meta["model"]}
