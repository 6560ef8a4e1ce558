"""Every error Streamfold raises on purpose, under one root.

    StreamfoldError
    ├── ChunkError            a chunk that cannot be read in its stream's dialect (names its position)
    ├── ContractError         a Redis entry or record that does not follow the wire contract
    ├── ConfigError           settings that cannot work (bad upstream table, unknown mode, ...)
    ├── RedisUnavailable      Redis cannot serve for now (unreachable, timed out, read-only, loading,
    │                         out of memory): retry after a backoff
    ├── RedisRefused          Redis refused a command (an ACL, a key of the wrong type): retrying will not help
    ├── UpstreamError         the LLM upstream failed (status, message, retryable)
    └── ResultTimeout         no result arrived within the time asked for

Errors from redis-py and aiohttp are translated at the boundary (``raise ... from exc``) so callers only ever
catch these.
"""

from __future__ import annotations


class StreamfoldError(Exception):
    """Root of every error Streamfold raises on purpose."""


class ChunkError(StreamfoldError):
    """A chunk (or native event) could not be read; ``position`` is its 0-based place in the stream, when known."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        self.reason = message
        super().__init__(message if position is None else f"chunk {position}: {message}")


class ContractError(StreamfoldError):
    """A Redis entry or record does not follow the wire contract."""


class ConfigError(StreamfoldError):
    """Settings that cannot work."""


class RedisUnavailable(StreamfoldError):
    """Redis could not be reached, or the connection broke."""


class RedisRefused(StreamfoldError):
    """Redis refused a command: a permission (ACL), a key of the wrong type, a script error."""


class UpstreamError(StreamfoldError):
    """The LLM upstream answered with an error or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(message)


class ResultTimeout(StreamfoldError):
    """No result arrived within the time asked for."""
