"""A Gemini response as its chunks build it: each candidate's fields and merged parts, and how it renders.

Consecutive text parts of one kind (answer or thought) join into one, as the non-streaming response has them;
other parts are kept as they came; a function call renders with the arguments its fragments spell so far.
The dialect (``gemini.py``) decides what the chunks mean; this is what they build.
"""

from __future__ import annotations

from typing import Any

from worker.choice import TextField, ToolCallBuffer
from worker.dialects.gemini_partial_args import PartialArguments

CALL_STREAM_KEYS = ("partialArgs", "willContinue")  # how a call streams: not part of the call it becomes


class TextRun:
    """Consecutive text parts of one kind (answer or thought), joined as the non-streaming response has them."""

    __slots__ = ("thought", "parts", "signature")

    def __init__(self, thought: bool) -> None:
        self.thought = thought
        self.parts: list[str] = []
        self.signature: str | None = None

    def render(self) -> dict[str, Any]:
        part: dict[str, Any] = {"text": "".join(self.parts)}
        if self.thought:
            part["thought"] = True
        if self.signature is not None:
            part["thoughtSignature"] = self.signature
        return part


class Call:
    """A function call's native part; a streamed one's arguments grow until it closes."""

    __slots__ = ("part", "args", "buffer")

    def __init__(self, part: dict[str, Any], args: PartialArguments, buffer: ToolCallBuffer) -> None:
        self.part = part
        self.args = args
        self.buffer = buffer

    def render(self) -> dict[str, Any]:
        call = {key: value for key, value in self.part["functionCall"].items() if key not in CALL_STREAM_KEYS}
        call["args"] = self.args.value()
        return {**self.part, "functionCall": call}


class Candidate:
    __slots__ = ("fields", "content", "parts", "streamed")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}  # the candidate's own fields in first-seen order, content rendered in
        self.content: dict[str, Any] = {}  # the content's own fields (role), parts rendered in
        self.parts: list[TextRun | Call | dict[str, Any]] = []
        self.streamed: Call | None = None  # a Vertex call whose arguments are still streaming

    def add_text(self, field: TextField, text: str, thought: bool, signature: str | None) -> None:
        """A text part: into the choice's field, and joined to the text run it continues (a new run when the
        last part is of another kind, or both it and this part carry a signature)."""
        field.seen = True
        run = self.parts[-1] if self.parts else None
        if type(run) is not TextRun or run.thought != thought or (signature is not None and run.signature is not None):
            run = TextRun(thought)
            self.parts.append(run)
        if text:
            field.parts.append(text)
            run.parts.append(text)
        if signature is not None:
            run.signature = signature

    def render(self) -> dict[str, Any]:
        parts = [part.render() if isinstance(part, (TextRun, Call)) else part for part in self.parts]
        content = {key: parts if key == "parts" else value for key, value in self.content.items()}
        content.setdefault("parts", parts)
        return {key: content if key == "content" else value for key, value in self.fields.items()}
