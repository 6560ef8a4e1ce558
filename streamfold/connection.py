"""The one place a Redis client is built from settings, and redis-py's errors are told apart."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.connection import HiredisRespSerializer, parse_url
import redis.asyncio.cluster
import redis.cluster

from streamfold.errors import ConfigError
from streamfold.errors import RedisRefused, RedisUnavailable
from streamfold.settings import Settings, load_settings

# Redis cannot serve for now: lost or slow connections, a replica after a failover, no primary known to the
# Sentinels while they fail over (MasterNotFoundError, a ConnectionError).
UNAVAILABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
# Replies of a Redis that is there but cannot serve for now (out of memory, busy with a script, failing
# over, loading its data set): retried like a lost connection.
TRANSIENT_ERRORS = ("OOM", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "LOADING")


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` that returns bytes, so raw chunk payloads stay byte-exact.

    The socket timeout stays above every blocking read (``Settings`` checks it): redis-py turns a read that
    outlives its socket timeout into a TimeoutError instead of an empty answer. A URL redis-py cannot read
    is a ConfigError. ``rediss://`` speaks TLS, verifying the server's certificate and host name against
    ``redis_tls_ca`` (or the system's CAs) and presenting ``redis_tls_cert`` when set; ``redis_username``
    and ``redis_password`` replace the URL's. With ``redis_cluster``, a client of the whole cluster; with
    ``redis_sentinels``, the client is the Sentinels' current primary (``primary_through_sentinel``).
    """
    if settings.redis_cluster:
        return connect_cluster(settings)
    if settings.redis_sentinels:
        return primary_through_sentinel(settings)
    try:
        return redis.Redis.from_url(settings.redis_url, **client_options(settings))
    except ValueError as exc:  # redis-py names the part at fault, not the whole URL (it may hold a password)
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None


def connect_async(settings: Settings, *, connections: int = 100, loop_writes: bool = True) -> redis.asyncio.Redis:
    """The asyncio counterpart of ``connect``, with the same options, for code on an event loop. Its pool
    holds at most ``connections`` (per node on a cluster); a command that finds them all busy waits for one, up
    to the socket timeout (redis-py's default pool fails it at once with "Too many connections": a gateway
    relaying a thousand streams on a busy loop lost streams that way). Its connections are ``LoopConnection``s,
    standalone, through Sentinel and on a cluster alike; with ``loop_writes`` False, redis-py's own (the
    gateway's: with every cancel landing, its live page lost text it had shown after a reconnect, in about
    one run in five; not yet understood)."""
    if settings.redis_cluster:
        return connect_cluster_async(settings, connections=max(connections, 100), loop_writes=loop_writes)
    tls = settings.redis_url.startswith("rediss://")
    if settings.redis_sentinels:
        sentinel_class = (LoopSentinelSSLConnection if tls else LoopSentinelConnection) if loop_writes else (
            redis.asyncio.sentinel.SentinelManagedSSLConnection if tls
            else redis.asyncio.sentinel.SentinelManagedConnection)
        return primary_through_sentinel_async(
            settings, connection_pool_class=BlockingSentinelConnectionPool, max_connections=connections,
            timeout=settings.socket_timeout, connection_class=sentinel_class)
    plain_class = (LoopSSLConnection if tls else LoopTCPConnection) if loop_writes else (
        redis.asyncio.SSLConnection if tls else redis.asyncio.Connection)
    try:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=connections, timeout=settings.socket_timeout,
            connection_class=plain_class,
            **client_options(settings))
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
    return redis.asyncio.Redis.from_pool(pool)


