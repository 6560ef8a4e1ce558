"""The one place a Redis client is built from settings."""

from __future__ import annotations

import redis

from streamfold.errors import ConfigError
from streamfold.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` that returns bytes, so raw chunk payloads stay byte-exact.

    The socket timeout stays above every blocking read (``Settings`` checks it): redis-py turns a read that
    outlives its socket timeout into a TimeoutError instead of an empty answer. A URL redis-py cannot read
    is a ConfigError.
    """
    try:
        return redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=min(settings.socket_timeout, 5.0),
            health_check_interval=30,
            decode_responses=False,
        )
    except ValueError as exc:  # redis-py names the part at fault, not the whole URL (it may hold a password)
        raise ConfigError(f"bad STREAMFOLD_REDIS_URL: {exc}") from None
