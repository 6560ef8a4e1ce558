"""The Responses API's output items as they stream: each item's parts and arguments, and how it renders.

An item renders as its ``output_item.done`` said when that came, else as added with what its events brought
since; a part likewise. The dialect (``responses.py``) decides what the events mean; this is what they build.
"""

from __future__ import annotations

from typing import Any

from worker.choice import ToolCallBuffer
from worker.dialects.base import optional


class Part:
    """A message's content part, or a reasoning item's summary or content part."""

    __slots__ = ("data", "parts", "annotations", "logprobs", "done")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.parts: list[str] = []
        self.annotations: list[Any] = []
        self.logprobs: list[Any] = []
        self.done: dict[str, Any] | None = None

    def render(self) -> dict[str, Any]:
        if self.done is not None:
            return self.done
        data = dict(self.data)
        data["refusal" if data.get("type") == "refusal" else "text"] = "".join(self.parts)
        if self.annotations:
            data["annotations"] = [*(data.get("annotations") or ()), *self.annotations]
        if self.logprobs:
            data["logprobs"] = [*(data.get("logprobs") or ()), *self.logprobs]
        return data


class Item:
    """One output item: as added, its parts or arguments so far, and as done."""

    __slots__ = ("data", "kind", "content", "summary", "arguments", "call", "done")

    def __init__(self, data: dict[str, Any], call: ToolCallBuffer | None) -> None:
        self.data = data
        self.kind: str = data["type"]
        self.content: dict[int, Part] = {}
        self.summary: dict[int, Part] = {}
        self.arguments: list[str] = []
        self.call = call
        self.done: dict[str, Any] | None = None

    def parts_of(self, index_key: str) -> dict[int, Part]:
        """The message's content parts or the reasoning's content parts (``content_index``), or its summary."""
        return self.summary if index_key == "summary_index" else self.content

    def part(self, index_key: str, index: int, field: str) -> Part:
        """The part at ``index``, opened when no ``*.part.added`` event announced it."""
        parts = self.parts_of(index_key)
        part = parts.get(index)
        if part is None:
            kind = "refusal" if field == "refusal" else "output_text"
            part = parts[index] = Part({"type": "summary_text" if index_key == "summary_index" else kind})
        return part

    def render(self) -> dict[str, Any]:
        if self.done is not None:
            return self.done
        data = dict(self.data)
        if self.kind == "function_call":
            data["arguments"] = "".join(self.arguments)
        if self.content:
            data["content"] = [self.content[index].render() for index in sorted(self.content)]
        if self.summary:
            data["summary"] = [self.summary[index].render() for index in sorted(self.summary)]
        return data


def part_texts(item: dict[str, Any], position: int) -> list[tuple[str, int, str, str]]:
    """The whole texts a done message or reasoning item repeats: (index key, index, field, text)."""
    texts = []
    for key, index_key in (("content", "content_index"), ("summary", "summary_index")):
        parts = optional(item.get(key), list, position, f"item.{key}", "a list")
        for index, part in enumerate(parts or ()):
            if type(part) is not dict:
                continue
            text_key = "refusal" if part.get("type") == "refusal" else "text"
            text = optional(part.get(text_key), str, position, f"item.{key}[{index}].{text_key}", "a string")
            if text is not None:
                texts.append((index_key, index, "refusal" if text_key == "refusal" else "content", text))
    return texts
