"""``python -m producer follow``: a request's events shown at a terminal, or as JSON lines for a program.

Text mode writes the first choice's content to standard output as it arrives and nothing else, so that
``follow RID > answer.txt`` holds exactly the final content; reasoning, tool calls (once complete), other
choices' notes and how the request ended go to standard error. One exception: when the upstream call was
retried after text was shown, the retry's text follows what was shown already - standard error says so, and
the exit status is 3.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

import orjson

from worker.live import AttemptRestarted, Final, LiveEvent, TextDelta, ToolCallDone, event_json

# Exit statuses: the request completed; it failed or is incomplete; what was printed was superseded by a retry.
COMPLETED, NOT_COMPLETED, SUPERSEDED = 0, 1, 3


def show_events(events: Iterable[LiveEvent], out: IO[str], err: IO[str], *, as_json: bool = False) -> int:
    """Write the events as they come; returns the exit status the final record calls for."""
    record: dict[str, Any] | None = None
    printed = superseded = False
    for event in events:
        if as_json:
            out.write(orjson.dumps(event_json(event)).decode() + "\n")
            out.flush()
        elif isinstance(event, TextDelta) and event.choice == 0 and event.field == "content":
            if event.reset and printed:
                superseded = True
                err.write("\n[the upstream replaced the text so far; its new text follows]\n")
            out.write(event.text)
            out.flush()
            printed = printed or bool(event.text)
        elif isinstance(event, TextDelta) and event.field != "content":
            err.write(event.text)
            err.flush()
        elif isinstance(event, ToolCallDone):
            err.write(f"\n[tool call {event.index} of choice {event.choice}: {event.name} {event.arguments}]\n")
        elif isinstance(event, AttemptRestarted):
            superseded = superseded or printed
            err.write(f"\n[the upstream call was retried (attempt {event.attempt}); what follows replaces it]\n")
        if isinstance(event, Final):
            record = event.record
    if record is None:
        return NOT_COMPLETED
    if not as_json:
        _closing_note(record, out, err, printed=printed)
    if superseded and not as_json:
        return SUPERSEDED
    return COMPLETED if record.get("status") == "completed" else NOT_COMPLETED


def _closing_note(record: dict[str, Any], out: IO[str], err: IO[str], *, printed: bool) -> None:
    if printed and out.isatty():
        out.write("\n")
    status, error = record.get("status"), record.get("error") or {}
    choices = (record.get("completion") or {}).get("choices") or []
    if len(choices) > 1:
        err.write(f"[{len(choices)} choices; only the first is printed: see --json or `producer result`]\n")
    if status != "completed":
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        err.write(f"[request {record.get('request_id')} ended {status}{reason}]\n")
    err.flush()
    out.flush()
