"""The worker's one seam to Redis: every stream and key command the worker uses, behind a few verbs.

    ensure_group    create the consumer group on each shard's control stream
    claim           take new requests (and, after a start or a lost reply, re-read this consumer's own)
    read            read in-flight requests' chunk streams from their cursors, one XREAD per shard
    finish          publish results and release inputs, atomically (worker/lua/finish.lua)
    heartbeat       keep claims on in-flight requests fresh, owner-checked (worker/lua/touch.lua)
    hand_back       make claims recoverable by peers at once, owner-checked (same script)
    recover_stalled take over requests whose owner stopped heartbeating (XAUTOCLAIM)
    leave           remove this consumer from the group when it owns nothing

Every command and script touches keys of one shard slot. Trimming the control stream is housekeeping's
(worker/housekeeping.py), done by one worker of the pool at a time. redis-py connection errors and
timeouts - a blocking read that outlives the socket timeout included: Redis did not answer - leave this
module as ``RedisUnavailable``, other refusals as ``RedisRefused``.

Nothing one producer writes fails a call for the others: a control entry that names no valid request id is
dead-lettered and acknowledged on its own; a chunk-stream key that holds another type fails the read with
``StreamsRefused`` naming the requests concerned, so the worker fails those and reads the rest again; a
finish script that Redis refuses for one request leaves that request alone unfinished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from streamfold.connection import cannot_serve
from streamfold.contract import Fields, decode_request_id
from streamfold.errors import ContractError, RedisRefused, RedisUnavailable, StreamfoldError
from streamfold.keys import Keys
from streamfold.settings import Settings
from worker.request import DeadLetter

Entry = tuple[str, Fields]
_IGNORED_BLOCK_PAUSE = 0.01
# finish.lua's answers, besides 0: finished before by the same request.
_PUBLISHED, _REUSED = 1, -1


class StreamsRefused(StreamfoldError):
    """A read failed because some requests' chunk-stream keys hold another type; ``problems`` says, by
    request id, what each holds. The other requests can be read again without them."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__(f"chunk streams of {len(problems)} requests are not streams")


@dataclass(frozen=True, slots=True)
class Claim:
    """A control entry this consumer now owns, naming the request it hands out."""

    shard: int
    entry_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Everything one finish publishes and releases. ``token`` is the start's producer token: a request
    finished before under another token was a different request that reused the id."""

    request_id: str
    entry_ids: Sequence[str]
    status: str
    result: bytes
    usage: bytes
    dead_letter: DeadLetter | None = None
    token: str | None = None
    finished_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """What one finish did: ``published`` the result, or found it finished before; ``reused`` when that
    earlier finish was of another producer's request under the same id (this one is dead-lettered, not
    published); ``refused`` is Redis's reason when it refused this finish, which then changed nothing."""

    published: bool
    reused: bool = False
    refused: str | None = None


