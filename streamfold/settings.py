"""Settings, read once at start-up from ``STREAMFOLD_*`` environment variables and passed in.

Nothing reads the environment at import time: build ``Settings()`` in a CLI or an application's start-up
code and hand it (or the pieces it needs) to the library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (BaseModel, ConfigDict, Field, FilePath, SecretStr, ValidationError, ValidationInfo,
                      ValidatorFunctionWrapHandler, field_validator, model_validator)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from streamfold.contract import Mode
from streamfold.errors import ConfigError
from streamfold.genai import PriceOverride, read_price_overrides
from streamfold.keys import Keys

LogFormat = Literal["text", "json"]
# The wire APIs an upstream can speak (producer/apis.py): OpenAI chat completions, or a native one.
ApiName = Literal["chat", "anthropic", "responses", "gemini"]
API_NAMES: tuple[str, ...] = get_args(ApiName)
DEFAULT_UPSTREAM = "default"


class Upstream(BaseModel):
    """One upstream producer jobs can call, as named in ``STREAMFOLD_UPSTREAMS``; ``api`` is the wire API it
    speaks: ``chat`` (OpenAI-compatible chat completions, the default), ``anthropic``, ``responses`` or ``gemini``.

    The API key is never part of it: ``api_key_env`` names the environment variable the job runner reads the
    key from, so the key stays in the runner's environment and never reaches Redis. ``base_url`` may carry a
    query string (Azure's ``api-version``); it is sent with every call. ``params`` are defaults for the request
    body, overridden by each call's own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(min_length=1)
    api: ApiName = "chat"
    api_key_env: str | None = Field(None, min_length=1)
    mode: Mode = "auto"
    params: dict[str, Any] = Field(default_factory=dict)
    # gen_ai.provider.name (openai, anthropic, gcp.gemini, ...): names the calls in usage events and prices them;
    # when absent, the base URL's host names it where it is a well-known one (streamfold/genai.py).
    provider: str | None = Field(None, min_length=1)


# The longest a chunk stream lives when nothing finishes its request: set by the producer's start (and again
# by its end), cut to ``chunk_ttl`` by the finish. Without it, a request no worker ever finishes, or a stray
# push after a finished stream expired, would keep its chunks in Redis for ever.
STREAM_MAX_AGE = 86_400


class Settings(BaseSettings):
    """Everything a producer, worker or reader can be tuned with; each field is ``STREAMFOLD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="STREAMFOLD_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description=(
        "Redis to use: redis://[user:password@]host:port/db, or rediss:// for TLS"))
    redis_username: str | None = Field(None, min_length=1, description="ACL user for Redis (instead of the URL's)")
    redis_password: SecretStr | None = Field(None, description="password for Redis (instead of the URL's); never printed")
    redis_tls_ca: FilePath | None = Field(None, description=(
        "CA certificates (PEM) that sign the Redis server's; default: the system's (rediss:// only)"))
    redis_tls_cert: FilePath | None = Field(None, description="client certificate (PEM) for TLS client authentication")
    redis_tls_key: FilePath | None = Field(None, description="the client certificate's private key (PEM)")
    # Sentinel: where the primary is. redis_url then gives only the scheme (rediss:// for TLS), the
    # credentials and the database; its host and port are not used.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(default_factory=list, description=(
        "Sentinels to ask for the current primary, comma-separated host:port; a failover is followed"))
    redis_sentinel_service: str | None = Field(None, min_length=1, description=(
        "name of the primary the Sentinels monitor (needed with redis_sentinels)"))
    redis_sentinel_password: SecretStr | None = Field(None, description=(
        "password of the Sentinels themselves (requirepass in sentinel.conf); never printed"))
    redis_wait_replicas: int = Field(0, ge=0, description=(
        "replicas that must hold a call runner's writes before they count as sent (WAIT after every batch), "
        "so a failover loses none of them (Sentinel or a single primary, not a Redis Cluster); 0: the "
        "primary's acknowledgement is enough"))
    redis_wait_timeout_ms: int = Field(500, ge=1, description=(
        "longest a batch waits for redis_wait_replicas, ms; a batch not confirmed by then is sent again"))
    # --- Redis Cluster (README, "Redis Cluster") ---------------------------------------------------------
    redis_cluster: bool = Field(False, description=(
        "redis_url names a node of a Redis Cluster: every process speaks to the whole cluster"))
    queue_redis_url: str | None = Field(None, description=(
        "Redis of the rq job queue (redis:// or rediss://, standalone), when not redis_url's; required with "
        "redis_cluster, since rq cannot run on a cluster"))

    namespace: str = Field("streamfold", min_length=1, description="prefix of every key; namespaces never meet")
    shards: int = Field(1, ge=1, le=256, description="shard tags requests are spread over (Redis Cluster)")
    group: str = Field("workers", min_length=1, description="consumer group of the worker pool")

    concurrency: int = Field(64, ge=1, description="requests one worker assembles at once")
    read_count: int = Field(1000, ge=1, description="entries fetched per stream read")
    block_ms: int = Field(500, ge=1, description="longest blocking read, in ms (kept below socket_timeout)")
    socket_timeout: float = Field(10.0, gt=0, description="Redis socket timeout, seconds")

    stall_timeout: float = Field(60.0, gt=0, description="seconds without data before a request ends incomplete")
    claim_timeout: float = Field(30.0, gt=0, description="seconds a claim may go without heartbeat before others recover it")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")

    result_ttl: int = Field(86_400, ge=1, description="seconds a result stays readable by request id")
    chunk_ttl: int = Field(600, ge=1, description="seconds a finished request's chunks stay readable")
    stream_max_age: int = Field(STREAM_MAX_AGE, ge=1, description=(
        "seconds a request's chunk stream lives at most when no worker finishes it (a safety net)"))
    results_max_age: int = Field(86_400, ge=1, description=(
        "seconds an entry stays in the results streams, unless a consumer group still needs it"))
    usage_max_age: int = Field(604_800, ge=1, description=(
        "seconds an event stays in the usage streams, unless a consumer group still needs it"))
    dead_letter_max_age: int = Field(604_800, ge=1, description=(
        "seconds a dead letter is kept, unless a consumer group still needs it"))
    dead_consumer_idle: float = Field(600.0, gt=0, description=(
        "seconds a consumer holding nothing may stay silent before it counts as dead and is removed"))

    max_chunk_bytes: int = Field(8 * 2**20, ge=1024, description=(
        "largest raw chunk (or start, error) payload a worker accepts, bytes"))
    max_chunks: int = Field(100_000, ge=1, description="most chunks one upstream attempt of a request may have")
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description=(
        "most raw chunk bytes one upstream attempt of a request may have; bounds a worker's memory per request"))
    max_json_depth: int = Field(64, ge=8, le=200, description=(
        "deepest nesting of objects and lists a chunk, start or error payload may have"))

    metrics_port: int | None = Field(None, ge=0, le=65_535, description=(
        "port a worker, call runner or gateway serves Prometheus metrics on (off when unset)"))
    log_format: LogFormat = Field("text", description="text: a readable line per event; json: one object per line")

    upstreams: Annotated[dict[str, Upstream], NoDecode] = Field(
        default_factory=dict, description="JSON object: upstream name -> {base_url, api, api_key_env, mode, params}")
    queue: str = Field("streamfold", min_length=1, description="rq queue of producer jobs")
    job_timeout: int = Field(900, ge=1, description="seconds an rq job may run before rq stops it")
    upstream_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to an upstream")
    upstream_read_timeout: float = Field(60.0, gt=0, description="longest silence within an upstream stream, seconds")
    upstream_retries: int = Field(3, ge=0, description="retries of a failed upstream call (429, 5xx, network)")
    upstream_backoff: float = Field(0.5, ge=0, description="first retry delay in seconds; doubles per retry")
    upstream_backoff_max: float = Field(30.0, ge=0, description="longest retry delay; a longer Retry-After fails")
    cancel_ttl: int = Field(3_600, ge=1, description="seconds a cancel request is kept")

    runner_concurrency: int = Field(256, ge=1, description="upstream calls one runner process holds at once")
    runner_lease: float = Field(10.0, gt=0, description=(
        "seconds a runner's lease lasts unrenewed; a live runner re-runs the calls of a runner silent longer"))
    runner_reruns: int = Field(1, ge=0, description=(
        "times a call lost with its runner is re-run from the start, each a new upstream call that costs "
        "tokens again; 0 fails such requests with error type runner_lost"))
    runner_flush_ms: float = Field(2.0, gt=0, description="longest a chunk waits in a runner before it is sent, ms")
    runner_batch: int = Field(1000, ge=1, description="most entries a runner sends to Redis in one round trip")
    runner_buffer_bytes: int = Field(64 * 2**20, ge=2**16, description=(
        "chunk bytes a runner holds unsent before its calls wait for Redis (bounds its memory)"))

    prices: Annotated[dict[str, PriceOverride], NoDecode] = Field(
        default_factory=dict, description=("JSON object: \"<provider>/<model>\" or \"<model>\" -> {input_mtok, "
                                           "output_mtok, cache_read_mtok, cache_write_mtok, currency}: prices per "
                                           "million tokens that replace or add to the bundled ones"))

    gateway_host: str = Field("127.0.0.1", min_length=1, description="address the HTTP gateway listens on")
    gateway_port: int = Field(8410, ge=0, le=65_535, description="port the HTTP gateway listens on")
    gateway_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description=("JSON object: client name (its tenant) -> bearer key of the gateway; "
                                           "none: loopback only, without authentication"))
    gateway_link_ttl: int = Field(3_600, ge=1, description="seconds a watch link to a request's live page is valid")

    @field_validator("upstreams", "prices", "gateway_keys", mode="wrap")
    @classmethod
    def _read_or_set_aside(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        # These settings serve one component each (the upstream table the call runners and the gateway, the
        # prices the stream workers, the keys the gateway): one that cannot be read stops only a component
        # that uses it, when it starts (``require``) - never a process that has no use for it.
        try:
            return handler(_READERS[str(info.field_name)](value))
        except ConfigError as exc:
            return Unreadable(str(exc))

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _read_sentinels(cls, value: Any) -> Any:
        return read_sentinels(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sentinels_name_their_service(self) -> Settings:
        if self.redis_sentinels and self.redis_cluster:
            raise ValueError("redis_sentinels and redis_cluster exclude each other: a cluster fails over by itself")
        if self.redis_sentinels and self.redis_sentinel_service is None:
            raise ValueError("redis_sentinels need redis_sentinel_service: the name of the primary they monitor")
        if self.redis_wait_timeout_ms / 1000 >= self.socket_timeout:
            raise ValueError("redis_wait_timeout_ms must stay below socket_timeout (seconds)")
        if self.redis_wait_replicas and self.redis_cluster:
            raise ValueError("redis_wait_replicas is not applied on a Redis Cluster: a runner's batch spans several "
                             "masters, and WAIT counts one connection's writes; set it to 0 (README, \"Redis "
                             "Cluster\": what a master failover can cost)")
        return self

    @model_validator(mode="after")
    def _timeouts_fit_together(self) -> Settings:
        # A blocking read longer than the socket timeout fails in redis-py instead of returning empty.
        if self.block_ms / 1000 >= self.socket_timeout:
            raise ValueError("block_ms must stay below socket_timeout (seconds)")
        # A read that waits out the socket timeout is time without Redis, which must not end a request as
        # stalled: a request can only stall after a silence longer than the longest wait on Redis.
        if self.stall_timeout <= self.socket_timeout:
            raise ValueError("stall_timeout must be longer than socket_timeout (seconds)")
        return self

    @model_validator(mode="after")
    def _tls_goes_with_rediss(self) -> Settings:
        tls = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if any(tls) and not self.redis_url.startswith("rediss://"):
            raise ValueError("redis_tls_* settings need a rediss:// redis_url")
        if (self.redis_tls_cert is None) != (self.redis_tls_key is None):
            raise ValueError("redis_tls_cert and redis_tls_key go together")
        return self

    @model_validator(mode="after")
    def _queue_beside_a_cluster(self) -> Settings:
        # rq's worker registration and job bookkeeping are multi-key commands across slots (rq #1942): on a
        # cluster they fail with CROSSSLOT, so its queue needs a Redis of its own.
        if self.redis_cluster and not self.queue_redis_url:
            raise ValueError("redis_cluster needs queue_redis_url (STREAMFOLD_QUEUE_REDIS_URL): rq's job queue "
                             "cannot live on a Redis Cluster; give it a standalone Redis")
        return self

    def __repr_args__(self) -> Any:
        """What ``repr`` shows: every setting, but no password of the URL and no gateway key."""
        for name, value in super().__repr_args__():
            if name in ("redis_url", "queue_redis_url") and value is not None:
                value = redacted_url(value)
            elif name == "gateway_keys":
                value = {client: "[redacted]" for client in value}
            yield name, value

    def require(self, *names: str) -> None:
        """ConfigError when one of the settings ``names`` (upstreams, prices, gateway_keys) could not be read:
        what a component calls at start for the settings it uses."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, Unreadable):
                raise ConfigError(value.reason)

    @property
    def keys(self) -> Keys:
        return Keys(namespace=self.namespace, shards=self.shards)

    def upstream(self, name: str = DEFAULT_UPSTREAM) -> Upstream:
        """The upstream called ``name``; ConfigError naming the known ones when there is none."""
        self.require("upstreams")
        upstream = self.upstreams.get(name)
        if upstream is None:
            known = ", ".join(sorted(self.upstreams)) or "none; set STREAMFOLD_UPSTREAMS"
            raise ConfigError(f"unknown upstream {name!r} (configured: {known})")
        return upstream


def read_upstreams(value: Any) -> dict[str, Upstream]:
    """The upstream table from ``STREAMFOLD_UPSTREAMS`` JSON (or an already parsed mapping).

    Raises ConfigError, never echoing the values given: a misplaced API key must not end up in a log. An empty
    table is allowed (processes that call no upstream need none); a non-empty one must name ``default``.
    """
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"STREAMFOLD_UPSTREAMS is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("STREAMFOLD_UPSTREAMS must be a JSON object mapping names to upstreams")
    if value and DEFAULT_UPSTREAM not in value:
        raise ConfigError(f"STREAMFOLD_UPSTREAMS must name a {DEFAULT_UPSTREAM!r} upstream "
                          f"(it has: {', '.join(sorted(map(str, value)))})")
    return {str(name): _upstream(str(name), entry) for name, entry in value.items()}


def read_prices(value: Any) -> dict[str, PriceOverride]:
    """Price overrides from ``STREAMFOLD_PRICES`` JSON (model -> prices), or an already parsed mapping."""
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"STREAMFOLD_PRICES is not valid JSON ({exc})") from None
    if not isinstance(value, dict) or not all(isinstance(entry, (dict, PriceOverride)) for entry in value.values()):
        raise ConfigError("STREAMFOLD_PRICES must be a JSON object mapping models to prices")
    try:
        return {**{name: entry for name, entry in value.items() if isinstance(entry, PriceOverride)},
                **read_price_overrides({name: entry for name, entry in value.items() if isinstance(entry, dict)})}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class Unreadable(dict[str, Any]):
    """An empty table standing for a setting that could not be read, and why (``Settings.require``)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


def read_gateway_keys(value: Any) -> dict[str, str]:
    """The gateway's clients from ``STREAMFOLD_GATEWAY_KEYS`` JSON: name -> key. ConfigError, never echoing a
    key, when it is not an object of non-empty strings or two names share a key."""
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"STREAMFOLD_GATEWAY_KEYS is not valid JSON ({exc})") from None
    if not isinstance(value, dict) or not all(isinstance(name, str) and name and isinstance(key, str) and key
                                              for name, key in value.items()):
        raise ConfigError("STREAMFOLD_GATEWAY_KEYS must be a JSON object mapping client names to non-empty keys")
    if len(set(value.values())) < len(value):
        raise ConfigError("STREAMFOLD_GATEWAY_KEYS: two clients share a key; each needs its own")
    return dict(value)


def _upstream(name: str, entry: Any) -> Upstream:
    if isinstance(entry, Upstream):
        return entry
    if isinstance(entry, dict) and any("key" in str(field) and field != "api_key_env" for field in entry):
        raise ConfigError(f"STREAMFOLD_UPSTREAMS[{name!r}]: API keys never go in the upstream table; name the "
                          "environment variable holding the key with \"api_key_env\"")
    try:
        return Upstream.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'value'}: {error['msg']}"
                             for error in exc.errors(include_input=False))
        raise ConfigError(f"STREAMFOLD_UPSTREAMS[{name!r}]: {problems}") from None


def load_settings() -> Settings:
    """Settings from the ``STREAMFOLD_*`` environment, read now; ConfigError names what is wrong, on one line
    (a probe's or a log's one line), never echoing the values given."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join((f"STREAMFOLD_{'_'.join(map(str, error['loc'])).upper()}: " if error["loc"] else "")
                             + error["msg"] for error in exc.errors(include_input=False))
        raise ConfigError(f"bad settings: {problems}") from exc


def read_sentinels(value: str) -> list[tuple[str, int]]:
    """``STREAMFOLD_REDIS_SENTINELS``: comma-separated ``host:port`` (``[v6 address]:port``) as (host, port)
    pairs. ValueError names the entry that is not one."""
    sentinels = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        host, colon, port = entry.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not colon or not host or "@" in host or "/" in host or not port.isdigit() or not 0 < int(port) < 65_536:
            shown = f"{entry!r}" if "@" not in entry else "an entry with credentials in it"  # they go elsewhere
            raise ValueError(f"{shown} is not host:port")
        sentinels.append((host, int(port)))
    return sentinels


def redacted_url(url: str) -> str:
    """``url`` with its password, if it has one, replaced: what may be shown in a log or an error."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:[redacted]@{host}"


_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "upstreams": read_upstreams, "prices": read_prices, "gateway_keys": read_gateway_keys}
