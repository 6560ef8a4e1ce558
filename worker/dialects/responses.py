"""OpenAI Responses API streams: ``response.created`` ... ``response.completed``, folded into the shared state.

The response streams as output items keyed by ``output_index`` (``response.output_item.added`` ... ``.done``),
each with its own events: a message's content parts (``output_text``/``refusal`` deltas, annotations), a
reasoning item's summary parts and reasoning text, a function call's argument deltas, built-in tools'
progress events. Every ``*.done`` event repeats the whole text or arguments: what the deltas missed is
appended, a disagreement is kept as streamed and warned about. Usage comes only with the final
``response.completed``, ``response.incomplete`` or ``response.failed``, whose ``response`` is the native
object as the API returns it (with the output assembled here when it carries none).

Into the completion: ``output_text`` of every message item -> content, joined as it comes; ``refusal`` ->
refusal; reasoning summary parts and reasoning text -> reasoning_content, each part a paragraph; function
calls -> tool_calls with their ``call_id``; the finish reason ``tool_calls`` when there are calls, ``stop``
otherwise, ``length``/``content_filter`` for an incomplete response. Built-in tools (``web_search_call``
and the like) stay in ``native``. Event types this module does not know are accepted and left out.
"""

from __future__ import annotations

from typing import Any

from worker.choice import ChoiceState, CompletionState, TextField
from worker.dialects.base import Dialect, count, expect, optional, reject
from worker.dialects.responses_output import Item, Part, part_texts

INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}
_LIFECYCLE = frozenset({"response.created", "response.in_progress", "response.queued"})
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Delta events: which kind of item they belong to, which index names their part, and the text they feed.
_DELTAS = {"response.output_text.delta": ("message", "content_index", "content"),
           "response.refusal.delta": ("message", "content_index", "refusal"),
           "response.reasoning_summary_text.delta": ("reasoning", "summary_index", "reasoning"),
           "response.reasoning_text.delta": ("reasoning", "content_index", "reasoning")}
# *.done events that repeat one part's whole text, and the field that holds it.
_TEXT_DONES = {"response.output_text.done": ("message", "content_index", "content", "text"),
               "response.refusal.done": ("message", "content_index", "refusal", "refusal"),
               "response.reasoning_summary_text.done": ("reasoning", "summary_index", "reasoning", "text"),
               "response.reasoning_text.done": ("reasoning", "content_index", "reasoning", "text")}
_PART_EVENTS = {"response.content_part.added": "content_index", "response.content_part.done": "content_index",
                "response.reasoning_summary_part.added": "summary_index",
                "response.reasoning_summary_part.done": "summary_index"}