class LoopConnection:
    """redis-py's asyncio connection, made fit for a busy event loop.

    Commands are packed by hiredis, in C, as redis-py's blocking connection packs them, rather than by the
    asyncio connection's pure-Python packer: every relayed chunk is a command to pack, and packing in Python
    cost the runner about a tenth of its time.

    Writes are timed by ``asyncio.timeout`` rather than redis-py's ``asyncio.wait_for``. On Python 3.11
    ``wait_for`` loses a cancel that arrives while the write it waits for has already completed (CPython
    gh-86296, fixed in 3.12) - and a local write completes at once, so nearly every cancel that lands during a
    write is lost, however often it is repeated: a cancelled task runs on, and a process waiting for its
    background loops to end never exits. redis-py writes without ``wait_for`` when the connection has no
    socket timeout, so the timeout is lifted for the write and applied around it instead.
    """

    _packer = HiredisRespSerializer()
    socket_timeout: float | None

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if timeout is None or sys.version_info >= (3, 12):
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise redis.TimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


class LoopTCPConnection(LoopConnection, redis.asyncio.Connection):
    """A plain TCP connection (``LoopConnection``)."""


class LoopSSLConnection(LoopConnection, redis.asyncio.SSLConnection):
    """A TLS connection (``rediss://``, ``LoopConnection``)."""


class LoopSentinelConnection(LoopConnection, redis.asyncio.sentinel.SentinelManagedConnection):
    """A connection to the Sentinels' current primary (``LoopConnection``)."""


class LoopSentinelSSLConnection(LoopConnection, redis.asyncio.sentinel.SentinelManagedSSLConnection):
    """A TLS connection to the Sentinels' current primary (``LoopConnection``)."""


class BlockingSentinelConnectionPool(redis.asyncio.sentinel.SentinelConnectionPool,
                                     redis.asyncio.BlockingConnectionPool):
    """redis-py's Sentinel pool, waiting for a free connection as ``BlockingConnectionPool`` does."""


def connect_cluster(settings: Settings) -> redis.Redis:
    """A client of the Redis Cluster that ``settings.redis_url`` names a node of, with ``client_options``.

    redis-py's ``RedisCluster`` finds the other nodes from that one, sends each command to the node serving
    its key's slot, follows MOVED and ASK, and refuses a multi-key command across slots before sending it.
    It is not a ``redis.Redis``, but speaks the same commands, pipelines (split by node; a transaction must
    stay in one slot) and scripts, which is all Streamfold asks of a client: typed as one, so every reader
    and writer takes either.
    """
    try:
        client = redis.cluster.RedisCluster.from_url(settings.redis_url, **_cluster_options(settings))
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # it asks the node for the layout at once
        raise _first_contact(exc) from exc
    return cast(redis.Redis, client)


def connect_cluster_async(settings: Settings, *, connections: int = 100,
                          loop_writes: bool = True) -> redis.asyncio.Redis:
    """The asyncio counterpart of ``connect_cluster``: at most ``connections`` per node. The cluster's
    layout is read on the first command."""
    try:
        client = redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, max_connections=connections,
                                                              **_cluster_options(settings))
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
    if not loop_writes:
        return cast(redis.asyncio.Redis, client)
    # redis-py's cluster client takes no connection class: it is set where its nodes are made from, before
    # any node has made a connection.
    loop_class = LoopSSLConnection if settings.redis_url.startswith("rediss://") else LoopTCPConnection
    client.nodes_manager.connection_kwargs["connection_class"] = loop_class
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = loop_class
    return cast(redis.asyncio.Redis, client)


def connect_queue(settings: Settings) -> redis.Redis:
    """A client for the rq job queue's Redis: ``queue_redis_url``, or ``redis_url`` when that is unset (then
    never a cluster: ``Settings`` requires a queue URL with ``redis_cluster``). The timeouts and bytes of
    ``client_options``; the credentials of its own URL when it has them, otherwise the streams Redis's; TLS
    for a ``rediss://`` URL."""
    if settings.queue_redis_url is None:
        return connect(settings)  # the streams' Redis, through Sentinel when it is managed so
    url = settings.queue_redis_url
    options = client_options(settings.model_copy(update={"redis_url": url}))
    if urlsplit(url).password is not None:
        options.pop("username", None)
        options.pop("password", None)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_QUEUE_REDIS_URL: {exc}") from None


def _cluster_options(settings: Settings) -> dict[str, Any]:
    options = client_options(settings)
    # A cluster client checks a connection's health on its own (it re-reads the layout on a connection
    # error); the synchronous one takes no interval.
    options.pop("health_check_interval")
    return options


