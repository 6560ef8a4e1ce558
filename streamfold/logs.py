"""Structured logs: one event a line, as readable text or as JSON, set up in one place.

Code logs *events* - a short, stable name and fields - through ``EventLog``, never prose with values pasted
in, so that a log pipeline can filter on ``event`` and ``request_id`` without parsing sentences::

    log = EventLog(logging.getLogger("streamfold.worker"), worker="host-1-ab12cd")
    log.info("request_finished", request_id="r1", status="completed", chunks=12)

``--log-format text`` (the default, for people at a terminal)::

    2025-01-02 10:00:00,123 INFO streamfold.worker: request_finished request_id=r1 status=completed chunks=12 ...

``--log-format json`` (for production log pipelines)::

    {"ts":"2025-01-02T10:00:00.123Z","level":"info","event":"request_finished","request_id":"r1",
     "worker":"host-1-ab12cd","logger":"streamfold.worker","status":"completed","chunks":12}

``request_id`` and ``worker`` are on every JSON line (null where they do not apply). Records from other
libraries (redis-py, rq) come out the same way, their message as the event.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

import orjson

from streamfold.errors import ConfigError

LOG_FORMATS = ("text", "json")
# The LogRecord attribute that carries an event's fields from EventLog to the formatters.
_FIELDS = "event_fields"


class EventLog:
    """A logger that writes events: a name plus fields, with context (such as the worker) on every one."""

    def __init__(self, logger: logging.Logger, **context: Any) -> None:
        self.logger = logger
        self.context = context

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error event with the exception being handled, traceback included."""
        self._emit(logging.ERROR, event, fields, exc_info=True)

    def log(self, level: int, event: str, **fields: Any) -> None:
        self._emit(level, event, fields)

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        # Checked first: debug events sit on the worker's hot path, and building their fields costs.
        if self.logger.isEnabledFor(level):
            self.logger.log(level, event, extra={_FIELDS: {**fields, **self.context}}, stacklevel=3,
                            exc_info=exc_info)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, event, request_id, worker, logger, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, _FIELDS, None) or {})
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "request_id": fields.pop("request_id", None),
            "worker": fields.pop("worker", None),
            "logger": record.name,
        }
        for name, value in fields.items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """A readable line: time, level, logger, event, then ``name=value`` for each field."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802  (logging's own name)
        text = super().formatMessage(record)
        fields: dict[str, Any] = getattr(record, _FIELDS, None) or {}
        return " ".join([text, *(f"{name}={_text_value(value)}" for name, value in fields.items())])


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``text`` or ``json``; ConfigError for anything else."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ConfigError(f"unknown log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")


def configure_logging(log_format: str = "text", level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """A process's one logging setup: every record, one line each, on stderr (or ``stream``)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(char.isspace() or char in "\"=" for char in value):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return orjson.dumps(value, default=str).decode()
