"""The mock upstream replays every fixture as its API would stream it - chat completions checked with the official
``openai`` client, Anthropic with the official ``anthropic`` client - injects the faults it is asked for, and
holds a thousand streams at once."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx_sse
import openai
import pytest
from openai import Stream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from producer.mock_upstream import DEFAULT_FIXTURE_DIRS, DEFAULT_NATIVE_DIR, Faults, MockUpstream, main, sse_frames

FIXTURES = sorted((path for directory in DEFAULT_FIXTURE_DIRS for path in directory.glob("*.jsonl")), key=str)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
SHORT = "openai_refusal"  # 13 chunks


def fixture_lines(name: str) -> list[bytes]:
    path = next(path for path in FIXTURES if path.stem == name)
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def chat_body(model: str = SHORT) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, "stream": True}


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(port=0) as up:
        yield up


@pytest.fixture
def http(upstream: MockUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.base_url, timeout=10) as client:
        yield client


@pytest.fixture
def client(upstream: MockUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0, timeout=10) as client:
        yield client


def sse_events(http: httpx.Client, **request: Any) -> list[httpx_sse.ServerSentEvent]:
    """Every SSE event of one chat completion request, read with httpx-sse."""
    with httpx_sse.connect_sse(http, "POST", "/chat/completions", **request) as source:
        return list(source.iter_sse())


def open_stream(client: openai.OpenAI, model: str = SHORT, **options: Any) -> Stream[ChatCompletionChunk]:
    stream: Stream[ChatCompletionChunk] = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, **options
    )
    return stream


# --- streaming -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES, ids=[path.stem for path in FIXTURES])
def test_stream_body_is_each_fixture_line_as_a_data_event_then_done(http: httpx.Client, fixture: Path) -> None:
    response = http.post("/chat/completions", json=chat_body(fixture.stem))

    expected = b"".join(b"data: " + line + b"\n\n" for line in fixture_lines(fixture.stem)) + b"data: [DONE]\n\n"
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == expected


@pytest.mark.parametrize("fixture", FIXTURES, ids=[path.stem for path in FIXTURES])
def test_openai_client_yields_one_chunk_per_fixture_line(client: openai.OpenAI, fixture: Path) -> None:
    with open_stream(client, fixture.stem, stream_options={"include_usage": True}) as stream:
        # warnings=False: some providers' chunks do not fit the openai types (content as a list of parts).
        chunks = [chunk.model_dump(exclude_unset=True, warnings=False) for chunk in stream]

    assert chunks == [json.loads(line) for line in fixture_lines(fixture.stem)]


def test_chat_completions_is_served_without_the_v1_prefix_too(upstream: MockUpstream) -> None:
    with httpx.Client(base_url=upstream.base_url.removesuffix("/v1"), timeout=10) as http:
        events = sse_events(http, json=chat_body())

    assert [event.data.encode() for event in events] == [*fixture_lines(SHORT), b"[DONE]"]


# --- faults -----------------------------------------------------------------------------------------------


def test_status_429_sends_retry_after_and_the_openai_client_raises_rate_limit_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        open_stream(client, extra_headers={"X-Mock-Status": "429", "X-Mock-Retry-After": "7"})

    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.code == "rate_limit_exceeded"


def test_status_500_answers_a_server_error_body(client: openai.OpenAI, http: httpx.Client) -> None:
    response = http.post("/chat/completions", json=chat_body(), params={"mock_status": "500"})
    with pytest.raises(openai.InternalServerError) as raised:
        open_stream(client, extra_query={"mock_status": "500"})

    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert raised.value.status_code == 500


def test_disconnect_after_n_sends_n_chunks_then_cuts_the_body_short(http: httpx.Client) -> None:
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx_sse.connect_sse(
            http, "POST", "/chat/completions", json=chat_body(), headers={"X-Mock-Disconnect-After": "3"}
        ) as source:
            for event in source.iter_sse():
                received.append(event.data.encode())

    assert received == fixture_lines(SHORT)[:3]


def _cut_off_errors() -> tuple[type[BaseException], ...]:
    """openai 3 wraps a cut-off stream in APIConnectionError; openai 2 lets the transport error through."""
    errors: tuple[type[BaseException], ...] = (openai.APIConnectionError, httpx.TransportError)
    try:
        import httpx2  # type: ignore[import-not-found]
    except ImportError:
        return errors
    return (*errors, httpx2.TransportError)


def test_disconnect_reaches_the_openai_client_as_a_connection_error(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(_cut_off_errors()):
        with open_stream(client, extra_query={"mock_disconnect_after": "3"}) as stream:
            for chunk in stream:
                received.append(chunk.id)

    assert len(received) == 3


def test_malformed_after_n_sends_one_broken_event_and_then_the_rest(http: httpx.Client) -> None:
    events = sse_events(http, json=chat_body(), params={"mock_malformed_after": "2"})

    lines = fixture_lines(SHORT)
    assert [event.data.encode() for event in events] == [*lines[:2], b"{not json", *lines[2:], b"[DONE]"]


def test_malformed_chunk_surfaces_from_the_openai_client_as_a_json_error(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(json.JSONDecodeError):
        with open_stream(client, extra_query={"mock_malformed_after": "2"}) as stream:
            for chunk in stream:
                received.append(chunk.id)

    assert len(received) == 2


def test_error_after_n_sends_an_error_event_and_ends_without_done(http: httpx.Client) -> None:
    events = sse_events(http, json=chat_body(), headers={"X-Mock-Error-After": "4"})

    assert [event.data.encode() for event in events[:-1]] == fixture_lines(SHORT)[:4]
    assert events[-1].event == "error"
    assert set(json.loads(events[-1].data)["error"]) >= {"message", "type", "code"}


def test_error_event_reaches_the_openai_client_as_an_api_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="Injected stream error"):
        with open_stream(client, extra_headers={"X-Mock-Error-After": "1"}) as stream:
            list(stream)


def test_latency_sleeps_before_each_event(http: httpx.Client) -> None:
    started = time.monotonic()
    events = sse_events(http, json=chat_body("groq_tool_call_whole_args"), params={"mock_latency_ms": "50"})
    elapsed = time.monotonic() - started

    assert len(events) == 4
    assert elapsed >= 4 * 0.050


def test_fail_times_fails_the_first_k_requests_of_a_key_then_streams(http: httpx.Client) -> None:
    faults = {"X-Mock-Status": "500", "X-Mock-Fail-Times": "2", "X-Mock-Key": "retry-me"}

    statuses = [http.post("/chat/completions", json=chat_body(), headers=faults).status_code for _ in range(3)]
    other_key = http.post("/chat/completions", json=chat_body(), headers={**faults, "X-Mock-Key": "another"})

    assert statuses == [500, 500, 200]
    assert other_key.status_code == 500


def test_openai_client_retries_past_fail_times_and_gets_the_whole_stream(upstream: MockUpstream) -> None:
    faults = {"mock_status": "429", "mock_retry_after": "1", "mock_fail_times": "1", "mock_key": "openai-retry"}
    with openai.OpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=1, timeout=10) as client:
        with open_stream(client, extra_query=faults) as stream:
            chunks = list(stream)

    assert len(chunks) == len(fixture_lines(SHORT))
    assert len(upstream.requests_seen) == 2


def test_query_parameter_wins_over_header(http: httpx.Client) -> None:
    response = http.post(
        "/chat/completions", json=chat_body(), headers={"X-Mock-Status": "500"}, params={"mock_status": "429"}
    )

    assert response.status_code == 429


@pytest.mark.parametrize("header, value", [("X-Mock-Latency-Ms", "soon"), ("X-Mock-Status", "200")])
def test_unreadable_fault_value_is_a_400(http: httpx.Client, header: str, value: str) -> None:
    response = http.post("/chat/completions", json=chat_body(), headers={header: value})

    assert response.status_code == 400
    assert header in response.json()["error"]["message"]


def test_disconnect_after_more_chunks_than_the_stream_has_still_withholds_done() -> None:
    chunks = [b"{}", b"{}"]

    assert list(sse_frames(chunks, Faults(disconnect_after=5))) == [b"data: {}\n\n", b"data: {}\n\n", None]


# --- requests that cannot be served -------------------------------------------------------------------


def test_unknown_model_is_a_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        open_stream(client, "no-such-fixture")

    assert raised.value.code == "model_not_found"


def test_non_streaming_request_is_a_400_saying_only_streaming_is_served(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="only streaming"):
        client.chat.completions.create(model=SHORT, messages=MESSAGES)


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[1, 2]", b'{"messages": [], "stream": true}', b'{"model": "x", "stream": true}'],
    ids=["empty", "not-json", "not-an-object", "no-model", "no-messages"],
)
def test_body_without_model_and_messages_is_a_400(http: httpx.Client, content: bytes) -> None:
    response = http.post("/chat/completions", content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "code"}


# --- models, requests seen, configuration -------------------------------------------------------------


def test_models_lists_every_fixture(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == sorted(path.stem for path in FIXTURES)


def test_authorization_header_is_recorded_but_kept_out_of_repr_and_log(
    client: openai.OpenAI, upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="producer.mock_upstream")
    with open_stream(client) as stream:
        list(stream)

    [seen] = upstream.requests_seen
    assert seen.authorization == "Bearer test-key"
    assert seen.model == SHORT
    assert "test-key" not in repr(seen)
    assert f"POST /v1/chat/completions model={SHORT} status=200" in caplog.text
    assert "test-key" not in caplog.text


def test_fixture_directories_can_be_overridden(tmp_path: Path) -> None:
    (tmp_path / "tiny.jsonl").write_bytes(b'{"id": "x", "choices": []}\n\n')
    with MockUpstream(fixture_dirs=[tmp_path]) as up, httpx.Client(base_url=up.base_url, timeout=10) as http:
        models = http.get("/models").json()
        events = sse_events(http, json=chat_body("tiny"))

    assert [model["id"] for model in models["data"]] == ["tiny"]
    assert [event.data for event in events] == ['{"id": "x", "choices": []}', "[DONE]"]


def test_help_explains_the_fault_headers_and_query_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])

    help_text = capsys.readouterr().out
    assert exited.value.code == 0
    for fault in ("Latency-Ms", "Disconnect-After", "Malformed-After", "Error-After", "Status", "Fail-Times"):
        assert f"X-Mock-{fault}" in help_text
        assert "mock_" + fault.lower().replace("-", "_") in help_text


def test_command_serves_until_sigterm_and_exits_cleanly() -> None:
    command = [sys.executable, "-m", "producer.mock_upstream", "--port", "0"]
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            base_url = process.stderr.readline().split(" at ")[-1].strip()
            with httpx.Client(base_url=base_url, timeout=10) as http:
                assert http.get("/models").status_code == 200
            process.terminate()
            assert process.wait(timeout=10) == 0
            assert "GET /v1/models model=- status=200" in process.stderr.read()
        finally:
            process.kill()


# --- native APIs ------------------------------------------------------------------------------------------

NATIVE = {api: sorted((DEFAULT_NATIVE_DIR / api).glob("*.jsonl")) for api in ("anthropic", "responses", "gemini")}


@pytest.mark.parametrize("fixture", NATIVE["anthropic"], ids=[path.stem for path in NATIVE["anthropic"]])
def test_the_anthropic_client_reads_each_native_fixture_event_for_event(upstream: MockUpstream, fixture: Path) -> None:
    lines = [json.loads(line) for line in fixture.read_bytes().splitlines() if line.strip()]
    with anthropic.Anthropic(base_url=upstream.root_url, api_key="test-key", max_retries=0) as client:
        events = [event.model_dump(exclude_unset=True, warnings=False) for event in client.messages.create(
            model=fixture.stem, max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True)]
        with client.messages.stream(model=fixture.stem, max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            final = stream.get_final_message()
    # The SDK drops pings, as it does from Anthropic's own streams; every other event arrives as sent.
    assert events == [line for line in lines if line["type"] != "ping"]
    assert final.stop_reason == next(line for line in lines if line["type"] == "message_delta")["delta"]["stop_reason"]


def test_anthropic_events_are_named_by_their_type_on_the_wire(http: httpx.Client) -> None:
    path = NATIVE["anthropic"][0]
    body = {"model": path.stem, "messages": [], "max_tokens": 1, "stream": True}
    with httpx_sse.connect_sse(http, "POST", "/messages", json=body) as source:
        events = list(source.iter_sse())
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    assert [(event.event, event.data.encode()) for event in events] == [
        (json.loads(line)["type"], line) for line in lines]


@pytest.mark.parametrize("fixture", NATIVE["responses"], ids=[path.stem for path in NATIVE["responses"]])
def test_responses_fixtures_stream_as_typed_events_without_done(http: httpx.Client, fixture: Path) -> None:
    with httpx_sse.connect_sse(http, "POST", "/responses",
                               json={"model": fixture.stem, "input": "hi", "stream": True}) as source:
        events = [(event.event, event.data.encode()) for event in source.iter_sse()]
    lines = [line for line in fixture.read_bytes().splitlines() if line.strip()]
    assert events == [(json.loads(line)["type"], line) for line in lines]


@pytest.mark.parametrize("fixture", NATIVE["gemini"], ids=[path.stem for path in NATIVE["gemini"]])
def test_gemini_fixtures_stream_as_sse_data_lines_under_the_models_path(upstream: MockUpstream, fixture: Path) -> None:
    url = f"{upstream.root_url}/v1beta/models/{fixture.stem}:streamGenerateContent"
    with httpx.Client(timeout=10) as http, httpx_sse.connect_sse(
            http, "POST", url, params={"alt": "sse"}, json={"contents": []}, headers={"x-goog-api-key": "k"}) as source:
        data = [event.data.encode() for event in source.iter_sse()]
    assert data == [line for line in fixture.read_bytes().splitlines() if line.strip()]
    assert upstream.requests_seen[0].model == fixture.stem


def test_an_injected_529_reaches_the_anthropic_client_as_overloaded(upstream: MockUpstream) -> None:
    with anthropic.Anthropic(base_url=upstream.root_url, api_key="k", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as raised:
            client.messages.create(model=NATIVE["anthropic"][0].stem, max_tokens=1, stream=True,
                                   messages=[{"role": "user", "content": "hi"}], extra_query={"mock_status": "529"})
    assert raised.value.status_code == 529
    assert raised.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_an_injected_stream_error_reaches_the_anthropic_client_as_an_api_error(upstream: MockUpstream) -> None:
    with anthropic.Anthropic(base_url=upstream.root_url, api_key="k", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError, match="Injected stream error"):
            with client.messages.stream(model=NATIVE["anthropic"][0].stem, max_tokens=1,
                                        messages=[{"role": "user", "content": "hi"}],
                                        extra_query={"mock_error_after": "2"}) as stream:
                list(stream)


def test_the_peak_of_requests_served_at_once_is_recorded(upstream: MockUpstream) -> None:
    async def open_streams() -> None:
        async with httpx.AsyncClient(base_url=upstream.base_url, timeout=10) as http:
            async def one() -> None:
                response = await http.post("/chat/completions", json=chat_body(), params={"mock_latency_ms": "20"})
                assert response.status_code == 200
            await asyncio.gather(*(one() for _ in range(50)))

    asyncio.run(open_streams())
    assert upstream.peak_connections == 50


def test_a_burst_of_a_thousand_connections_is_accepted_without_a_refusal(upstream: MockUpstream) -> None:
    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=upstream.base_url, timeout=30, limits=limits) as http:
            async def one() -> int:
                async with http.stream("POST", "/chat/completions", json=chat_body("groq_tool_call_whole_args"),
                                       params={"mock_latency_ms": "500"}) as response:
                    await response.aread()
                    return response.status_code
            return await asyncio.gather(*(one() for _ in range(1000)))

    assert asyncio.run(burst()) == [200] * 1000
    assert upstream.peak_connections > 500  # they overlapped: the mock held hundreds of streams at once