def _first_contact(exc: Exception) -> Exception:
    if cannot_serve(exc) or isinstance(exc, redis.exceptions.RedisClusterException):
        return RedisUnavailable(f"Redis Cluster unavailable: {type(exc).__name__}: {exc}")
    return RedisRefused(f"Redis Cluster refused the first command: {exc}")


def client_options(settings: Settings) -> dict[str, Any]:
    """What every client of ``settings`` is made with: timeouts, bytes back, credentials, TLS. Code that
    builds its own pool passes these, so no connection of any process skips the credentials or TLS."""
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout,
                               "socket_connect_timeout": min(settings.socket_timeout, 5.0),
                               "health_check_interval": 30, "decode_responses": False}
    if settings.redis_username is not None:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_url.startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                       ssl_ca_certs=_path(settings.redis_tls_ca), ssl_certfile=_path(settings.redis_tls_cert),
                       ssl_keyfile=_path(settings.redis_tls_key))
    return options


def primary_through_sentinel(settings: Settings) -> redis.Redis:
    """A client of the primary the Sentinels (``redis_sentinels``) name for ``redis_sentinel_service``.

    Each new connection asks the Sentinels where the primary is, so a client follows a failover by itself:
    a command that meets the old primary gone (ConnectionError), demoted (READONLY, which redis-py turns into
    a ConnectionError after dropping the connection) or no primary at all while the Sentinels vote
    (MasterNotFoundError) fails as "cannot serve for now", and the caller's retry lands on the new one.
    """
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinels, sentinel_kwargs=_sentinel_options(settings), **_primary_options(settings))
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        str(settings.redis_sentinel_service), redis_class=SentinelPrimary)
    return client


def primary_through_sentinel_async(settings: Settings, **pool: Any) -> redis.asyncio.Redis:
    """The asyncio counterpart of ``primary_through_sentinel``. ``pool`` goes to the connection pool: a
    ``connection_pool_class`` and a ``connection_class`` derived from redis-py's Sentinel ones, its size."""
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinels, sentinel_kwargs=_sentinel_options(settings), **_primary_options(settings))
    client: redis.asyncio.Redis = sentinel.master_for(str(settings.redis_sentinel_service),
                                                      redis_class=AsyncSentinelPrimary, **pool)
    return client


class SentinelPrimary(redis.Redis):
    """A client of the Sentinels' primary that closes its connections to the Sentinels with its own."""

    def close(self) -> None:
        super().close()
        sentinel: redis.sentinel.Sentinel = getattr(self.connection_pool, "sentinel_manager")
        for node in sentinel.sentinels:
            node.close()


class AsyncSentinelPrimary(redis.asyncio.Redis):
    """The asyncio counterpart of ``SentinelPrimary``."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        sentinel: redis.asyncio.sentinel.Sentinel = getattr(self.connection_pool, "sentinel_manager")
        for node in sentinel.sentinels:
            await node.aclose()


def _primary_options(settings: Settings) -> dict[str, Any]:
    """``client_options`` plus what ``redis_url`` says besides its address: the database, its credentials
    (where no setting replaces them) and TLS."""
    try:
        url = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
    options = {name: url[name] for name in ("db", "username", "password") if url.get(name) is not None}
    options.update(client_options(settings))
    if settings.redis_url.startswith("rediss://"):
        options["ssl"] = True  # picks redis-py's Sentinel-managed TLS connection
    return options


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """How the Sentinels themselves are reached: briefly (a Sentinel that does not answer is skipped for the
    next), with their own password, over TLS with the same certificates when ``redis_url`` is rediss://."""
    timeout = min(settings.socket_timeout, 2.0)
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_url.startswith("rediss://"):
        options.update(ssl=True, **{name: value for name, value in client_options(settings).items()
                                    if name.startswith("ssl_")})
    return options


def _path(path: Any) -> str | None:
    return None if path is None else str(path)