class Broker:
    """The Redis side of one worker (one consumer of the group)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, group: str, consumer: str, read_count: int,
                 result_ttl: int, chunk_ttl: int, claim_timeout_ms: int) -> None:
        self.client, self.keys, self.group, self.consumer = client, keys, group, consumer
        # redis-py types replies as unions of every shape a protocol allows; a client built by connect()
        # gets the shapes parsed here, which the tests check on fakeredis and on Redis.
        self._redis: Any = client
        self._read_count, self._claim_timeout_ms = read_count, claim_timeout_ms
        self._result_ttl, self._chunk_ttl = result_ttl, chunk_ttl
        self._finish: Script = client.register_script(lua_source("finish"))
        self._touch: Script = client.register_script(lua_source("touch"))
        self._leave: Script = client.register_script(lua_source("leave"))
        self._shards = list(keys.shard_ids())
        self._group_ready = False
        # Shards where entries may sit in this consumer's pending list unseen: all of them at start (a
        # restart under the same name), and any whose XREADGROUP reply was lost.
        self._unseen = set(self._shards)
        # The newest control entry seen per shard: a chunk read also watches the control stream from
        # here, so a busy worker with room wakes for a new request instead of sleeping out its block.
        self._control_seen = {shard: "0-0" for shard in self._shards}
        self._control_keys = {keys.requests(shard).encode(): shard for shard in self._shards}
        # Each in-flight request's shard and chunk stream name, asked for on every read: computed once.
        self._streams: dict[str, tuple[int, bytes]] = {}
        # Shards whose control stream had nothing left to claim at the last look and, as far as the
        # watching reads since then show, still has nothing.
        self._quiet: set[int] = set()
        self._turn = 0

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings, consumer: str) -> Broker:
        return cls(client, settings.keys, group=settings.group, consumer=consumer, read_count=settings.read_count,
                   result_ttl=settings.result_ttl, chunk_ttl=settings.chunk_ttl,
                   claim_timeout_ms=int(settings.claim_timeout * 1000))

    def ensure_group(self) -> None:
        """Create the group on every shard's control stream (and the stream) unless it exists."""
        with self._unavailable():
            for shard in self._shards:
                key = self.keys.requests(shard)
                try:
                    self._redis.xgroup_create(key, self.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                newest = self._redis.xrevrange(key, count=1)
                if newest:
                    self._saw_control(shard, newest[0][0])
        self._group_ready = True

    def claim(self, count: int, *, block_ms: int = 0, skip_quiet: bool = False) -> list[Claim]:
        """Take up to ``count`` new requests, blocking up to ``block_ms`` if there are none.

        Own pending entries that may be unseen come first, beyond ``count``: the caller skips those it
        serves already and leaves the rest for recovery. ``skip_quiet`` does not ask a shard that had
        nothing left at its last claim and has shown nothing new to watching reads since (under load that
        saves a round trip on each turn of the loop).
        """
        if not self._group_ready:
            self.ensure_group()
        with self._unavailable():
            claims = self._claim_unseen()
            several = len(self._shards) > 1
            for shard in self._rotation():
                if len(claims) >= count:
                    break
                if skip_quiet and not block_ms and shard in self._quiet:
                    continue
                claims += self._read_group(shard, count - len(claims), 0 if several else block_ms)
            if not claims and block_ms and several:
                claims = self._read_group(self._rotation()[0], count, _slice(block_ms, len(self._shards)))
        return claims

    def read(self, cursors: Mapping[str, str], *, watch: bool = False, block_ms: int = 0) -> dict[str, list[Entry]]:
        """New entries of each request's chunk stream after its cursor, by request id.

        Blocks up to ``block_ms`` when no stream has any. With ``watch``, a new control entry also ends
        the wait (it is not returned: ``claim`` takes it).
        """
        # Stream names go out as bytes: redis-py packs them faster, and a read names every request in flight.
        plans: dict[int, dict[bytes, str]] = {}
        owners: dict[bytes, str] = {}
        streams = self._streams
        for request_id, cursor in cursors.items():
            place = streams.get(request_id)
            if place is None:
                place = streams[request_id] = (self.keys.shard(request_id), self.keys.chunks(request_id).encode())
            shard, stream = place
            plans.setdefault(shard, {})[stream] = cursor
            owners[stream] = request_id
        if watch:
            for key, shard in self._control_keys.items():
                plans.setdefault(shard, {})[key] = self._control_seen[shard]
        else:
            self._quiet.clear()  # unwatched, a control stream may fill up unseen
        if not plans:
            return {}
        with self._unavailable():
            try:
                replies = self._read_plans(list(plans.values()), block_ms)
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                raise StreamsRefused(self._not_streams(owners)) from exc
        batches: dict[str, list[Entry]] = {}
        for key, entries in replies:
            owner = owners.get(key)
            if owner is None:
                shard = self._control_keys[key]
                self._saw_control(shard, entries[-1][0])
                self._quiet.discard(shard)
            else:
                batches[owner] = [(entry_id.decode(), fields) for entry_id, fields in entries]
        return batches

    def finish(self, finishes: Sequence[Finish]) -> list[Finished]:
        """Run the finish script for each request, in one round trip; what each did, in order."""
        calls = [self._finish_call(finish) for finish in finishes]
        with self._unavailable():
            replies = self._run_script(self._finish, calls, raise_on_error=False)
        done = []
        for finish, reply in zip(finishes, replies):
            if isinstance(reply, redis.RedisError):
                if cannot_serve(reply):
                    raise RedisUnavailable(f"Redis unavailable: {type(reply).__name__}: {reply}") from reply
                done.append(Finished(False, refused=str(reply)))
                continue
            self._streams.pop(finish.request_id, None)
            done.append(Finished(reply == _PUBLISHED, reused=reply == _REUSED))
        return done

    def heartbeat(self, claims: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Refresh the claims on these requests' control entries; returns, by request, the entries still
        owned (requests with none left are missing)."""
        owned = self._touch_all(claims, idle_ms=0)
        for request_id in claims.keys() - owned.keys():
            self._streams.pop(request_id, None)  # taken over by a peer: no longer read here
        return owned

    def hand_back(self, claims: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Mark these claims idle for a whole claim timeout, so that a peer's recovery takes them at once."""
        for request_id in claims:
            self._streams.pop(request_id, None)
        return self._touch_all(claims, idle_ms=self._claim_timeout_ms)

    def recover_stalled(self, count: int) -> list[Claim]:
        """Take over up to ``count`` requests that went a claim timeout without a heartbeat."""
        if not self._group_ready:
            self.ensure_group()
        claims: list[Claim] = []
        with self._unavailable():
            for shard in self._rotation():
                key, cursor = self.keys.requests(shard), b"0-0"
                while len(claims) < count:
                    reply = self._redis.xautoclaim(key, self.group, self.consumer, self._claim_timeout_ms,
                                                   cursor, count=count - len(claims))
                    cursor, entries, deleted = reply[0], reply[1], reply[2] if len(reply) > 2 else []
                    # Ids deleted from the stream (Redis 7 has already dropped them from the pending list).
                    claims += self._claims(shard, entries, junk=deleted)
                    if cursor in (b"0-0", "0-0"):
                        break
        return claims

    def leave(self) -> None:
        """Remove this consumer from the group on every shard where it owns no pending entry."""
        with self._unavailable():
            self._run_script(self._leave, [([self.keys.requests(shard)], [self.group, self.consumer])
                                           for shard in self._shards])

    # --- helpers ---------------------------------------------------------------------------------------

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            self._quiet.clear()
            if cannot_serve(exc):
                raise RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
            if "NOGROUP" not in str(exc):
                raise RedisRefused(f"Redis refused: {exc}") from exc
            # The stream or group is gone (a Redis restarted without persistence, a flush): create it
            # again on the next claim, and meanwhile treat Redis as not there.
            self._group_ready = False
            raise RedisUnavailable(f"consumer group missing: {exc}") from exc

    def _not_streams(self, owners: Mapping[bytes, str]) -> dict[str, str]:
        """Which of these requests' chunk-stream keys hold another type than a stream, and what each holds.

        A control stream of another type is the pool's problem, not one request's: RedisRefused."""
        names = [*owners, *self._control_keys]
        with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.type(name)
            types = [kind.decode() if isinstance(kind, bytes) else str(kind) for kind in pipe.execute()]
        wrong = {name: kind for name, kind in zip(names, types) if kind not in ("stream", "none")}
        broken = [f"{name.decode()} holds a {kind}" for name, kind in wrong.items() if name in self._control_keys]
        if broken:
            raise RedisRefused(f"control streams are not streams: {'; '.join(broken)}")
        return {owners[name]: f"its chunk stream key {name.decode()} holds a {kind}, not a stream"
                for name, kind in wrong.items()}

    def _claim_unseen(self) -> list[Claim]:
        claims: list[Claim] = []
        for shard in sorted(self._unseen):
            key, cursor = self.keys.requests(shard), "0"
            while True:
                reply = self._redis.xreadgroup(self.group, self.consumer, {key: cursor}, count=self._read_count)
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                claims += self._claims(shard, entries)
                cursor = entries[-1][0]
            self._unseen.discard(shard)
        return claims

    def _read_group(self, shard: int, count: int, block_ms: int) -> list[Claim]:
        key = self.keys.requests(shard)
        self._unseen.add(shard)  # until the reply is in hand: a lost reply leaves entries pending, unseen
        reply = self._blocking(lambda: self._redis.xreadgroup(self.group, self.consumer, {key: ">"}, count=count,
                                                              block=block_ms or None), block_ms)
        self._unseen.discard(shard)
        entries = reply[0][1] if reply else []
        if entries:
            self._saw_control(shard, entries[-1][0])
        if len(entries) < count:
            self._quiet.add(shard)
        else:
            self._quiet.discard(shard)
        return self._claims(shard, entries)

    def _saw_control(self, shard: int, entry_id: bytes) -> None:
        self._control_seen[shard] = max(self._control_seen[shard], entry_id.decode(), key=parse_id)

    def _claims(self, shard: int, entries: Sequence[Any], junk: Sequence[bytes] = ()) -> list[Claim]:
        """Claims from control entries. Entries that name no valid request id are dead-lettered with the
        reason and acknowledged, each on its own; ``junk`` (ids deleted from the stream) only acknowledged."""
        claims: list[Claim] = []
        rejected: list[tuple[bytes, bytes, str]] = []
        for entry_id, fields in entries:
            raw = (fields or {}).get(b"rid")
            try:
                if not raw:
                    raise ContractError("control entry without a request id")
                claims.append(Claim(shard, entry_id.decode(), decode_request_id(raw)))
            except ContractError as exc:
                rejected.append((entry_id, raw or b"", str(exc)))
        if junk or rejected:
            key = self.keys.requests(shard)
            with self._redis.pipeline(transaction=True) as tx:  # one slot: the dead letter and its ack together
                for entry_id, raw, reason in rejected:
                    tx.xadd(self.keys.dead_letters(shard), {"rid": raw, "entry": entry_id, "reason": reason, "d": b""})
                tx.xack(key, self.group, *junk, *(entry_id for entry_id, _, _ in rejected))
                tx.execute()
        return claims

    def _read_plans(self, plans: list[dict[bytes, str]], block_ms: int) -> list[tuple[bytes, list[Any]]]:
        """One XREAD per shard: a single one blocks; several go in one round trip, then one blocks briefly."""
        if len(plans) == 1:
            return self._xread(plans[0], block_ms)
        with self._redis.pipeline(transaction=False) as pipe:
            for plan in plans:
                pipe.xread(plan, count=self._read_count)
            replies = [stream for reply in pipe.execute() for stream in (reply or [])]
        if replies or not block_ms:
            return replies
        # Streams of different slots cannot share one blocking read; wait on each shard in turn.
        self._turn += 1
        return self._xread(plans[self._turn % len(plans)], _slice(block_ms, len(plans)))

    def _xread(self, plan: dict[bytes, str], block_ms: int) -> list[tuple[bytes, list[Any]]]:
        reply = self._blocking(lambda: self._redis.xread(plan, count=self._read_count, block=block_ms or None),
                               block_ms)
        return list(reply or [])

    @staticmethod
    def _blocking(read: Callable[[], Any], block_ms: int) -> Any:
        """Run a read that may block for ``block_ms``.

        A read that outlives the socket timeout (always longer than ``block_ms``) raises: Redis did not
        answer, and the worker treats that as time without Redis, which never counts as a request's silence.
        An empty reply well before ``block_ms`` means the server ignored BLOCK (fakeredis does when COUNT
        is given; a real Redis never does): pause a moment so that the loop polls instead of spinning.
        """
        started = time.monotonic()
        reply = read()
        left = block_ms / 1000 - (time.monotonic() - started)
        if not reply and left > block_ms / 2000:
            time.sleep(min(left, _IGNORED_BLOCK_PAUSE))
        return reply

    def _touch_all(self, claims: Mapping[str, Sequence[str]], idle_ms: int) -> dict[str, list[str]]:
        by_shard: dict[int, list[str]] = {}
        for request_id, entry_ids in claims.items():
            by_shard.setdefault(self.keys.shard(request_id), []).extend(entry_ids)
        shards = list(by_shard)
        calls = [([self.keys.requests(shard)], [self.group, self.consumer, idle_ms, *by_shard[shard]])
                 for shard in shards]
        with self._unavailable():
            replies = self._run_script(self._touch, calls)
        # Entry ids are per control stream: the same id can stand in two shards' streams.
        owned = {shard: {entry_id.decode() for entry_id in reply} for shard, reply in zip(shards, replies)}
        kept = {request_id: [entry for entry in entry_ids if entry in owned[self.keys.shard(request_id)]]
                for request_id, entry_ids in claims.items()}
        return {request_id: entries for request_id, entries in kept.items() if entries}

    def _run_script(self, script: Script, calls: Sequence[tuple[list[str], list[Any]]], *,
                    raise_on_error: bool = True) -> list[Any]:
        """Run ``script`` once per call in one round trip. Unlike redis-py's pipelined scripts, no SCRIPT
        EXISTS first: the script is loaded only when Redis says it lacks it, and the refused calls (which
        ran nothing) run again. Without ``raise_on_error`` a call's error is its reply."""
        results: list[Any] = [None] * len(calls)
        todo, loaded = list(range(len(calls))), False
        while todo:
            with self._redis.pipeline(transaction=False) as pipe:
                for index in todo:
                    keys, args = calls[index]
                    # As a command: redis-py's cluster pipeline refuses its evalsha method, not EVALSHA.
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                replies = pipe.execute(raise_on_error=False)
            refused = []
            for index, reply in zip(todo, replies):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    refused.append(index)
                elif isinstance(reply, Exception) and raise_on_error:
                    raise reply
                else:
                    results[index] = reply
            if refused:
                if loaded:
                    raise redis.exceptions.NoScriptError(f"script {script.sha} still missing after SCRIPT LOAD")
                self._redis.script_load(script.script)
                loaded = True
            todo = refused
        return results

    def _finish_call(self, finish: Finish) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of finish.lua, in the order its header lists them."""
        keys, rid, dead = self.keys, finish.request_id, finish.dead_letter
        shard = keys.shard(rid)
        return ([keys.done(rid), keys.results(shard), keys.result(rid), keys.usage(shard), keys.dead_letters(shard),
                 keys.requests(shard), keys.chunks(rid)],
                [self.group, self._result_ttl, self._chunk_ttl, rid, finish.result, finish.usage, finish.status,
                 keys.notify(rid), *((dead.entry_id, dead.reason, dead.payload) if dead else ("", "", b"")),
                 finish.token or "", finish.finished_at_ms, *finish.entry_ids])

    def _rotation(self) -> list[int]:
        """Shards in an order that starts one further each call, so no shard is always served last."""
        self._turn += 1
        start = self._turn % len(self._shards)
        return self._shards[start:] + self._shards[:start]


def _slice(block_ms: int, ways: int) -> int:
    return min(block_ms, max(5, block_ms // ways))


def lua_source(name: str) -> str:
    """The text of worker/lua/<name>.lua."""
    return resources.files("worker").joinpath("lua", f"{name}.lua").read_text()


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), which compare in stream order."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: bytes | str) -> tuple[int, int]:
    """The smallest id after ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return ms, seq + 1
