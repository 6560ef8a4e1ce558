"""Gemini ``streamGenerateContent`` streams: every chunk a ``GenerateContentResponse``, folded into the state.

Each chunk carries candidates whose ``content.parts`` continue the candidate's content: text parts (``thought:
true`` for thinking), whole function calls, code execution, inline data. ``usageMetadata`` comes on every
chunk as a running total (Gemini 2.5; the counts can even shrink), or only on the last (older models; Vertex
sends ``{"trafficType": ...}`` until then): the last one is taken, never summed. ``finishReason`` ends a
candidate and may share a chunk with content. Vertex AI can stream a call's arguments (``partialArgs``,
see ``gemini_partial_args``); each such call becomes an ordinary call once it closes.

Into the completion: text -> content, thoughts -> reasoning_content, function calls -> tool_calls (the
provider's ``id``, or ``call_<responseId>_<n>`` when it sends none), finish reasons mapped (``STOP`` with
calls -> ``tool_calls``, ``MAX_TOKENS`` -> ``length``, ``SAFETY``, ``RECITATION`` and the other blocked
endings -> ``content_filter``); a prompt blocked before any candidate finishes choice 0 with
``content_filter``. Code execution, inline data and signatures stay in ``native``: the response with each
candidate's parts merged (consecutive text parts of the same kind joined) and the last ``usageMetadata``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from worker.choice import ChoiceState, CompletionState, merge_field
from worker.dialects.base import Dialect, count, expect, optional, reject
from worker.dialects.gemini_partial_args import Fragment, PartialArguments, read_fragment
from worker.dialects.gemini_response import Call, Candidate

BLOCKED = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
           "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "LANGUAGE", "OTHER")
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", **{reason: "content_filter" for reason in BLOCKED}}
_TEXT_KEYS = frozenset({"text", "thought", "thoughtSignature"})
_PLAIN_CANDIDATE = frozenset({"content", "index", "finishReason"})
_PLAIN_CONTENT = frozenset({"parts", "role"})
_FRAGMENT_KEYS = frozenset({"partialArgs", "willContinue"})


# Steps a chunk's parts turn into once checked: ("text", text, thought, signature), ("part", part, text,
# thought), ("call", part, PartialArguments, arguments JSON or None while it streams), ("more", fragments,
# arguments JSON or None) for a streamed call going on or closing.
Step = tuple[Any, ...]


class GeminiDialect(Dialect):
    """Folds Gemini GenerateContentResponse chunks; ``native`` is the response with its candidates merged."""

    name = "gemini"

    def __init__(self, state: CompletionState) -> None:
        super().__init__(state)
        self._top: dict[str, Any] = {}  # the response's own fields in first-seen order
        self._candidates: dict[int, Candidate] = {}

    @staticmethod
    def recognizes(event: dict[str, Any]) -> bool:
        return "type" not in event and "choices" not in event and (
            "candidates" in event or "usageMetadata" in event or "promptFeedback" in event)

    def apply(self, chunk: dict[str, Any], position: int) -> None:
        candidates = chunk.get("candidates")
        # Most chunks add one text part to one candidate, with the same fields as before: taken in one pass.
        if type(candidates) is list and len(candidates) == 1 and chunk.keys() <= self._top.keys():
            candidate = candidates[0]
            if type(candidate) is dict and candidate.keys() <= _PLAIN_CANDIDATE and self._steady(chunk, candidate):
                return
        self._general(chunk, position)

    def _steady(self, chunk: dict[str, Any], candidate: dict[str, Any]) -> bool:
        """Apply a chunk that continues a known candidate with one text part, or a streamed call with more
        fragments; False (nothing done) for any other chunk."""
        usage, content = chunk.get("usageMetadata"), candidate.get("content")
        if (usage is not None and type(usage) is not dict) or type(content) is not dict:
            return False
        parts, index, finish = content.get("parts"), candidate.get("index", 0), candidate.get("finishReason")
        if (type(parts) is not list or len(parts) != 1 or not content.keys() <= _PLAIN_CONTENT or type(index) is not int
                or (finish is not None and type(finish) is not str)
                or ("createTime" in chunk and self.state.created is None)):
            return False
        held, part = self._candidates.get(index), parts[0]
        if held is None or type(part) is not dict:
            return False
        if held.streamed is not None:
            return self._steady_fragments(part, held, usage, finish)
        if not part.keys() <= _TEXT_KEYS:
            return False
        text, thought, signature = part.get("text", ""), part.get("thought", False), part.get("thoughtSignature")
        if type(text) is not str or type(thought) is not bool or (signature is not None and type(signature) is not str):
            return False
        self._steady_usage(usage)
        choice = self.state.choices[index]
        held.add_text(choice.reasoning_content if thought else choice.content, text, thought, signature)
        if finish is not None:
            held.fields["finishReason"] = finish
            choice.finish_reason = "tool_calls" if finish == "STOP" and choice.calls else \
                FINISH_REASONS.get(finish, finish)
        return True

    def _steady_fragments(self, part: dict[str, Any], held: Candidate, usage: Any, finish: Any) -> bool:
        """More fragments for a streamed call that goes on after them; closing it is the general path's."""
        call = part.get("functionCall")
        if (finish is not None or len(part) != 1 or type(call) is not dict or call.get("willContinue") is not True
                or not call.keys() <= _FRAGMENT_KEYS):
            return False
        fragments = []
        for fragment in call.get("partialArgs") or ():
            read = read_fragment(fragment)
            if isinstance(read, str):
                return False  # the general path names what is wrong
            fragments.append(read)
        self._steady_usage(usage)
        assert held.streamed is not None  # the caller's condition
        held.streamed.args.fragments += fragments
        return True

    def _steady_usage(self, usage: dict[str, Any] | None) -> None:
        if usage is not None:
            self._top["usageMetadata"] = usage
            self.state.raw_usage = usage

    def _general(self, chunk: dict[str, Any], position: int) -> None:
        """Any chunk: checked whole (every candidate worked out as steps), then applied."""
        get = chunk.get
        candidates, usage = get("candidates"), get("usageMetadata")
        model, response_id = get("modelVersion"), get("responseId")
        if ((candidates is not None and type(candidates) is not list) or (usage is not None and type(usage) is not dict)
                or (model is not None and type(model) is not str)
                or (response_id is not None and type(response_id) is not str)):
            optional(candidates, list, position, "candidates", "a list")
            optional(usage, dict, position, "usageMetadata", "an object")
            optional(model, str, position, "modelVersion", "a string")
            optional(response_id, str, position, "responseId", "a string")
        state = self.state
        created = None
        if state.created is None and "createTime" in chunk:
            created = _created(optional(get("createTime"), str, position, "createTime", "a string"))
        error = get("error")
        if candidates is None and usage is None and error is None and "promptFeedback" not in chunk:
            reject(position, "not a Gemini chunk: it has no candidates, usageMetadata, promptFeedback or error")
        blocked = _blocked(get("promptFeedback")) and not candidates and not self._candidates
        plans = [self._plan(candidate, number, position) for number, candidate in enumerate(candidates or ())]

        if state.usage_map is None:
            state.usage_map = chat_usage
        if state.id is None and response_id:
            state.id = response_id
        if state.model is None and model:
            state.model = model
        if created:
            state.created = created
        top = self._top
        if not top:
            # The response's fields in the order the first chunk has them.
            top.update(dict.fromkeys(key for key, value in chunk.items() if value is not None and key != "error"))
        for key, value in chunk.items():
            if key == "candidates":
                top.setdefault(key, None)
            elif key == "usageMetadata" or key == "modelVersion" or key == "responseId" or key == "createTime":
                if value is not None:
                    top[key] = value
            elif key != "error":
                merge_field(top, key, value)
        if usage is not None:
            state.raw_usage = usage
        for index, candidate, steps in plans:
            self._apply_candidate(index, candidate, steps)
        if blocked:
            state.choice(0).finish_reason = "content_filter"
        if error is not None:
            state.fail(_error(error))

    # --- checking: a chunk's candidates as steps, before anything changes --------------------------------

    def _plan(self, candidate: Any, number: int, position: int) -> tuple[int, dict[str, Any], list[Step]]:
        where = f"candidates[{number}]"
        expect(candidate, dict, position, where, "an object")
        index = optional(candidate.get("index"), int, position, f"{where}.index", "an integer") or 0
        optional(candidate.get("finishReason"), str, position, f"{where}.finishReason", "a string")
        content = optional(candidate.get("content"), dict, position, f"{where}.content", "an object")
        parts = optional((content or {}).get("parts"), list, position, f"{where}.content.parts", "a list")
        existing = self._candidates.get(index)
        open_call = existing.streamed if existing is not None else None
        # The candidate's streamed call as it would stand after each part, and the fragments this chunk adds.
        streamed = open_call.args if open_call is not None else None
        opened: dict[str, Any] | None = open_call.part["functionCall"] if open_call is not None else None
        pending: list[Fragment] = []
        steps: list[Step] = []
        for part_number, part in enumerate(parts or ()):
            at = f"{where}.content.parts[{part_number}]"
            expect(part, dict, position, at, "an object")
            call = part.get("functionCall")
            if call is None:
                text = optional(part.get("text"), str, position, f"{at}.text", "a string")
                thought = optional(part.get("thought"), bool, position, f"{at}.thought", "a boolean")
                signature = optional(part.get("thoughtSignature"), str, position, f"{at}.thoughtSignature", "a string")
                if part.keys() <= _TEXT_KEYS:
                    steps.append(("text", text or "", bool(thought), signature))
                else:
                    steps.append(("part", part, text, bool(thought)))
                continue
            expect(call, dict, position, f"{at}.functionCall", "an object")
            name = optional(call.get("name"), str, position, f"{at}.functionCall.name", "a string")
            call_id = optional(call.get("id"), str, position, f"{at}.functionCall.id", "a string")
            args = optional(call.get("args"), dict, position, f"{at}.functionCall.args", "an object")
            will = optional(call.get("willContinue"), bool, position, f"{at}.functionCall.willContinue", "a boolean")
            fragments = []
            for fragment in optional(call.get("partialArgs"), list, position, f"{at}.functionCall.partialArgs",
                                     "a list") or ():
                read = read_fragment(fragment)
                if isinstance(read, str):
                    reject(position, f"{at}.functionCall: {read}")
                fragments.append(read)
            if streamed is not None and opened is not None and (name is None or name == opened.get("name")) and (
                    call_id is None or call_id == opened.get("id")):
                # args on a later part set top-level keys, as fragments do
                fragments = [((key,), value, False) for key, value in (args or {}).items()] + fragments
                pending += fragments
                steps.append(("more", fragments, None if will else _arguments(streamed, pending, position, at)))
                if not will:
                    streamed = opened = None
                continue
            if not call:
                continue  # an empty functionCall closes a streamed call, and is nothing when none is open
            if streamed is not None:  # another call begins: the streamed one ended without saying so
                steps.append(("more", [], _arguments(streamed, pending, position, at)))
                streamed = opened = None
            arguments = PartialArguments(args or {}, fragments)
            if will:
                streamed, opened, pending = arguments, call, []
            steps.append(("call", part, arguments, None if will else _arguments(arguments, [], position, at)))
        return index, candidate, steps

    # --- applying -----------------------------------------------------------------------------------------

    def _apply_candidate(self, index: int, data: dict[str, Any], steps: list[Step]) -> None:
        candidate = self._candidates.get(index)
        if candidate is None:
            candidate = self._candidates[index] = Candidate()
        choice = self.state.choices.get(index) or self.state.choice(index)
        fields = candidate.fields
        for key, value in data.items():
            if value is None:
                continue
            if key == "content":
                fields.setdefault(key, None)
                for inner, item in value.items():  # role, and where parts stand among the content's keys
                    candidate.content[inner] = None if inner == "parts" else item
            elif key == "index" or key == "finishReason":
                fields[key] = value
            else:
                merge_field(fields, key, value)
        for step in steps:
            kind = step[0]
            if kind == "text":
                candidate.add_text(choice.reasoning_content if step[2] else choice.content, step[1], step[2], step[3])
            elif kind == "part":
                candidate.parts.append(step[1])
                if step[2] is not None:
                    (choice.reasoning_content if step[3] else choice.content).append(step[2])
            elif kind == "call":
                self._call(candidate, choice, step[1], step[2], step[3])
            else:
                streamed = candidate.streamed
                assert streamed is not None  # the plan only continues a call that is open
                streamed.args.fragments += step[1]
                if step[2] is not None:
                    streamed.buffer.arguments.append(step[2])
                    streamed.buffer.done = True
                    candidate.streamed = None
        reason = data.get("finishReason")
        if reason is not None:
            choice.finish_reason = "tool_calls" if reason == "STOP" and choice.calls else \
                FINISH_REASONS.get(reason, reason)


    def _call(self, candidate: Candidate, choice: ChoiceState, part: dict[str, Any], args: PartialArguments,
              arguments: str | None) -> None:
        data = part["functionCall"]
        call_id = data.get("id") or f"call_{self.state.id or 'gemini'}_{len(choice.calls)}"
        buffer = choice.open_call(call_id, data.get("name") or "")
        call = Call(part, args, buffer)
        candidate.parts.append(call)
        if arguments is None:
            candidate.streamed = call
        else:
            buffer.arguments.append(arguments)
            buffer.done = True

    # --- the response -------------------------------------------------------------------------------------

    def native(self, warnings: list[str]) -> dict[str, Any] | None:
        if not self._top:
            return None
        response = dict(self._top)
        if self._candidates:
            response["candidates"] = [self._candidates[index].render() for index in sorted(self._candidates)]
        elif response.get("candidates", ()) is None:
            response["candidates"] = []
        return response

    @staticmethod
    def native_usage(native: dict[str, Any]) -> dict[str, Any] | None:
        usage = native.get("usageMetadata")
        return usage if isinstance(usage, dict) else None


