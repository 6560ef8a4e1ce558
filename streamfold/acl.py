"""Least privilege: the Redis ACL rules of each role, derived from the namespace's key layout.

    producer    a Publisher, the call runner: writes ``ns:in:*`` (chunks, and the runners' leases under
                ``ns:in:{runners}:*``) and rq's ``rq:*`` to take and report jobs; reads neither results nor usage
    worker      the stream worker, with stats, health and housekeeping: reads and acknowledges ``ns:in:*``,
                writes ``ns:out:*`` and ``ns:usage:*``, publishes on the notify channels
    backend     enqueues, cancels, waits for, reads and follows requests, and runs the HTTP gateway: reads
                ``ns:out:*`` (never writes it), reads and writes ``ns:in:*`` (a cancel, an idempotency key, a
                request it fails before its job started), uses rq; never sees usage events
    analytics   reads usage events through consumer groups of its own: ``ns:usage:*`` only

``python -m worker acl --role ROLE`` prints one ``ACL SETUSER`` line. Every rule a role needs is here, checked by
running each role's own code as that user on a real Redis (tests/test_acl.py), which also shows each role is
refused outside its keys. Commands a script runs are checked against the same user, so a role that runs a
script is allowed the commands inside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from streamfold.keys import Keys

ROLES = ("producer", "worker", "backend", "analytics")

# rq keeps everything under rq:* (jobs, queues, registries, workers) and talks on rq:* channels. A role that
# uses rq gets those keys with any command but the administrative and dangerous ones - plus INFO, which rq
# reads for the server's version - in a selector of their own, so no other key gets that latitude.
_RQ_SELECTOR = "(~rq:* &rq:* +@all -@admin -@dangerous +info +client|setname +client|getname)"
# A cluster client reads the slot layout and the command table (for each command's key positions) first.
_ALWAYS = ("+ping", "+hello", "+auth", "+select", "+client|setname", "+client|getname", "+multi", "+exec",
           "+discard", "+watch", "+unwatch", "+cluster|slots", "+cluster|shards", "+command")
_SCRIPTS = ("+evalsha", "+eval", "+script|load", "+script|exists")
_PRODUCE = ("+xadd", "+expire", "+get", "+set", "+mget", "+del", "+exists", "+xrevrange", "+xrange", "+xlen")
# The call runners' leases and held calls (``ns:in:{runners}:*``: a sorted set and hashes).
_RUNNERS = ("+zadd", "+zrange", "+zrem", "+zscore", "+hset", "+hget", "+hdel", "+hgetall", "+hlen", "+time")
_STREAM_READ = ("+xread", "+xrange", "+xrevrange", "+xlen", "+exists", "+get", "+type")


@dataclass(frozen=True, slots=True)
class RoleRules:
    """One role's rules: commands, key patterns (``~`` read and write, ``%R~`` read only), channels, and
    selectors (each a set of commands allowed on keys of its own)."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]
    channels: tuple[str, ...] = ()
    selectors: tuple[str, ...] = ()

    def tokens(self) -> list[str]:
        commands = list(dict.fromkeys(self.commands))  # once each, in order
        return [*commands, *self.keys, *(f"&{channel}" for channel in self.channels), *self.selectors]


def rules(role: str, keys: Keys) -> RoleRules:
    """The ACL rules of ``role`` for the namespace of ``keys``; ValueError for a role there is not."""
    ns = keys.namespace
    inside, outside, usage = f"{ns}:in:*", f"{ns}:out:*", f"{ns}:usage:*"
    notify = f"{ns}:out:notify:*"
    if role == "producer":
        return RoleRules((*_ALWAYS, *_SCRIPTS, *_PRODUCE, *_RUNNERS), (f"~{inside}",), selectors=(_RQ_SELECTOR,))
    if role == "worker":
        commands: tuple[str, ...] = (*_ALWAYS, *_SCRIPTS, *_STREAM_READ, "+xreadgroup", "+xack", "+xautoclaim", "+xclaim",
                    "+xpending", "+xgroup|create", "+xgroup|delconsumer", "+xinfo|groups", "+xinfo|consumers",
                    "+xinfo|stream", "+xtrim", "+xadd", "+set", "+del", "+expire", "+publish", "+hset", "+hget",
                    "+hgetall", "+hdel", "+time", "+pexpire")
        return RoleRules(commands, (f"~{inside}", f"~{outside}", f"~{usage}"), channels=(notify,))
    if role == "backend":
        commands = (*_ALWAYS, *_SCRIPTS, *_PRODUCE, *_STREAM_READ, "+subscribe", "+unsubscribe", "+psubscribe",
                    "+punsubscribe")
        return RoleRules(commands, (f"~{inside}", f"%R~{outside}"), channels=(notify,), selectors=(_RQ_SELECTOR,))
    if role == "analytics":
        commands = (*_ALWAYS, "+xreadgroup", "+xack", "+xgroup|create", "+xrange", "+xrevrange", "+xread",
                    "+xpending", "+xinfo|groups", "+xinfo|stream", "+xlen")
        return RoleRules(commands, (f"~{usage}",))
    raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")


def setuser(role: str, keys: Keys, *, user: str | None = None, password: str | None = None) -> list[str]:
    """The arguments of ``ACL SETUSER`` that give ``user`` (default: ``<namespace>-<role>``) exactly the role.

    It starts with ``reset``, so running it again replaces whatever the user had. With a password the user is
    switched on, the password given as its SHA-256 (``#...``), so the line itself never holds the password;
    without one the user stays off until a password is added (``ACL SETUSER <user> on >...``).
    """
    name = user or f"{keys.namespace}-{role}"
    access = ["on", "#" + hashlib.sha256(password.encode()).hexdigest()] if password else ["off"]
    return [name, "reset", *access, *rules(role, keys).tokens()]
