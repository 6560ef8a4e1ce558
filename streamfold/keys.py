"""Every Redis key, stream and channel name Streamfold uses, and nothing else.

Layout, for a namespace ``ns`` and a shard tag ``{sNN}``::

    ns:in:{sNN}:requests          control stream; one entry per request, read by the worker group
    ns:in:{sNN}:chunks:<rid>      one request's envelopes, in order (start, chunks, end or error)
    ns:in:{sNN}:cancel:<rid>      set by a backend to cancel a request
    ns:in:{sNN}:owner:<rid>       the token of the producer that started <rid>; another producer is refused
    ns:in:{sNN}:wake:<reader>     appended to when a gateway process starts following a stream of the shard,
                                  so that its one blocking read of the shard's streams returns to include it
    ns:in:idem:<tenant>:<key>     a gateway Idempotency-Key: the request id it started and its body's hash
    ns:in:{runners}:leases        sorted set: call runner name -> its lease's expiry (ms, Redis's clock)
    ns:in:{runners}:calls:<name>  hash: request id -> re-runs so far, for every call runner <name> holds
    ns:in:{runners}:stats         hash: call runner name -> its stats record (JSON), for ``producer runners``
    ns:out:{sNN}:results          result records, in finish order
    ns:out:{sNN}:result:<rid>     one result record, for lookup, with a TTL
    ns:out:{sNN}:done:<rid>       finish marker: the first finisher wins, later ones are no-ops
    ns:out:{sNN}:dead             dead letters: chunks the assembler rejected, with the reason
    ns:usage:{sNN}:events         usage events for analytics
    ns:out:notify:<rid>           pub/sub channel announcing that <rid> has a result
    ns:out:workers                hash: consumer name -> that worker's stats record (JSON), for ``stats``
    ns:out:housekeeping           lease: the one worker holding it does the pool's housekeeping this round

Why this shape:
- Redis Cluster: everything one finish touches carries the same ``{sNN}`` hash tag, so the finish script,
  the producer's start transaction and a worker's multi-stream reads stay in one slot. A request's shard is
  a stable hash of its id; ``shards`` spreads load across cluster nodes. The two pool-wide keys carry no
  tag: each is one key, touched by single-key commands only. The call runners' keys share the tag
  ``{runners}``, so that a takeover moves a lost runner's calls in one script on one slot.
- Least privilege: producers (call runners included) write only ``ns:in:*``, analytics read only
  ``ns:usage:*``, backends read ``ns:out:*``; workers read ``ns:in:*`` and write ``ns:out:*`` and ``ns:usage:*``.
- Two namespaces on one Redis share no key.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def shard_of(request_id: str, shards: int) -> int:
    """The shard a request lives in: a stable hash, the same in every process and language."""
    return zlib.crc32(request_id.encode()) % shards


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one namespace; build once from settings and pass around."""

    namespace: str = "streamfold"
    shards: int = 1

    def tag(self, shard: int) -> str:
        return f"{{s{shard:02d}}}"

    def shard_ids(self) -> range:
        return range(self.shards)

    def shard(self, request_id: str) -> int:
        return shard_of(request_id, self.shards)

    # --- producer side (ns:in:*) -------------------------------------------------------------------
    def requests(self, shard: int) -> str:
        return f"{self.namespace}:in:{self.tag(shard)}:requests"

    def chunks(self, request_id: str) -> str:
        return f"{self.namespace}:in:{self.tag(self.shard(request_id))}:chunks:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.namespace}:in:{self.tag(self.shard(request_id))}:cancel:{request_id}"

    def owner(self, request_id: str) -> str:
        return f"{self.namespace}:in:{self.tag(self.shard(request_id))}:owner:{request_id}"

    def wake(self, shard: int, reader: str) -> str:
        return f"{self.namespace}:in:{self.tag(shard)}:wake:{reader}"

    def idempotency(self, tenant: str, key: str) -> str:
        return f"{self.namespace}:in:idem:{tenant}:{key}"

    # --- call runners (ns:in:{runners}:*) -----------------------------------------------------------
    def runner_leases(self) -> str:
        return f"{self.namespace}:in:{{runners}}:leases"

    def runner_calls(self, runner: str) -> str:
        return f"{self.namespace}:in:{{runners}}:calls:{runner}"

    def runner_stats(self) -> str:
        return f"{self.namespace}:in:{{runners}}:stats"

    # --- worker output (ns:out:*) --------------------------------------------------------------------
    def results(self, shard: int) -> str:
        return f"{self.namespace}:out:{self.tag(shard)}:results"

    def result(self, request_id: str) -> str:
        return f"{self.namespace}:out:{self.tag(self.shard(request_id))}:result:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.namespace}:out:{self.tag(self.shard(request_id))}:done:{request_id}"

    def dead_letters(self, shard: int) -> str:
        return f"{self.namespace}:out:{self.tag(shard)}:dead"

    def notify(self, request_id: str) -> str:
        return f"{self.namespace}:out:notify:{request_id}"

    def workers(self) -> str:
        return f"{self.namespace}:out:workers"

    def housekeeping(self) -> str:
        return f"{self.namespace}:out:housekeeping"

    # --- analytics (ns:usage:*) ----------------------------------------------------------------------
    def usage(self, shard: int) -> str:
        return f"{self.namespace}:usage:{self.tag(shard)}:events"
