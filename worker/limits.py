"""What one request may cost a worker: the limits, and the checks the hot path can afford.

A producer is not trusted to be reasonable. Without bounds, one request can hold a worker's memory (a
stream of a million chunks, a chunk of a gigabyte) or carry JSON nested so deep that the result record
cannot be encoded. Crossing a limit fails that request alone, with an error of type ``limit_exceeded``
that names the setting; the worker and every other request carry on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streamfold.settings import Settings

# A JSON string, escapes included: what the depth scan skips, since brackets inside text do not nest.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request bounds, from settings (``STREAMFOLD_MAX_*``)."""

    chunk_bytes: int = Settings.model_fields["max_chunk_bytes"].default
    chunks: int = Settings.model_fields["max_chunks"].default
    request_bytes: int = Settings.model_fields["max_request_bytes"].default
    json_depth: int = Settings.model_fields["max_json_depth"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_chunk_bytes, settings.max_chunks, settings.max_request_bytes,
                   settings.max_json_depth)

    def payload_problem(self, payload: bytes) -> str | None:
        """What is wrong with one payload's size or nesting, naming the setting; None when it is fine."""
        if len(payload) > self.chunk_bytes:
            return f"payload of {len(payload)} bytes is larger than STREAMFOLD_MAX_CHUNK_BYTES={self.chunk_bytes}"
        if json_depth_exceeds(payload, self.json_depth):
            return f"JSON nested deeper than STREAMFOLD_MAX_JSON_DEPTH={self.json_depth}"
        return None


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text ``raw`` nests objects and lists more than ``limit`` deep.

    Nesting deeper than the brackets a text holds is impossible, and counting them runs at C speed: nearly
    every chunk is cleared by that alone. Only a text with more brackets than the limit is scanned, with its
    strings taken out first. Malformed JSON gives some answer; the parser rejects it anyway.
    """
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    depth = 0
    for byte in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
