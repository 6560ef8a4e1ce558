"""The HTTP gateway (``python -m producer serve``): OpenAI-compatible calls in, live resumable streams out.

See ``producer/gateway/app.py`` for the routes; ``hub.py`` follows every stream with one read per shard,
``chunks.py`` turns follow events into chat.completion.chunks, ``access.py`` decides who sees what.
"""

from __future__ import annotations

import logging

from producer.gateway.access import LOOPBACK_HOSTS
from producer.gateway.app import create_app
from producer.gateway.metrics import GatewayMetrics
from streamfold.connection import connect, connect_queue, preflight
from streamfold.errors import ConfigError
from streamfold.logs import EventLog, configure_logging
from streamfold.settings import load_settings

__all__ = ["create_app", "probe", "serve"]


def serve(*, host: str | None = None, port: int | None = None, metrics_port: int | None = None,
          log_format: str | None = None) -> int:
    """Run the gateway with settings from the environment until SIGTERM or SIGINT; returns the exit code.

    SIGTERM stops accepting connections and lets open ones finish for up to ``STREAMFOLD_SHUTDOWN_GRACE``
    seconds; streams still open then are closed, and their clients resume elsewhere with Last-Event-ID.
    """
    import uvicorn

    settings = load_settings()
    settings.require("upstreams", "gateway_keys")
    with connect(settings) as client, connect_queue(settings) as queue:
        preflight(client)
        preflight(queue)
    configure_logging(log_format or settings.log_format)
    log = EventLog(logging.getLogger("streamfold.gateway"))
    host = host or settings.gateway_host
    port = settings.gateway_port if port is None else port
    if not settings.gateway_keys and host not in LOOPBACK_HOSTS:
        raise ConfigError(f"the gateway has no keys (STREAMFOLD_GATEWAY_KEYS), so it serves loopback only, "
                          f"not {host}; give clients keys to serve other hosts")
    if not settings.gateway_keys:
        log.warning("gateway_unauthenticated", host=host, reason="STREAMFOLD_GATEWAY_KEYS is empty: any local "
                    "process may call the gateway, and requests have no tenant")
    metrics = GatewayMetrics()
    app = create_app(settings, metrics=metrics)
    metrics_port = metrics_port if metrics_port is not None else settings.metrics_port
    if metrics_port is not None:
        try:
            log.info("metrics_served", port=metrics.serve(metrics_port))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on port {metrics_port}: {exc}") from exc
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                            backlog=4096, timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)))
    log.info("gateway_started", host=host, port=port, authenticated=bool(settings.gateway_keys))
    try:
        uvicorn.Server(config).run()
    finally:
        metrics.close()
    return 0


def probe(host: str, port: int, timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, why): what a running gateway's ``/healthz`` says. ``0.0.0.0`` asks the loopback address."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    address = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    # No proxy: the gateway asked is this machine's, whatever HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}:{port}/healthz", timeout=timeout) as answer:
            status, kind, raw = answer.status, answer.headers.get("content-type", ""), answer.read()
    except urllib.error.HTTPError as exc:  # an unhealthy gateway answers 503, with its reason in the body
        status, kind, raw = exc.code, exc.headers.get("content-type", ""), exc.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"no answer from {address}:{port}: {type(reason).__name__}"
    body = json.loads(raw) if kind.startswith("application/json") else {}
    if status == 200:
        return True, f"following {body.get('followers', 0)} streams"
    return False, str(body.get("reason") or f"HTTP {status}")
