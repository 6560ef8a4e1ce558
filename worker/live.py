"""Following a request live: the events its chunk stream means, derived one entry at a time.

Pure like the Assembler: ``LiveFold`` takes the chunk stream's entries in order and returns, for each, the
events a follower shows - text deltas, tool calls starting, growing and done, choices finishing, usage, an
upstream attempt starting over - and, once the stream's ``final`` entry is read, takes the result record
for the ``Final`` event. One vocabulary whatever the upstream's dialect.

How the events are derived, and why they are exact:

- The entries go through a ``RequestState``, as in the worker, so follower and worker agree on which
  attempt counts, which chunks are duplicates and where a request ends. After each entry the assembly
  state is compared with what was shown, and the difference becomes events: nothing is parsed twice.
- Text: incremental text is shown as it comes. Cumulative text (each chunk repeats the text so far) is shown
  as increments. In ``auto`` mode a stream is cumulative only if its end proves it, so while every chunk
  still extends the one before, the text after the first piece is held back; the first chunk that does not
  (any ordinary stream's second piece) releases it. Concatenated, the deltas are the record's text.
- A ``TextDelta`` with ``reset`` replaces the field's text: only a ``cumulative`` stream that stopped
  extending its text needs it (the record then keeps the last value).
- Tool calls start once their name is known, grow by argument pieces, and are done when the dialect says
  so (native streams) or when the stream ends. A choice finishes once its text is shown and its calls done.
- Every event has a ``token``: the id of the entry it came from and its place among that entry's events.
  The same entries always give the same events, so ``events_after(token)`` - re-deriving from the start and
  dropping what the token has seen - continues with nothing lost and nothing repeated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import orjson

from streamfold.contract import Fields, Mode
from worker.assembler import Assembler
from worker.choice import ChoiceState, TextField
from worker.limits import Limits
from worker.request import RequestState

TextName = Literal["reasoning_content", "reasoning", "content", "refusal"]
# The order text is shown in when one entry adds to several fields: thoughts come before the answer.
TEXT_FIELDS: tuple[TextName, ...] = ("reasoning_content", "reasoning", "content", "refusal")


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of one choice's ``field``; with ``reset``, the field's whole text from now on."""

    kind: ClassVar[str] = "text"
    token: str
    choice: int
    field: TextName
    text: str
    reset: bool = False


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    """A tool call of a choice, at ``index`` among its calls, with the provider's id and the tool's name."""

    kind: ClassVar[str] = "tool_call"
    token: str
    choice: int
    index: int
    id: str | None
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    """The next piece of a tool call's JSON arguments."""

    kind: ClassVar[str] = "tool_call_arguments"
    token: str
    choice: int
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    """A tool call is complete: its whole ``arguments`` string, and ``parsed`` (None when it is not valid
    JSON; ``{}`` for a call without arguments)."""

    kind: ClassVar[str] = "tool_call_done"
    token: str
    choice: int
    index: int
    id: str | None
    name: str
    arguments: str
    parsed: Any


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    """A choice ended, with its chat ``finish_reason``."""

    kind: ClassVar[str] = "finish"
    token: str
    choice: int
    finish_reason: str


@dataclass(frozen=True, slots=True)
class UsageReported:
    """The upstream's token counts so far, in chat form; a later one replaces it."""

    kind: ClassVar[str] = "usage"
    token: str
    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AttemptRestarted:
    """The upstream call was retried after output was shown: discard everything shown so far."""

    kind: ClassVar[str] = "restart"
    token: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Final:
    """The request's result record: the last event, always. ``completion`` in it is the whole answer."""

    kind: ClassVar[str] = "final"
    token: str
    record: dict[str, Any]


LiveEvent = TextDelta | ToolCallStarted | ToolCallArguments | ToolCallDone | ChoiceFinished | UsageReported \
    | AttemptRestarted | Final


def event_json(event: LiveEvent) -> dict[str, Any]:
    """An event as one JSON object: ``type`` names the kind, then its fields."""
    return {"type": event.kind, **asdict(event)}


class _TextView:
    """What was shown of one text field: parts shown (incremental reading), or the text shown (cumulative),
    and whether the field was shown at all (a field sent empty is an empty string, not a missing one)."""

    __slots__ = ("parts", "text", "seen")

    def __init__(self) -> None:
        self.parts = 0
        self.text = ""
        self.seen = False


class _CallView:
    __slots__ = ("started", "parts", "done")

    def __init__(self) -> None:
        self.started = False
        self.parts = 0
        self.done = False


class _ChoiceView:
    __slots__ = ("texts", "calls", "finish")

    def __init__(self) -> None:
        self.texts = {name: _TextView() for name in TEXT_FIELDS}
        self.calls: list[_CallView] = []
        self.finish: str | None = None


