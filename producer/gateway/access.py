"""Who may use the gateway, and for which requests: bearer keys of its own, tenants, and signed watch links.

Clients authenticate with keys from ``STREAMFOLD_GATEWAY_KEYS`` (a JSON object, name -> key), never with an
upstream's key. The key's name is the client's tenant: it becomes ``meta.tenant`` of every request the client
starts, and a client sees no request of another tenant (they answer 404, as unknown ones do). With no keys
configured the gateway has no tenants and serves loopback only.

A browser's EventSource cannot send an Authorization header, so the live page is opened with a watch link:
``access=<expiry>.<signature>``, an HMAC of the request id and the expiry under a secret derived from the keys.
A link opens one request's page and stream, read-only, until it expires - never anything else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from streamfold.errors import ConfigError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a tenant (None when the gateway has no keys), or a watch link for one request."""

    tenant: str | None
    watch_only: str | None = None  # the one request id a watch link opens

    def may_see(self, request_id: str, owner: str | None) -> bool:
        """Whether this caller may read a request that ``owner`` (its ``meta.tenant``) started."""
        if self.watch_only is not None:
            return self.watch_only == request_id
        return self.tenant is None or self.tenant == owner


class Gatekeeper:
    """Checks bearer keys and watch links."""

    def __init__(self, keys: dict[str, str], *, link_ttl: int) -> None:
        if any(not name or not key for name, key in keys.items()):
            raise ConfigError("STREAMFOLD_GATEWAY_KEYS: every name and key must be non-empty")
        self._by_key = {key.encode(): name for name, key in keys.items()}
        self._secret = hashlib.sha256(b"streamfold-watch\0" + b"\0".join(sorted(self._by_key))).digest()
        self._link_ttl = link_ttl
        self._now = time.time

    @property
    def open(self) -> bool:
        """No keys: every caller is let in (the gateway then listens on loopback only)."""
        return not self._by_key

    def bearer(self, authorization: str | None) -> Caller | None:
        """The caller an ``Authorization`` header names; None when it names none the gateway knows."""
        if self.open:
            return Caller(None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        for key, name in self._by_key.items():
            if hmac.compare_digest(key, given):
                return Caller(name)
        return None

    def link(self, request_id: str) -> str:
        """A watch link's ``access`` value for one request, valid ``link_ttl`` seconds from now."""
        expiry = int(self._now()) + self._link_ttl
        return f"{expiry}.{self._sign(request_id, expiry)}"

    def watcher(self, request_id: str, access: str | None) -> Caller | None:
        """The read-only caller a watch link makes, if ``access`` is a valid, unexpired link for this request."""
        if self.open:
            return Caller(None)
        expiry_text, _, signature = (access or "").partition(".")
        if not expiry_text.isdigit() or int(expiry_text) < self._now():
            return None
        if not hmac.compare_digest(signature, self._sign(request_id, int(expiry_text))):
            return None
        return Caller(None, watch_only=request_id)

    def _sign(self, request_id: str, expiry: int) -> str:
        digest = hmac.new(self._secret, f"{request_id}\0{expiry}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
