"""The gateway end to end: the official openai client, sync and async, gets exactly the assembled message for
every recorded and seed stream; streams resume after a dropped connection; an Idempotency-Key makes one call;
keys and tenants keep clients apart; a closing client never stops the call."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from producer.mock_upstream import DEFAULT_FIXTURE_DIRS
from tests.conftest import ROOT, load_jsonl
from tests.producer.gateway.conftest import KEYS, GatewayStack, sse_events
from worker import assemble

pytestmark = pytest.mark.redis

FIXTURES = {path.stem: path for directory in DEFAULT_FIXTURE_DIRS for path in sorted(directory.glob("*.jsonl"))}
MESSAGES = [{"role": "user", "content": "Hi"}]
NATIVE = {f"{path.parent.name}/{path.stem}": path for path in sorted((ROOT / "fixtures" / "native").glob("*/*.jsonl"))}
SAMPLE = ["openai_parallel_tool_calls", "openai_n3_multiple_choices", "deepseek_reasoner_tool_call",
          "qwen_mt_plus_cumulative", "openai_refusal"]


def assembled(model: str) -> dict[str, Any]:
    return dict(assemble(load_jsonl(FIXTURES[model])))


def view(completion: Any) -> list[dict[str, Any]]:
    """What a client reads of a chat.completion, choice by choice: text, reasoning, refusal, calls, ending."""
    data = completion if isinstance(completion, dict) else completion.model_dump()
    choices = []
    for choice in sorted(data["choices"], key=lambda choice: choice["index"]):
        message = choice["message"]
        calls = [(call["id"], call["function"]["name"], call["function"]["arguments"])
                 for call in message.get("tool_calls") or []]
        choices.append({"index": choice["index"], "finish_reason": choice["finish_reason"],
                        "content": message.get("content"), "refusal": message.get("refusal"), "tool_calls": calls,
                        "reasoning_content": message.get("reasoning_content")})
    return choices


def sdk(stack: GatewayStack, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.open.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("model", sorted(FIXTURES))
def test_the_sdks_stream_helper_gets_exactly_the_assembled_message(stack: GatewayStack, model: str) -> None:
    with sdk(stack).chat.completions.stream(model=model, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    expected = assembled(model)["completion"]
    assert view(completion) == view(expected)
    assert (completion.id, completion.model, completion.created) == (expected["id"], expected["model"],
                                                                     expected["created"])


@pytest.mark.parametrize("model", sorted(NATIVE))
def test_a_native_upstream_reaches_the_sdk_as_the_chat_message_its_record_holds(stack: GatewayStack, model: str) -> None:
    """A model ``anthropic/...``, ``responses/...`` or ``gemini/...`` is called in that API's own dialect
    (the body translated); the client still reads chat chunks, and they add up to the native record."""
    with sdk(stack).chat.completions.stream(model=model, messages=MESSAGES, max_tokens=64) as stream:  # type: ignore
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    api, name = model.split("/")
    expected = assemble(load_jsonl(NATIVE[model]), format=api)["completion"]  # type: ignore[arg-type]
    assert view(completion) == view(expected)
    seen = [seen for seen in stack.upstream.requests_seen if seen.model == name][-1]
    assert seen.path == {"anthropic": "/v1/messages", "responses": "/v1/responses",
                         "gemini": f"/v1beta/models/{name}:streamGenerateContent"}[api]
    translated = {"anthropic": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                "max_tokens": 64},
                  "responses": {"input": [{"role": "user", "content": "Hi"}], "max_output_tokens": 64},
                  "gemini": {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
                             "generationConfig": {"maxOutputTokens": 64}}}[api]
    assert isinstance(seen.body, dict) and {key: seen.body.get(key) for key in translated} == translated


@pytest.mark.parametrize("model", SAMPLE)
def test_create_stream_true_accumulates_to_the_assembled_message_with_usage(stack: GatewayStack, model: str) -> None:
    state: ChatCompletionStreamState = ChatCompletionStreamState()
    chunks = sdk(stack).chat.completions.create(model=model, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                                stream_options={"include_usage": True})
    for chunk in chunks:
        state.handle_chunk(chunk)
    completion = state.get_final_completion()
    expected = assembled(model)["completion"]
    assert view(completion) == view(expected)
    assert completion.usage is not None and completion.usage.total_tokens == expected["usage"]["total_tokens"]


@pytest.mark.parametrize("model", SAMPLE)
def test_the_async_client_gets_the_same_with_create_and_with_stream(stack: GatewayStack, model: str) -> None:
    async def both() -> tuple[Any, Any]:
        client = openai.AsyncOpenAI(base_url=stack.open.url + "/v1", api_key="unused", max_retries=0)
        state: ChatCompletionStreamState = ChatCompletionStreamState()
        async for chunk in await client.chat.completions.create(model=model, messages=MESSAGES,  # type: ignore
                                                                 stream=True):
            state.handle_chunk(chunk)
        async with client.chat.completions.stream(model=model, messages=MESSAGES) as stream:  # type: ignore
            async for _ in stream:
                pass
            helper = await stream.get_final_completion()
        await client.close()
        return state.get_final_completion(), helper

    created, streamed = asyncio.run(both())
    assert view(created) == view(streamed) == view(assembled(model)["completion"])


def test_stream_false_answers_with_the_assembled_completion(stack: GatewayStack) -> None:
    model = "openai_parallel_tool_calls"
    completion = sdk(stack).chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.model_dump(exclude_unset=True) == assembled(model)["completion"] | {
        "choices": completion.model_dump(exclude_unset=True)["choices"]}
    assert view(completion) == view(assembled(model)["completion"])


def test_an_upstream_error_is_the_clients_error(stack: GatewayStack) -> None:
    with pytest.raises(openai.BadRequestError, match="Injected error status 400"):
        sdk(stack).chat.completions.create(model="broken/openai_refusal", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="Injected error status 400"):
        for _ in sdk(stack).chat.completions.create(model="broken/openai_refusal", messages=MESSAGES,  # type: ignore
                                                    stream=True):
            pass


def test_a_dropped_stream_resumes_after_its_last_event_id_with_nothing_lost_or_repeated(stack: GatewayStack) -> None:
    body = {"model": "slow/alibaba_qwen3max_reasoning", "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            first: list[tuple[str | None, str]] = []
            for event in sse_events(response):
                first.append(event)
                if len(first) == 12:
                    break  # the client goes away mid-stream
        with http.stream("GET", f"/v1/requests/{request_id}/stream",
                         headers={"Last-Event-ID": str(first[-1][0])}) as response:
            rest = list(sse_events(response))
        with http.stream("GET", f"/v1/requests/{request_id}/stream") as response:
            whole = list(sse_events(response))
    assert first + rest == whole
    assert whole[-1] == (None, "[DONE]")
    ids = [event_id for event_id, _ in whole if event_id is not None]
    assert len(set(ids)) == len(ids) or all(ids.count(i) <= 2 for i in ids)  # a role chunk shares its event's id
    text = "".join(chunk["choices"][0]["delta"].get("content") or ""
                   for chunk in (orjson.loads(data) for _, data in whole[:-1]) if chunk["choices"])
    assert text == assembled("alibaba_qwen3max_reasoning")["completion"]["choices"][0]["message"]["content"]


def test_a_stream_whose_chunks_expired_is_relayed_from_the_record_with_its_id_and_model(stack: GatewayStack) -> None:
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        answer = http.post("/v1/chat/completions", json={"model": "openai_parallel_tool_calls", "messages": MESSAGES})
        request_id = answer.headers["x-request-id"]
        stack.client.delete(stack.settings.keys.chunks(request_id))
        with http.stream("GET", f"/v1/requests/{request_id}/stream") as response:
            chunks = [orjson.loads(data) for _, data in sse_events(response) if data != "[DONE]"]
    expected = assembled("openai_parallel_tool_calls")["completion"]
    assert chunks and {(chunk["id"], chunk["model"], chunk["created"]) for chunk in chunks} == {
        (expected["id"], expected["model"], expected["created"])}
    state: ChatCompletionStreamState = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    assert view(state.get_final_completion()) == view(expected)


def test_a_closing_client_never_stops_the_call(stack: GatewayStack) -> None:
    body = {"model": "slow/xai_grok_reasoning_tool_call", "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            next(sse_events(response))
        record = _wait_record(http, request_id)
    assert record["status"] == "completed"
    assert record["completion"] == assembled("xai_grok_reasoning_tool_call")["completion"]


def test_an_idempotency_key_retry_joins_the_call_instead_of_calling_again(stack: GatewayStack) -> None:
    model = "mistral_glm_incremental_tool_call"
    body = {"model": model, "messages": MESSAGES}
    before = stack.calls(model)
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        first = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "order-17"})
        again = http.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "order-17"})
        other = http.post("/v1/chat/completions", json={**body, "temperature": 0.5},
                          headers={"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 200
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert first.json() == again.json()
    assert stack.calls(model) == before + 1
    assert other.status_code == 422 and other.json()["error"]["type"] == "idempotency_conflict"


def test_keys_decide_who_may_call_and_tenants_never_see_each_others_requests(stack: GatewayStack) -> None:
    body = {"model": "openai_refusal", "messages": MESSAGES}
    with httpx.Client(base_url=stack.keyed.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 401
        assert http.post("/v1/chat/completions", json=body,
                         headers={"Authorization": "Bearer sk-upstream-key"}).status_code == 401
        acme = {"Authorization": f"Bearer {KEYS['acme']}"}
        answered = http.post("/v1/chat/completions", json=body, headers=acme)
        request_id = answered.headers["x-request-id"]
        assert answered.status_code == 200
        record = http.get(f"/v1/requests/{request_id}", headers=acme).json()
        assert record["meta"] == {"tenant": "acme"}
        globex = {"Authorization": f"Bearer {KEYS['globex']}"}
        for method, path in (("GET", ""), ("GET", "/stream"), ("DELETE", ""), ("GET", "/link")):
            assert http.request(method, f"/v1/requests/{request_id}{path}", headers=globex).status_code == 404
        link = http.get(f"/v1/requests/{request_id}/link", headers=acme).json()["url"]
        assert http.get(link).status_code == 200
        access = link.split("access=")[1]
        assert http.get(f"/v1/requests/{request_id}/stream?access={access}").status_code == 200
        assert http.get(f"/v1/requests/{request_id}/stream?access=1.forged").status_code == 401
        assert http.delete(f"/v1/requests/{request_id}?access={access}").status_code == 401  # watch-only


def test_delete_cancels_a_running_call(stack: GatewayStack) -> None:
    body = {"model": "slow/alibaba_qwen3max_reasoning", "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            events = sse_events(response)
            next(events)
            assert http.delete(f"/v1/requests/{request_id}").json() == {"request_id": request_id, "cancelled": True}
            last = list(events)[-1]
        record = _wait_record(http, request_id)
    assert record["status"] == "failed" and record["error"]["type"] == "cancelled"
    assert orjson.loads(last[1])["error"]["type"] == "cancelled"


def test_bad_calls_get_openai_shaped_errors(stack: GatewayStack) -> None:
    with httpx.Client(base_url=stack.open.url, timeout=30) as http:
        for body, status in ((b"not json", 400), (b'{"model": "x"}', 400), (b'{"model": 1, "messages": []}', 400)):
            answer = http.post("/v1/chat/completions", content=body)
            assert answer.status_code == status and answer.json()["error"]["message"]
        untranslatable = {"model": "anthropic/anthropic_text_basic", "messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}
        answer = http.post("/v1/chat/completions", json=untranslatable)
        assert answer.status_code == 400 and "not JSON" in answer.json()["error"]["message"]
        assert http.get("/v1/requests/no-such-request").status_code == 404
        assert http.get("/v1/requests/has space").status_code == 400
        assert http.get("/healthz").json()["status"] == "ok"


def _wait_record(http: httpx.Client, request_id: str) -> dict[str, Any]:
    import time
    deadline = time.monotonic() + 30
    while True:
        answer = http.get(f"/v1/requests/{request_id}")
        if answer.status_code == 200:
            return dict(answer.json())
        assert time.monotonic() < deadline, f"no result for {request_id}"
        time.sleep(0.05)


def test_the_probe_says_whether_a_gateway_answers_healthy(stack: GatewayStack) -> None:
    from producer.gateway import probe
    port = int(stack.open.url.rsplit(":", 1)[1])
    assert probe("0.0.0.0", port) == (True, "following 0 streams")
    healthy, reason = probe("127.0.0.1", 1, timeout=1)
    assert not healthy and reason.startswith("no answer from 127.0.0.1:1")