class LiveFold:
    """The events of one request's chunk stream: ``feed`` every entry in order, then ``final`` the record."""

    def __init__(self, request_id: str, limits: Limits = Limits()) -> None:
        self._state = RequestState(request_id, "", 0.0, limits)
        self._attempt = -1
        self._choices: dict[int, _ChoiceView] = {}
        self._usage: dict[str, Any] | None = None
        self._shown = False
        self._flushed = False
        self._events: list[LiveEvent] = []
        self._entry = ""
        self.closed = False  # the worker's final entry was read: the result record is published

    def feed(self, entry_id: str, fields: Fields) -> list[LiveEvent]:
        """The events one chunk-stream entry means (often none)."""
        if self.closed:
            return []
        self._entry, self._events = entry_id, []
        state = self._state
        state.feed(entry_id, fields, 0.0)
        if fields.get(b"k") == b"final":
            self.closed = True
        if state.attempt != self._attempt:
            if self._shown:
                self._emit(AttemptRestarted, attempt=state.attempt)
            self._attempt, self._choices, self._usage, self._shown = state.attempt, {}, None, False
        assembler = state.assembler
        if assembler is not None and not self._flushed:
            self._show(assembler, ended=state.ended)
            self._flushed = state.ended
        return self._events

    def head(self) -> dict[str, Any]:
        """The completion's ``id``, ``created`` and ``model`` as the upstream named them so far."""
        assembler = self._state.assembler
        if assembler is None:
            return {"id": "", "created": 0, "model": ""}
        state = assembler.state
        return {"id": state.id or "", "created": state.created or 0, "model": state.model or ""}

    def final(self, record: dict[str, Any]) -> Final:
        """The last event, once ``closed``: the published result record."""
        return Final(f"{self._entry}.{len(self._events)}", record)

    # --- diffing ---------------------------------------------------------------------------------------

    def _show(self, assembler: Assembler, *, ended: bool) -> None:
        mode = assembler.text_mode
        for index, choice in sorted(assembler.state.choices.items()):
            view = self._choices.get(index)
            if view is None:
                view = self._choices[index] = _ChoiceView()
            held = False
            for name in TEXT_FIELDS:
                held |= self._show_text(index, name, getattr(choice, name), view.texts[name], mode, ended)
            calls_done = self._show_calls(index, choice, view, ended)
            finish = choice.finish_reason
            if finish is not None and finish != view.finish and not held and calls_done:
                view.finish = finish
                self._emit(ChoiceFinished, choice=index, finish_reason=finish)
        usage = assembler.state.usage()
        if usage is not None and usage != self._usage:
            self._usage = usage
            self._emit(UsageReported, usage=usage)

    def _show_text(self, choice: int, name: TextName, field: TextField, view: _TextView, mode: Mode,
                   ended: bool) -> bool:
        """Emit what is new in one text field; True while some of it is held back."""
        parts = field.parts
        if field.seen and not view.seen:
            view.seen = True
            if not parts:
                self._emit(TextDelta, choice=choice, field=name, text="")
        if mode == "cumulative":
            value = field.last
            if value != view.text:
                if value.startswith(view.text):
                    self._text(choice, name, value[len(view.text):])
                else:
                    self._text(choice, name, value, reset=True)
                view.text = value
            return False
        if mode == "incremental" or not field.chain:
            if len(parts) > view.parts:
                self._text(choice, name, "".join(parts[view.parts:]))
                view.parts = len(parts)
            return False
        # auto, and every piece so far extends the one before: the first is right either way, the rest wait.
        if parts and not view.parts:
            self._text(choice, name, parts[0])
            view.parts = 1
        if not ended:
            return len(parts) > view.parts
        if len(parts) > view.parts:
            rest = parts[-1][len(parts[0]):] if field.looks_cumulative() else "".join(parts[1:])
            self._text(choice, name, rest)
            view.parts = len(parts)
        return False

    def _show_calls(self, choice: int, state: ChoiceState, view: _ChoiceView, ended: bool) -> bool:
        """Emit what is new in one choice's tool calls; True when every call shown is done."""
        for position, call in enumerate(state.calls):
            if position == len(view.calls):
                view.calls.append(_CallView())
            seen = view.calls[position]
            if seen.done:
                continue
            if not seen.started and (call.name or call.done or ended):
                seen.started = True
                self._emit(ToolCallStarted, choice=choice, index=position, id=call.id, name=call.name or "")
            if seen.started and len(call.arguments) > seen.parts:
                self._emit(ToolCallArguments, choice=choice, index=position,
                           text="".join(call.arguments[seen.parts:]))
                seen.parts = len(call.arguments)
            if seen.started and (call.done or ended):
                seen.done = True
                arguments = "".join(call.arguments)
                self._emit(ToolCallDone, choice=choice, index=position, id=call.id, name=call.name or "",
                           arguments=arguments, parsed=parsed_arguments(arguments))
        return all(seen.done for seen in view.calls)

    def _text(self, choice: int, name: TextName, text: str, *, reset: bool = False) -> None:
        if text or reset:
            self._emit(TextDelta, choice=choice, field=name, text=text, reset=reset)

    def _emit(self, kind: type[LiveEvent], **fields: Any) -> None:
        self._events.append(kind(token=f"{self._entry}.{len(self._events)}", **fields))
        self._shown = True


def events_after(events: Iterable[LiveEvent], token: str | None) -> Iterable[LiveEvent]:
    """The events that come after ``token`` (all of them for None): what a follower resuming there misses."""
    if token is None:
        yield from events
        return
    after = parse_token(token)
    for event in events:
        if parse_token(event.token) > after:
            yield event


def parse_token(token: str) -> tuple[int, int, int]:
    """A resume token as (entry ms, entry seq, place), which compare in stream order; ValueError if it is
    not one."""
    entry, _, place = token.rpartition(".")
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq), int(place)
    except ValueError:
        raise ValueError(f"not a resume token: {token!r:.80}") from None


def parsed_arguments(arguments: str) -> Any:
    """A tool call's arguments as JSON: ``{}`` for none, None when they are not valid JSON."""
    if not arguments:
        return {}
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return None