def _arguments(arguments: PartialArguments, more: list[Fragment], position: int, where: str) -> str:
    """The JSON text of a call's arguments once it closes; a ChunkError if orjson cannot write them."""
    try:
        return orjson.dumps(arguments.value(more)).decode()
    except orjson.JSONEncodeError as exc:
        reject(position, f"{where}.functionCall: arguments cannot be written as JSON ({exc})")


def _error(error: Any) -> dict[str, Any] | str:
    """A Gemini error in the record's terms: its ``code`` is the HTTP status, its ``status`` the error's code."""
    if not isinstance(error, dict):
        return error if isinstance(error, str) else "upstream error"
    return {**error, "code": error.get("status"), "status": error.get("code")}


def _blocked(feedback: Any) -> bool:
    return isinstance(feedback, dict) and isinstance(feedback.get("blockReason"), str)


def _created(create_time: str | None) -> int | None:
    """``createTime`` (RFC 3339) as Unix seconds, the chat ``created``; None when absent or unreadable."""
    if not create_time:
        return None
    try:
        return int(datetime.fromisoformat(create_time.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def chat_usage(usage: dict[str, Any]) -> dict[str, Any] | None:
    """Gemini ``usageMetadata`` in the chat shape.

    Gemini leaves zero counts out. ``prompt_tokens`` is ``promptTokenCount`` plus ``toolUsePromptTokenCount``
    (the results of tools it ran, read as input); ``completion_tokens`` is ``candidatesTokenCount`` plus
    ``thoughtsTokenCount``, as OpenAI counts reasoning in; ``total_tokens`` is Gemini's own. Cached input is
    ``prompt_tokens_details.cached_tokens``, thoughts ``completion_tokens_details.reasoning_tokens``.
    """
    prompt, tool = count(usage.get("promptTokenCount")), count(usage.get("toolUsePromptTokenCount"))
    output, thoughts = count(usage.get("candidatesTokenCount")), count(usage.get("thoughtsTokenCount"))
    total, cached = count(usage.get("totalTokenCount")), count(usage.get("cachedContentTokenCount"))
    if prompt is None and tool is None and output is None and thoughts is None and total is None:
        return None  # Vertex's {"trafficType": ...} before the counts arrive
    prompt_tokens = (prompt or 0) + (tool or 0)
    completion_tokens = (output or 0) + (thoughts or 0)
    chat: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": total if total is not None else prompt_tokens + completion_tokens}
    if cached is not None:
        chat["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts is not None:
        chat["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return chat
