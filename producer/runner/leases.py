"""A runner's lease, the calls it holds, and taking over the calls of a runner that died.

Each runner keeps a lease: its entry in ``keys.runner_leases()``, an expiry on Redis's clock that it renews
every few seconds (producer/lua/lease.lua). Before a call publishes anything, the runner records it in its
calls hash (``keys.runner_calls(name)``: request id -> re-runs so far). A runner killed with calls in flight
stops renewing; once its lease has expired, a live runner's ``take_over`` moves its calls into its own hash
(producer/lua/takeover.lua, one script on the ``{runners}`` slot, so two runners never both take one call)
and re-runs each as a new attempt. A runner that finds its own lease gone - it stalled past the lease and a
peer took its calls - drops them at once and never writes for them again (``check``, the publishing gate).

``hand_back`` ends the lease at once instead: a draining runner's calls are taken by a peer's next pass.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from importlib import resources

import orjson
import redis.asyncio

from producer.runner.publishing import patiently
from streamfold.keys import Keys

_LUA = resources.files("producer").joinpath("lua")
LEASE_SCRIPT = _LUA.joinpath("lease.lua").read_text()
TAKEOVER_SCRIPT = _LUA.joinpath("takeover.lua").read_text()


class LeaseLost(Exception):
    """This runner's lease is gone: a peer has taken its calls over."""


class Lease:
    """One runner's lease and calls hash. ``check`` is cheap while the lease was confirmed recently."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, name: str, lease_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.keys, self.name, self.lease_s = client, keys, name, lease_s
        self._clock = clock
        self._calls = keys.runner_calls(name)
        self._script = client.register_script(LEASE_SCRIPT)
        self._takeover = client.register_script(TAKEOVER_SCRIPT)
        self._confirmed_at = float("-inf")
        self.lost = False

    async def join(self) -> None:
        """Take the lease. Calls left in this runner's hash by an earlier process of the same name (a restart
        after a crash) are first set aside under a lost runner's name, for the takeover pass to re-run."""
        leftover = f"{self.name}-lost-{secrets.token_hex(3)}"
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self._calls)
            if await pipe.hlen(self._calls):
                pipe.multi()  # type: ignore[no-untyped-call]
                # As a command: a cluster pipeline refuses its rename method (both keys share {runners}).
                pipe.execute_command("RENAME", self._calls, self.keys.runner_calls(leftover))
                pipe.zadd(self.keys.runner_leases(), {leftover: 0})
                await pipe.execute()
        await self._renew("join")
        self.lost = False

    async def renew(self) -> None:
        """Extend the lease; LeaseLost when a peer took it."""
        await self._renew("renew")

    async def check(self) -> bool:
        """Whether the lease still holds, before writing for its calls: renewed within half a lease, or
        renewed now. False (and ``lost`` set) when a peer took it."""
        if not self.lost and self._clock() - self._confirmed_at > self.lease_s / 2:
            try:
                await self.renew()
            except LeaseLost:
                return False
        return not self.lost

    async def hold(self, request_id: str, reruns: int = 0) -> None:
        """Record a call before it publishes anything, so that a peer can re-run it should this runner die."""
        await patiently(lambda: self.client.hset(self._calls, request_id, reruns), "recording a call")

    async def release(self, request_ids: list[str]) -> None:
        """Forget calls that ended (their rq jobs are marked): nobody needs to re-run them."""
        if request_ids:
            await patiently(lambda: self.client.hdel(self._calls, *request_ids), "forgetting a call")

    async def expired_peers(self) -> list[str]:
        """Runners whose lease has run out, by Redis's clock. On a cluster the clock may be another node's:
        only a first pick, since takeover.lua decides on the clock of the node holding the leases."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command("TIME")  # not pipe.time(), which a cluster pipeline refuses
            pipe.zrange(self.keys.runner_leases(), 0, -1, withscores=True)
            (seconds, micros), leases = await pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        expired = (bytes(name).decode() for name, expiry in leases if expiry < now_ms)
        return [name for name in expired if name != self.name]

    async def take_over(self, peer: str, limit: int) -> list[tuple[str, int]]:
        """Move up to ``limit`` calls of ``peer`` (lease expired) into this runner's hash; returns each
        (request id, re-runs so far). Empty when the peer renewed meanwhile or another runner was quicker."""
        keys = [self.keys.runner_leases(), self.keys.runner_calls(peer), self._calls]
        reply = await self._takeover(keys=keys, args=[peer, self.name, limit])
        return [(reply[i].decode(), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def hand_back(self) -> None:
        """End the lease now, keeping the calls recorded: peers take them over at their next pass."""
        await self.client.zadd(self.keys.runner_leases(), {self.name: 0})

    async def leave(self) -> None:
        """A clean exit, nothing held: the lease, the (empty) calls hash and the stats record go."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.runner_leases(), self.name)
            pipe.delete(self._calls)
            pipe.hdel(self.keys.runner_stats(), self.name)
            await pipe.execute()

    async def publish(self, record: dict[str, object]) -> None:
        await self.client.hset(self.keys.runner_stats(), self.name, orjson.dumps(record))

    async def _renew(self, how: str) -> None:
        asked_at = self._clock()
        expiry = await self._script(keys=[self.keys.runner_leases()], args=[self.name, int(self.lease_s * 1000), how])
        if int(expiry) < 0:
            self.lost = True
            raise LeaseLost(f"runner {self.name}'s lease is gone: a peer took its calls over")
        # Measured from when the renewal was asked for: the lease cannot have started any later.
        self._confirmed_at = asked_at
