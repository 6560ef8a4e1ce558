"""Streamfold's producer side: reads upstream chat completion streams and pushes their chunks to Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

from producer.follow import afollow, follow
from producer.publisher import Publisher, new_request_id
from producer.results import get_result, wait_for_result

if TYPE_CHECKING:
    from producer.jobs import cancel, enqueue_chat_completion

__all__ = ["Publisher", "afollow", "cancel", "enqueue_chat_completion", "follow", "get_result", "new_request_id",
           "wait_for_result"]

_JOBS = frozenset({"cancel", "enqueue_chat_completion"})


def __getattr__(name: str) -> object:
    # rq and aiohttp load on first use of the job API, not for every process that only publishes or reads.
    if name in _JOBS:
        from producer import jobs
        return getattr(jobs, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