def cannot_serve(exc: BaseException) -> bool:
    """Whether a redis-py error means Redis cannot serve for now, so that the same call may work later. A
    wrong password or user is not one of these, though redis-py raises it as a connection error."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return False
    return isinstance(exc, UNAVAILABLE_ERRORS) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(TRANSIENT_ERRORS))


def refresh_layout(client: redis.Redis) -> None:
    """After Redis could not serve: a cluster client reads again which node serves which slot. redis-py does
    so by itself after a failed command, but not after a failed pub/sub connection, which would otherwise go
    on trying the node a failover took the channel's slot from. Nothing for other clients; a cluster that
    cannot tell yet is asked again at the next failure."""
    if isinstance(client, redis.cluster.RedisCluster):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            pass


def preflight(client: redis.Redis) -> None:
    """Check, before serving, that Redis takes these credentials: RedisRefused when it never will serve them
    (a wrong password, user or database index, a server that is not Redis). A Redis that cannot serve for
    now (down, loading) passes: a serving process waits for it with its own back-off. Through Sentinel, the
    Sentinels are asked first: one that refuses its password, or knows no such primary, is refused too."""
    pool = getattr(client, "connection_pool", None)  # a RedisCluster has a pool per node instead
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        _ask_sentinels(pool.sentinel_manager, pool.service_name)
    try:
        client.ping()
    except redis.RedisError as exc:
        if not cannot_serve(exc):
            raise RedisRefused(f"Redis at {_address(client)} refused the first command: {exc}") from exc


def _ask_sentinels(sentinel: redis.sentinel.Sentinel, service: str) -> None:
    """RedisRefused when a Sentinel that answers refuses our credentials or monitors no ``service``: redis-py
    would only ever say that no primary was found, as it says while a failover runs."""
    for node in sentinel.sentinels:
        try:
            node.sentinel_master(service)
        except redis.RedisError as exc:
            if not cannot_serve(exc):
                raise RedisRefused(f"Sentinel at {_host(node)} refused to name the primary "
                                   f"{service!r}: {exc}") from exc


def _address(client: redis.Redis) -> str:
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_default_node()
        return f"cluster node {node.host}:{node.port}"
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        sentinels = ",".join(map(_host, pool.sentinel_manager.sentinels))
        return f"{pool.service_name} (Sentinels {sentinels})"
    return f"{_host(client)}/{pool.connection_kwargs.get('db', 0)}"


def _host(client: redis.Redis) -> str:
    options = client.connection_pool.connection_kwargs
    return f"{options.get('host', '?')}:{options.get('port', '?')}"


@contextmanager
def unavailable() -> Iterator[None]:
    """Connection errors, timeouts and a Redis that cannot serve for now leave as RedisUnavailable; other
    redis-py errors pass through for the caller to judge."""
    try:
        yield
    except redis.RedisError as exc:
        if cannot_serve(exc):
            raise RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
        raise


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """redis-py's errors as Streamfold's, naming what was being done: RedisUnavailable when Redis cannot
    serve for now, RedisRefused when it refused the command."""
    try:
        yield
    except redis.RedisError as exc:
        if cannot_serve(exc):
            raise RedisUnavailable(f"Redis unavailable while {action}: {type(exc).__name__}: {exc}") from exc
        raise RedisRefused(f"Redis refused {action}: {exc}") from exc


@contextmanager
def connected(client: redis.Redis | None, settings: Settings | None) -> Iterator[tuple[redis.Redis, Settings]]:
    """The settings (read from the environment when not given) and a client, closed afterwards if ours."""
    settings = load_settings() if settings is None else settings
    if client is not None:
        yield client, settings
        return
    with connect(settings) as own:
        yield own, settings


@contextmanager
def queue_connected(queue: redis.Redis | None, client: redis.Redis | None,
                    settings: Settings) -> Iterator[redis.Redis]:
    """A client of rq's Redis: ``queue`` when given; else ``client`` when the queue shares the streams Redis
    (no ``queue_redis_url``); else one of ``connect_queue``'s, closed afterwards."""
    if queue is not None:
        yield queue
    elif client is not None and not settings.queue_redis_url:
        yield client
    else:
        with connect_queue(settings) as own:
            yield own
