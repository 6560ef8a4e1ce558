"""The one place a Redis client is built from settings, and redis-py's errors are told apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from streamfold.errors import ConfigError
from streamfold.errors import RedisRefused, RedisUnavailable
from streamfold.settings import Settings, load_settings

# Redis cannot serve for now: lost or slow connections, a replica after a failover.
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
    and ``redis_password`` replace the URL's. With ``redis_cluster``, a client of the whole cluster.
    """
    if settings.redis_cluster:
        return connect_cluster(settings)
    try:
        return redis.Redis.from_url(settings.redis_url, **client_options(settings))
    except ValueError as exc:  # redis-py names the part at fault, not the whole URL (it may hold a password)
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    """The asyncio counterpart of ``connect``, with the same options, for code on an event loop."""
    if settings.redis_cluster:
        return connect_cluster_async(settings)
    try:
        return redis.asyncio.Redis.from_url(settings.redis_url, **client_options(settings))
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None


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


def connect_cluster_async(settings: Settings, *, connections: int = 100) -> redis.asyncio.Redis:
    """The asyncio counterpart of ``connect_cluster``: at most ``connections`` per node. The cluster's
    layout is read on the first command."""
    try:
        client = redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, max_connections=connections,
                                                              **_cluster_options(settings))
    except ValueError as exc:
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
    return cast(redis.asyncio.Redis, client)


def connect_queue(settings: Settings) -> redis.Redis:
    """A client for the rq job queue's Redis: ``queue_redis_url``, or ``redis_url`` when that is unset (then
    never a cluster: ``Settings`` requires a queue URL with ``redis_cluster``). The timeouts and bytes of
    ``client_options``; the credentials of its own URL when it has them, otherwise the streams Redis's; TLS
    for a ``rediss://`` URL."""
    url = settings.queue_redis_url or settings.redis_url
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


def _path(path: Any) -> str | None:
    return None if path is None else str(path)


def cannot_serve(exc: BaseException) -> bool:
    """Whether a redis-py error means Redis cannot serve for now, so that the same call may work later. A
    wrong password or user is not one of these, though redis-py raises it as a connection error."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return False
    return isinstance(exc, UNAVAILABLE_ERRORS) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(TRANSIENT_ERRORS))


def preflight(client: redis.Redis) -> None:
    """Check, before serving, that Redis takes these credentials: RedisRefused when it never will serve them
    (a wrong password, user or database index, a server that is not Redis). A Redis that cannot serve for
    now (down, loading) passes: a serving process waits for it with its own back-off."""
    try:
        client.ping()
    except redis.RedisError as exc:
        if not cannot_serve(exc):
            raise RedisRefused(f"Redis at {_address(client)} refused the first command: {exc}") from exc


def _address(client: redis.Redis) -> str:
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_default_node()
        return f"cluster node {node.host}:{node.port}"
    options = client.connection_pool.connection_kwargs
    return f"{options.get('host', '?')}:{options.get('port', '?')}/{options.get('db', 0)}"


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