class ResponsesDialect(Dialect):
    """Folds OpenAI Responses stream events; ``native`` is the Response."""

    name = "responses"

    def __init__(self, state: CompletionState) -> None:
        super().__init__(state)
        self._choice: ChoiceState | None = None
        self._fields: dict[str, TextField] = {}  # content, refusal, reasoning: the choice's, once begun
        self._snapshot: dict[str, Any] | None = None  # the last lifecycle response
        self._final: dict[str, Any] | None = None
        self._response_id: str | None = None
        self._items: dict[int, Item] = {}
        self._by_id: dict[str, Item] = {}

    @staticmethod
    def recognizes(event: dict[str, Any]) -> bool:
        kind = event.get("type")
        return type(kind) is str and (kind.startswith("response.") or (
            kind == "error" and not isinstance(event.get("error"), dict)))

    def apply(self, event: dict[str, Any], position: int) -> None:
        kind = event.get("type")
        spec = _DELTAS.get(kind) if type(kind) is str else None
        if spec is not None:  # nearly every event: a piece of text for a part already known, taken in one pass
            item_kind, index_key, field = spec
            output_index, index, delta = event.get("output_index"), event.get(index_key), event.get("delta")
            item = self._items.get(output_index) if type(output_index) is int else None
            if item is not None and item.kind == item_kind and type(delta) is str and type(index) is int:
                part = (item.summary if index_key == "summary_index" else item.content).get(index)
                if part is not None and not event.get("logprobs") and (part.parts or field != "reasoning"):
                    if delta:
                        target = self._fields[field]
                        target.seen = True
                        target.parts.append(delta)
                        part.parts.append(delta)
                    return
            self._delta(spec, event, position)
        elif type(kind) is not str:
            reject(position, f"not a Responses stream event: its type is {kind!r:.40}")
        elif kind == "response.function_call_arguments.delta":
            item = self._item_of(event, position, "function_call")
            delta = event.get("delta")
            if type(delta) is not str:
                reject(position, f"{kind} delta must be a string, got {delta!r:.40}")
            if item.call is not None and item.call.done:
                reject(position, f"{kind} for a function call whose arguments were done")
            if delta:
                item.arguments.append(delta)
                if item.call is not None:
                    item.call.arguments.append(delta)
        elif kind in _TEXT_DONES:
            item_kind, index_key, field, key = _TEXT_DONES[kind]
            item, index = self._find_part(event, position, item_kind, index_key)
            text = expect(event.get(key), str, position, key, "a string")
            self._settle(field, item.part(index_key, index, field).parts, text, f"{kind} (output {_where(event)})")
        elif kind in _PART_EVENTS:
            self._part_event(kind, event, position)
        elif kind == "response.function_call_arguments.done":
            item = self._item_of(event, position, "function_call")
            arguments = expect(event.get("arguments"), str, position, "arguments", "a string")
            self._settle_call(item, arguments, f"{kind} (output {_where(event)})")
        elif kind == "response.output_text.annotation.added":
            item, index = self._find_part(event, position, "message", "content_index")
            annotation = expect(event.get("annotation"), dict, position, "annotation", "an object")
            item.part("content_index", index, "content").annotations.append(annotation)
        elif kind == "response.output_item.added":
            self._item_added(event, position)
        elif kind == "response.output_item.done":
            self._item_done(event, position)
        elif kind in _LIFECYCLE or kind in _FINAL:
            self._lifecycle(kind, event, position)
        elif kind == "error":
            self._begin()
            self.state.fail({key: value for key, value in event.items() if key != "type"})

    def _delta(self, spec: tuple[str, str, str], event: dict[str, Any], position: int) -> None:
        """Any text delta, checked whole: a part that was never added is opened, logprobs are kept."""
        kind, (item_kind, index_key, field) = event["type"], spec
        item, index = self._find_part(event, position, item_kind, index_key)
        delta = event.get("delta")
        if type(delta) is not str:
            reject(position, f"{kind} delta must be a string, got {delta!r:.40}")
        logprobs = event.get("logprobs")
        if logprobs is not None and type(logprobs) is not list:
            reject(position, f"{kind} logprobs must be a list, got {logprobs!r:.40}")
        part = item.part(index_key, index, field)
        if delta:
            self._add(field, part.parts, delta)
        if logprobs:
            part.logprobs.extend(logprobs)
            if self._choice is not None:
                self._choice.add_logprobs({"content": logprobs})

    # --- finding what an event is about ----------------------------------------------------------------

    def _item_of(self, event: dict[str, Any], position: int, kind: str | None) -> Item:
        """The output item an event names by ``output_index`` (or, lacking one, ``item_id``)."""
        output_index, item_id = event.get("output_index"), event.get("item_id")
        if type(output_index) is int:
            item = self._items.get(output_index)
        elif output_index is None and type(item_id) is str:
            item = self._by_id.get(item_id)
        else:
            reject(position, f"{event.get('type')} output_index must be an integer, got {output_index!r:.40}")
        if item is None:
            reject(position, f"{event.get('type')} for output {_where(event)}, which was never added")
        if kind is not None and item.kind != kind:
            reject(position, f"{event.get('type')} for output {_where(event)}, which is a {item.kind}, not a {kind}")
        return item

    def _find_part(self, event: dict[str, Any], position: int, kind: str, index_key: str) -> tuple[Item, int]:
        """The item an event names, and the index of its part the event is about."""
        return (self._item_of(event, position, kind),
                expect(event.get(index_key), int, position, index_key, "an integer"))

    # --- events ----------------------------------------------------------------------------------------

    def _begin(self) -> ChoiceState:
        """The stream's one choice; the first event applied (never one rejected) sets the state up for it."""
        choice = self._choice
        if choice is None:
            self.state.final = False
            self.state.usage_map = chat_usage
            choice = self._choice = self.state.choice(0)
            self._fields = {"content": choice.content, "refusal": choice.refusal,
                            "reasoning": choice.reasoning_content}
        return choice

    def _add(self, field: str, own: list[str], text: str) -> None:
        """Append a piece of text to a part and to the choice's field; reasoning parts are paragraphs."""
        target = self._fields[field]
        if field == "reasoning" and not own and target.parts:
            target.parts.append("\n\n")
        own.append(text)
        target.append(text)

    def _settle(self, field: str, own: list[str], final: str, what: str) -> None:
        """A ``*.done`` repeats the whole text: append what the deltas missed, keep and warn on a mismatch."""
        have = "".join(own)
        if final == have:
            return
        if final.startswith(have):
            self._add(field, own, final[len(have):])
        else:
            self.state.warnings.append(f"{what}: the streamed text differs from the text it ends with; "
                                       "kept the streamed text")

    def _settle_call(self, item: Item, arguments: str, what: str) -> None:
        have = "".join(item.arguments)
        if arguments != have:
            if arguments.startswith(have):
                rest = arguments[len(have):]
                item.arguments.append(rest)
                if item.call is not None and not item.call.done:
                    item.call.arguments.append(rest)
            else:
                self.state.warnings.append(f"{what}: the streamed arguments differ from the arguments it ends "
                                           "with; kept the streamed arguments")
        if item.call is not None:
            item.call.done = True

    def _part_event(self, kind: str, event: dict[str, Any], position: int) -> None:
        index_key = _PART_EVENTS[kind]
        item = self._item_of(event, position, "reasoning" if index_key == "summary_index" else None)
        if item.kind not in ("message", "reasoning"):
            reject(position, f"{kind} for output {_where(event)}, which is a {item.kind}: it has no parts")
        index = expect(event.get(index_key), int, position, index_key, "an integer")
        data = expect(event.get("part"), dict, position, "part", "an object")
        text_key = "refusal" if data.get("type") == "refusal" else "text"
        text = optional(data.get(text_key), str, position, f"part.{text_key}", "a string")
        parts = item.parts_of(index_key)
        part = parts.get(index)
        field = "reasoning" if item.kind == "reasoning" else "refusal" if text_key == "refusal" else "content"
        if kind.endswith(".added"):
            if part is not None:
                reject(position, f"{kind}: part {index} of output {_where(event)} was added already")
            parts[index] = Part(data)
            self._fields[field].seen = True  # an empty part is still an empty text, not none at all
            return
        if part is None:
            part = parts[index] = Part(data)
        if text is not None:
            self._settle(field, part.parts, text, f"{kind} (output {_where(event)})")
        part.done = data

    def _item_added(self, event: dict[str, Any], position: int) -> None:
        output_index = expect(event.get("output_index"), int, position, "output_index", "an integer")
        data = expect(event.get("item"), dict, position, "item", "an object")
        kind = expect(data.get("type"), str, position, "item.type", "a string")
        item_id = optional(data.get("id"), str, position, "item.id", "a string")
        if output_index in self._items:
            reject(position, f"response.output_item.added for output {output_index}, which was added already")
        call_id = name = arguments = None
        if kind == "function_call":
            call_id = optional(data.get("call_id"), str, position, "item.call_id", "a string")
            name = optional(data.get("name"), str, position, "item.name", "a string")
            arguments = optional(data.get("arguments"), str, position, "item.arguments", "a string")
        role = optional(data.get("role"), str, position, "item.role", "a string") if kind == "message" else None
        choice = self._begin()
        call = choice.open_call(call_id or item_id or f"call_{output_index}", name or "") \
            if kind == "function_call" else None
        item = self._items[output_index] = Item(data, call)
        if item_id:
            self._by_id[item_id] = item
        if arguments:
            item.arguments.append(arguments)
            if call is not None:
                call.arguments.append(arguments)
        if role and choice.role is None:
            choice.role = role

    def _item_done(self, event: dict[str, Any], position: int) -> None:
        output_index = expect(event.get("output_index"), int, position, "output_index", "an integer")
        data = expect(event.get("item"), dict, position, "item", "an object")
        kind = expect(data.get("type"), str, position, "item.type", "a string")
        item = self._items.get(output_index)
        if item is not None and item.kind != kind:
            reject(position, f"response.output_item.done for output {output_index}: a {kind}, added as a {item.kind}")
        arguments = optional(data.get("arguments"), str, position, "item.arguments", "a string") \
            if kind == "function_call" else None
        texts = part_texts(data, position) if kind in ("message", "reasoning") else []
        if item is None:
            self._item_added(event, position)
            item = self._items[output_index]
        if arguments is not None:
            self._settle_call(item, arguments, f"response.output_item.done (output {output_index})")
        elif item.call is not None:
            item.call.done = True
        for index_key, index, field, text in texts:
            field = "reasoning" if item.kind == "reasoning" else field
            self._settle(field, item.part(index_key, index, field).parts, text,
                         f"response.output_item.done (output {output_index})")
        item.done = data

    def _lifecycle(self, kind: str, event: dict[str, Any], position: int) -> None:
        response = expect(event.get("response"), dict, position, "response", "an object")
        response_id = optional(response.get("id"), str, position, "response.id", "a string")
        model = optional(response.get("model"), str, position, "response.model", "a string")
        created = optional(response.get("created_at"), int, position, "response.created_at", "an integer")
        tier = optional(response.get("service_tier"), str, position, "response.service_tier", "a string")
        if response_id and self._response_id and response_id != self._response_id:
            reject(position, f"{kind} for response {response_id}, in the stream of {self._response_id}")
        final = kind in _FINAL
        usage = details = error = None
        calls: list[tuple[str, str, str]] = []
        if final:
            usage = optional(response.get("usage"), dict, position, "response.usage", "an object")
            details = optional(response.get("incomplete_details"), dict, position,
                               "response.incomplete_details", "an object")
            error = response.get("error")
            calls = self._unstreamed_calls(response, position)
        choice = self._begin()
        state = self.state
        self._response_id = self._response_id or response_id or None
        state.id = state.id or response_id or None
        state.model = state.model or model or None
        state.created = state.created or created or None
        if tier:
            state.service_tier = tier
        if not final:
            self._snapshot = response
            return
        self._final = response
        state.final = True
        if usage is not None:
            state.raw_usage = usage
        for call_id, name, arguments in calls:
            call = choice.open_call(call_id, name)
            if arguments:
                call.arguments.append(arguments)
            call.done = True
        if kind == "response.completed":
            choice.finish_reason = "tool_calls" if choice.calls else "stop"
        elif kind == "response.incomplete":
            reason = (details or {}).get("reason")
            choice.finish_reason = INCOMPLETE_REASONS.get(reason, reason) if type(reason) is str else "length"
        else:
            state.fail(error if isinstance(error, (dict, str)) and error else "the response failed")

    def _unstreamed_calls(self, response: dict[str, Any], position: int) -> list[tuple[str, str, str]]:
        """Function calls in a final response's output that no event had announced: the completion needs them."""
        output = optional(response.get("output"), list, position, "response.output", "a list")
        known = {call.id for call in (self._choice.calls if self._choice is not None else ())}
        calls = []
        for number, item in enumerate(output or ()):
            if type(item) is not dict or item.get("type") != "function_call":
                continue
            where = f"response.output[{number}]"
            call_id = optional(item.get("call_id"), str, position, f"{where}.call_id", "a string")
            name = optional(item.get("name"), str, position, f"{where}.name", "a string")
            arguments = optional(item.get("arguments"), str, position, f"{where}.arguments", "a string")
            item_id = item.get("id")
            call_id = call_id or (item_id if type(item_id) is str else None) or f"call_{number}"
            if call_id not in known:
                calls.append((call_id, name or "", arguments or ""))
        return calls

    # --- the Response ------------------------------------------------------------------------------------

    def native(self, warnings: list[str]) -> dict[str, Any] | None:
        if self._choice is None:
            return None
        final = self._final
        response = dict(final if final is not None else self._snapshot or {"object": "response"})
        if final is None or final.get("output") is None:
            response["output"] = [self._items[index].render() for index in sorted(self._items)]
        return response

    @staticmethod
    def native_usage(native: dict[str, Any]) -> dict[str, Any] | None:
        usage = native.get("usage")
        return usage if isinstance(usage, dict) else None


def _where(event: dict[str, Any]) -> str:
    output_index = event.get("output_index")
    return str(output_index) if output_index is not None else repr(event.get("item_id"))


def chat_usage(usage: dict[str, Any]) -> dict[str, Any] | None:
    """Responses usage in the chat shape: input/output tokens renamed, their details kept as they are.

    Responses counts cached input inside ``input_tokens`` and reasoning inside ``output_tokens``, as chat
    does, so the counts carry over unchanged; ``total_tokens`` is the provider's own.
    """
    prompt, completion, total = (count(usage.get("input_tokens")), count(usage.get("output_tokens")),
                                 count(usage.get("total_tokens")))
    if prompt is None and completion is None and total is None:
        return None
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    chat: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    for native, name in (("input_tokens_details", "prompt_tokens_details"),
                         ("output_tokens_details", "completion_tokens_details")):
        details = usage.get(native)
        if isinstance(details, dict):
            chat[name] = dict(details)
    return chat
