"""The upstream client speaks each API's SSE over aiohttp, translates every failure once, and never lets an API key
out. The upstream is a real server on loopback (tests/producer/scripted_upstream.py); each test runs its coroutine
with ``asyncio.run``."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from email.utils import formatdate

import orjson
import pytest
from aiohttp import web

from producer.apis import APIS, error_message
from producer.upstream import (RedactingFilter, RetryPolicy, UpstreamClient, api_key_of, failure, parse_retry_after,
                               redact)
from streamfold.capture import CapturedItem
from streamfold.contract import error_info
from streamfold.errors import ConfigError, UpstreamError
from streamfold.settings import Settings, Upstream, read_upstreams
from tests.producer.scripted_upstream import Handler, ScriptedUpstream, Seen, answer, events, stalled

KEY = "sk-test-0123456789abcdef"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CHUNKS = [b'{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}',
          b'{"id":"c1","choices":[{"index":0,"delta":{"content":"lo \xc3\xa9"},"finish_reason":"stop"}]}']


def sse(*events: bytes) -> bytes:
    return b"".join(events)


def data(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def items(handler: Handler, body: dict[str, object] = BODY, *, path: str = "/v1", api_key: str | None = KEY,
          api: str = "chat", read_timeout: float = 60.0) -> tuple[list[CapturedItem], Seen]:
    """What the client yields for one call the upstream answers with ``handler``, and the request it got."""
    async def collect() -> tuple[list[CapturedItem], Seen]:
        async with ScriptedUpstream(handler) as upstream:
            async with UpstreamClient(upstream.url(path), api=APIS[api], api_key=api_key,
                                      read_timeout=read_timeout) as client:
                received = [item async for item in client.stream(body)]
            return received, upstream.requests[0]
    return asyncio.run(collect())


def upstream_error(handler: Handler, **options: float) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        items(handler, **options)  # type: ignore[arg-type]
    return caught.value


# --- streaming ---------------------------------------------------------------------------------------------

def test_each_data_payload_is_yielded_byte_for_byte_until_done() -> None:
    body = sse(b": keep-alive\n\n", data(CHUNKS[0]), data(CHUNKS[1]), data(b"[DONE]"), data(b'{"after": "done"}'))
    assert items(events(body))[0] == [CapturedItem("chunk", chunk) for chunk in CHUNKS]


def test_events_split_across_network_reads_are_put_back_together() -> None:
    body = sse(data(CHUNKS[0]), data(CHUNKS[1]), data(b"[DONE]"))
    assert items(events([body[:7], body[7:70], body[70:71], body[71:]]))[0] == [CapturedItem("chunk", chunk)
                                                                                  for chunk in CHUNKS]


def test_a_stream_that_ends_without_done_ends_there() -> None:
    assert items(events(data(CHUNKS[0])))[0] == [CapturedItem("chunk", CHUNKS[0])]


def test_an_error_event_is_yielded_as_an_error_and_ends_the_stream() -> None:
    error = b'{"error": {"message": "overloaded", "type": "server_error"}}'
    body = sse(data(CHUNKS[0]), b"event: error\n" + data(error), data(CHUNKS[1]))
    assert items(events(body))[0] == [CapturedItem("chunk", CHUNKS[0]), CapturedItem("error", error)]


def test_the_request_posts_the_body_with_the_key_as_bearer_and_keeps_the_base_url_query() -> None:
    _, request = items(events(data(b"[DONE]")), path="/openai/v1?api-version=2024-10-21")
    assert request.method == "POST"
    assert request.path == "/openai/v1/chat/completions?api-version=2024-10-21"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {**BODY, "stream": True, "stream_options": {"include_usage": True}}


def test_an_anthropic_call_posts_to_messages_with_its_key_and_version_headers() -> None:
    received, request = items(events(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), api="anthropic")
    assert request.path == "/v1/messages"
    assert (request.headers["x-api-key"], request.headers["anthropic-version"]) == (KEY, "2023-06-01")
    assert "authorization" not in request.headers
    assert request.json() == {**BODY, "stream": True}
    assert received == [CapturedItem("chunk", b'{"type":"message_stop"}')]


def test_a_responses_call_posts_to_responses_with_a_bearer_key() -> None:
    _, request = items(events(b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n"),
                       body={"model": "gpt-5", "input": "hi"}, api="responses")
    assert request.path == "/v1/responses"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json() == {"model": "gpt-5", "input": "hi", "stream": True}


def test_a_gemini_call_names_the_model_in_its_path_and_asks_for_sse() -> None:
    body = {"model": "gemini-2.5-flash", "contents": [{"parts": [{"text": "hi"}]}]}
    received, request = items(events(b'data: {"candidates": []}\r\n\r\n'), body=body, path="/v1beta?key=k",
                              api="gemini")
    assert request.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?key=k&alt=sse"
    assert request.headers["x-goog-api-key"] == KEY
    assert request.json() == {"contents": [{"parts": [{"text": "hi"}]}]}
    assert received == [CapturedItem("chunk", b'{"candidates": []}')]


@pytest.mark.parametrize(("api", "event"), [
    ("anthropic", b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'),
    ("responses", b'event: error\ndata: {"type":"error","code":"server_error","message":"Overloaded"}'),
    ("gemini", b'data: {"error": {"code": 503, "message": "Overloaded", "status": "UNAVAILABLE"}}'),
])
def test_each_apis_error_event_ends_the_stream_as_an_error(api: str, event: bytes) -> None:
    received, _ = items(events(event + b"\n\n" + data(CHUNKS[0])), api=api)
    assert [item.kind for item in received] == ["error"]
    error = received[0].error_body()
    assert isinstance(error, dict)
    assert error_info(error)["message"] == "Overloaded"


def test_anthropics_529_overloaded_is_retried_and_reads_as_overloaded() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    error = upstream_error(answer(529, json=body))
    assert (str(error), error.status, error.retryable) == ("Overloaded", 529, True)
    assert failure(error)["type"] == "overloaded"


def test_without_a_key_no_authorization_header_is_sent() -> None:
    _, request = items(events(data(b"[DONE]")), api_key=None)
    assert "authorization" not in request.headers


# --- failures ----------------------------------------------------------------------------------------------

def test_a_429_is_retryable_with_its_retry_after_and_the_upstreams_message() -> None:
    error = upstream_error(answer(429, headers={"retry-after": "2"},
                                  json={"error": {"message": "Rate limit reached", "code": "rate_limit"}}))
    assert (str(error), error.status, error.retryable, error.retry_after) == ("Rate limit reached", 429, True, 2.0)
    assert failure(error) == {"message": "Rate limit reached", "type": "rate_limited", "status": 429, "code": None}


def test_retry_after_ms_is_read_from_an_error_answer() -> None:
    error = upstream_error(answer(503, headers={"retry-after-ms": "250"}, text="busy"))
    assert (error.status, error.retry_after) == (503, 0.25)


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_server_errors_and_timeouts_are_retryable(status: int) -> None:
    error = upstream_error(answer(status, text="try later"))
    assert (str(error), error.status, error.retryable, error.retry_after) == ("try later", status, True, None)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(status: int) -> None:
    error = upstream_error(answer(status, json={"error": {"message": "bad request"}}))
    assert (error.status, error.retryable) == (status, False)
    assert failure(error)["type"] == "upstream_error"


def test_a_connection_failure_before_any_answer_is_retryable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    async def call() -> None:
        async with UpstreamClient(f"http://127.0.0.1:{port}/v1", api_key=KEY) as client:
            async for _ in client.stream(BODY):
                pass

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(call())
    error = caught.value
    assert (error.status, error.retryable) == (None, True)
    assert "Connection refused" in str(error)
    assert failure(error)["type"] == "connection_error"


def test_a_read_timeout_is_retryable() -> None:
    error = upstream_error(stalled(2.0), read_timeout=0.2)
    assert error.retryable and str(error).startswith("upstream timed out")


def test_a_connection_dropped_mid_stream_raises_after_the_chunks_already_read() -> None:
    received: list[CapturedItem] = []

    async def read() -> None:
        async with ScriptedUpstream(events(data(CHUNKS[0]), cut=True)) as upstream:
            async with UpstreamClient(upstream.url(), api_key=KEY) as client:
                async for item in client.stream(BODY):
                    received.append(item)

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(read())
    assert received == [CapturedItem("chunk", CHUNKS[0])]
    assert caught.value.retryable and "payload is not completed" in str(caught.value)


def test_an_answer_that_is_not_an_event_stream_is_not_retried() -> None:
    error = upstream_error(answer(200, json={"choices": []}))
    assert not error.retryable and "event stream" in str(error)


def test_closing_the_iterator_closes_the_connection() -> None:
    async def read_one() -> int:
        async with ScriptedUpstream(events([data(CHUNKS[0]), data(CHUNKS[1])], hold=True)) as upstream:
            async with UpstreamClient(upstream.url(), api_key=KEY) as client:
                stream = client.stream(BODY)
                await anext(stream)
                await stream.aclose()  # type: ignore[attr-defined]
                for _ in range(100):
                    if upstream.closed_by_client:
                        break
                    await asyncio.sleep(0.01)
            return upstream.closed_by_client

    assert asyncio.run(read_one()) == 1


def test_a_stream_read_to_its_end_leaves_its_connection_to_the_next_call() -> None:
    async def two_calls() -> set[object]:
        peers: list[object] = []

        def answer_recording_peer(handler: Handler) -> Handler:
            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                assert request.transport is not None
                peers.append(request.transport.get_extra_info("peername"))
                return await handler(request)
            return handle

        async def parts() -> AsyncIterator[bytes]:
            yield data(CHUNKS[0]) + data(b"[DONE]")
            await asyncio.sleep(0.01)  # the body's end follows a moment later

        stream = events(parts)
        async with ScriptedUpstream(answer_recording_peer(stream), answer_recording_peer(stream)) as upstream:
            async with UpstreamClient(upstream.url(), api_key=KEY) as client:
                for _ in range(2):
                    assert [item async for item in client.stream(BODY)] == [CapturedItem("chunk", CHUNKS[0])]
        return set(peers)

    assert len(asyncio.run(two_calls())) == 1


@pytest.mark.parametrize(("body", "message"), [
    (b'{"error": {"message": "m1", "type": "t"}}', "m1"),
    (b'{"error": "m2"}', "m2"),
    (b'{"message": "m3"}', "m3"),
    (b'{"detail": "m4"}', "m4"),
    (b'["m5"]', "['m5']"),
    (b'{"type": "error", "error": {"type": "overloaded_error", "message": "m6"}}', "m6"),
    (b'[{"error": {"code": 429, "message": "m7", "status": "RESOURCE_EXHAUSTED"}}]', "m7"),
    (b"plain text", "plain text"),
    (b"", "Bad Gateway"),
])
def test_error_messages_are_read_from_the_common_body_shapes(body: bytes, message: str) -> None:
    assert error_message(body, "Bad Gateway") == message


# --- retry policy ------------------------------------------------------------------------------------------

def retryable(retry_after: float | None = None) -> UpstreamError:
    return UpstreamError("busy", status=503, retryable=True, retry_after=retry_after)


def test_backoff_doubles_per_retry_within_its_jitter_and_stops_at_the_retry_count() -> None:
    policy = RetryPolicy(retries=3, backoff=1.0, backoff_max=30.0)
    assert [policy.delay(retry, retryable(), jitter=lambda: 0.0) for retry in range(4)] == [0.5, 1.0, 2.0, None]
    assert [policy.delay(retry, retryable(), jitter=lambda: 1.0) for retry in range(3)] == [1.0, 2.0, 4.0]


def test_backoff_is_capped_at_backoff_max() -> None:
    assert RetryPolicy(retries=10, backoff=1.0, backoff_max=3.0).delay(8, retryable(), jitter=lambda: 1.0) == 3.0


def test_retry_after_is_honoured_as_given() -> None:
    assert RetryPolicy(backoff=0.01).delay(0, retryable(retry_after=7)) == 7.0


def test_a_retry_after_longer_than_backoff_max_ends_the_retries() -> None:
    assert RetryPolicy(backoff_max=5.0).delay(0, retryable(retry_after=60)) is None


def test_errors_that_are_not_retryable_are_never_retried() -> None:
    assert RetryPolicy().delay(0, UpstreamError("bad", status=400)) is None


def test_retry_after_reads_seconds_milliseconds_and_http_dates() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert parse_retry_after({"retry-after": formatdate(1_000_030, usegmt=True)}, now=1_000_000) == 30.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# --- keys ----------------------------------------------------------------------------------------------------

def test_an_upstream_echoing_the_key_in_its_error_gets_it_redacted() -> None:
    error = upstream_error(answer(401, json={"error": {"message": f"Incorrect API key provided: {KEY}."}}))
    assert KEY not in str(error) and "[redacted]" in str(error)


def test_the_redacting_filter_cleans_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.redaction")
    caplog.handler.addFilter(RedactingFilter([KEY]))
    try:
        logger.warning("calling with %s", KEY)
        try:
            raise RuntimeError(f"boom {KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        caplog.handler.filters.clear()
    assert KEY not in caplog.text
    assert caplog.text.count("[redacted]") == 2


def test_redact_leaves_text_without_secrets_alone() -> None:
    assert redact("nothing here", ["", KEY]) == "nothing here"


def test_the_key_is_read_from_the_environment_variable_the_upstream_names() -> None:
    upstream = Upstream(base_url="http://x", api_key_env="MY_KEY")
    assert api_key_of(upstream, {"MY_KEY": KEY}) == KEY
    assert api_key_of(Upstream(base_url="http://x"), {}) is None
    with pytest.raises(ConfigError, match="MY_KEY"):
        api_key_of(upstream, {})


# --- the upstream table ----------------------------------------------------------------------------------

def test_the_upstream_table_is_read_from_json_with_defaults() -> None:
    table = read_upstreams('{"default": {"base_url": "http://a/v1", "api_key_env": "K"},'
                           ' "mt": {"base_url": "http://b/v1", "mode": "cumulative", "params": {"model": "qwen"}}}')
    assert table["default"] == Upstream(base_url="http://a/v1", api_key_env="K")
    assert (table["mt"].mode, table["mt"].params, table["mt"].api) == ("cumulative", {"model": "qwen"}, "chat")
    assert read_upstreams('{"default": {"base_url": "http://c/v1", "api": "anthropic"}}')["default"].api == "anthropic"


@pytest.mark.parametrize(("raw", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"other": {"base_url": "http://a"}}', "must name a 'default' upstream"),
    ('{"default": {"mode": "cumulative"}}', "base_url: Field required"),
    ('{"default": {"base_url": "http://a", "mode": "sometimes"}}', "mode: Input should be"),
    ('{"default": {"base_url": "http://a", "retries": 3}}', "retries: Extra inputs are not permitted"),
    ('{"default": {"base_url": "http://a", "api": "cohere"}}', "api: Input should be"),
])
def test_a_bad_upstream_table_is_a_config_error_saying_why(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_upstreams(raw)


def test_an_api_key_in_the_table_is_refused_without_being_echoed() -> None:
    with pytest.raises(ConfigError, match="api_key_env") as caught:
        read_upstreams(orjson.dumps({"default": {"base_url": "http://a", "api_key": KEY}}))
    assert KEY not in str(caught.value)


def test_settings_read_the_table_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFOLD_UPSTREAMS", '{"default": {"base_url": "http://a/v1"}}')
    settings = Settings()
    assert settings.upstream().base_url == "http://a/v1"
    with pytest.raises(ConfigError, match="unknown upstream 'nope' \\(configured: default\\)"):
        settings.upstream("nope")
    monkeypatch.setenv("STREAMFOLD_UPSTREAMS", "{bad")
    settings = Settings()  # read all the same: only what calls upstreams needs the table
    for use in (lambda: settings.require("upstreams"), settings.upstream):
        with pytest.raises(ConfigError, match="STREAMFOLD_UPSTREAMS is not valid JSON"):
            use()


def test_without_a_table_no_upstream_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMFOLD_UPSTREAMS", raising=False)
    with pytest.raises(ConfigError, match="set STREAMFOLD_UPSTREAMS"):
        Settings().upstream()
