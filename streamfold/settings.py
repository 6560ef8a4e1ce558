"""Settings, read once at start-up from ``STREAMFOLD_*`` environment variables and passed in.

Nothing reads the environment at import time: build ``Settings()`` in a CLI or an application's start-up
code and hand it (or the pieces it needs) to the library.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamfold.keys import Keys

OutputMode = Literal["auto", "incremental", "cumulative"]


class Settings(BaseSettings):
    """Everything a producer, worker or reader can be tuned with; each field is ``STREAMFOLD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="STREAMFOLD_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description="Redis to use")
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
    chunk_ttl: int = Field(3_600, ge=1, description="seconds a finished request's chunks stay readable")

    @model_validator(mode="after")
    def _block_below_socket_timeout(self) -> Settings:
        # A blocking read longer than the socket timeout fails in redis-py instead of returning empty.
        if self.block_ms / 1000 >= self.socket_timeout:
            raise ValueError("block_ms must stay below socket_timeout (seconds)")
        return self

    @property
    def keys(self) -> Keys:
        return Keys(namespace=self.namespace, shards=self.shards)
