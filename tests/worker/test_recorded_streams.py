"""Every recorded provider stream, assembled and compared with the completion read off the stream by hand.

Each expected completion below is written out from the raw lines of ``fixtures/recorded`` and the rules in
``docs/assembly.md``: text joined in order, usage copied verbatim from the chunk that carried it, unknown fields
kept. Where a text runs to hundreds of chunks, it is also joined with ``_joined`` straight from the raw JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import RECORDED, load_jsonl
from worker import Assembler, assemble

EXPECTED_FILES = {
    "alibaba_qwen3max_reasoning.jsonl",
    "alibaba_qwen3max_tool_call.jsonl",
    "azure_prompt_filter_first_chunk.jsonl",
    "cerebras_reasoning_field_tool_call.jsonl",
    "deepseek_reasoner_tool_call.jsonl",
    "groq_tool_call_whole_args.jsonl",
    "mistral_glm_incremental_tool_call.jsonl",
    "mistral_magistral_content_parts_reasoning.jsonl",
    "mistral_tool_call_no_index.jsonl",
    "openai_content_logprobs.jsonl",
    "openai_n3_multiple_choices.jsonl",
    "openai_parallel_tool_calls.jsonl",
    "openai_refusal.jsonl",
    "openai_refusal_logprobs.jsonl",
    "perplexity_cumulative_usage_every_chunk.jsonl",
    "xai_grok_reasoning_tool_call.jsonl",
}


def _lines(name: str) -> list[bytes]:
    return load_jsonl(RECORDED / name)


def _completed_cleanly(name: str) -> dict[str, Any]:
    """Assemble a recorded stream and check what every clean recorded stream must give; return the completion."""
    lines = _lines(name)
    record = assemble(lines)
    assert record["status"] == "completed"
    assert record["error"] is None
    assert record["warnings"] == []
    assert record["metrics"]["chunks"] == len(lines)
    completion: dict[str, Any] = record["completion"]
    assert completion["object"] == "chat.completion"
    return completion


def _joined(lines: list[bytes], field: str) -> str:
    """A delta field's text across the whole stream, read straight from the raw JSON."""
    return "".join(
        choice["delta"].get(field) or "" for chunk in map(json.loads, lines) for choice in chunk["choices"]
    )


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_every_recorded_stream_has_a_test_here() -> None:
    assert {path.name for path in Path(RECORDED).glob("*.jsonl")} == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_feeding_chunks_one_by_one_gives_the_same_record_as_assemble(name: str) -> None:
    lines = _lines(name)
    assembler = Assembler()
    for line in lines:
        assembler.feed(line)
    fed = assembler.result(request_id="req-1", meta={"source": name})
    whole = assemble(lines, request_id="req-1", meta={"source": name})
    assert fed["completion"] == whole["completion"]
    assert fed["status"] == whole["status"] == "completed"
    assert fed["request_id"] == whole["request_id"] == "req-1"
    assert fed["meta"] == whole["meta"] == {"source": name}
    assert fed["metrics"]["chunks"] == whole["metrics"]["chunks"] == len(lines)


def test_openai_parallel_tool_calls_keep_ids_and_names_whole() -> None:
    completion = _completed_cleanly("openai_parallel_tool_calls.jsonl")
    assert completion == {
        "id": "chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63",
        "object": "chat.completion",
        "created": 1727346178,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_5050236cbd",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        _tool_call(
                            "call_JMW1whyEaYG438VE1OIflxA2",
                            "GetWeatherArgs",
                            '{"city": "Edinburgh", "country": "GB", "units": "c"}',
                        ),
                        _tool_call(
                            "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                            "get_stock_price",
                            '{"ticker": "AAPL", "exchange": "NASDAQ"}',
                        ),
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 149,
            "completion_tokens": 60,
            "total_tokens": 209,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_openai_n3_choices_each_keep_their_own_text_and_finish_reason() -> None:
    completion = _completed_cleanly("openai_n3_multiple_choices.jsonl")

    def choice(index: int, temperature: int) -> dict[str, Any]:
        text = '{"city":"San Francisco","temperature":%d,"units":"f"}' % temperature
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }

    assert completion == {
        "id": "chatcmpl-ABfw2KKFuVXmEJgVwYfBvejMAdWtq",
        "object": "chat.completion",
        "created": 1727346170,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_b40fb1c6fb",
        "choices": [choice(0, 65), choice(1, 61), choice(2, 59)],
        "usage": {
            "prompt_tokens": 79,
            "completion_tokens": 42,
            "total_tokens": 121,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_openai_refusal_is_streamed_apart_from_null_content() -> None:
    completion = _completed_cleanly("openai_refusal.jsonl")
    assert completion == {
        "id": "chatcmpl-ABfw4IfQfCCrcuybFm41wJyxjbkz7",
        "object": "chat.completion",
        "created": 1727346172,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_5050236cbd",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": "I'm sorry, I can't assist with that request.",
                },
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 79,
            "completion_tokens": 11,
            "total_tokens": 90,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_openai_content_logprobs_are_concatenated_in_order() -> None:
    completion = _completed_cleanly("openai_content_logprobs.jsonl")
    assert completion == {
        "id": "chatcmpl-ABfw5EzoqmfXjnnsXY7Yd8OC6tb3c",
        "object": "chat.completion",
        "created": 1727346173,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_5050236cbd",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Foo!", "refusal": None},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {"token": "Foo", "logprob": -0.0025094282, "bytes": [70, 111, 111], "top_logprobs": []},
                        {"token": "!", "logprob": -0.26638845, "bytes": [33], "top_logprobs": []},
                    ],
                    "refusal": None,
                },
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "total_tokens": 11,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_openai_refusal_logprobs_are_concatenated_while_content_logprobs_stay_null() -> None:
    completion = _completed_cleanly("openai_refusal_logprobs.jsonl")
    assert completion == {
        "id": "chatcmpl-ABfw5GEVqPbLY576l46FZDQoNJ2KC",
        "object": "chat.completion",
        "created": 1727346173,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_5050236cbd",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": "I'm very sorry, but I can't assist with that.",
                },
                "finish_reason": "stop",
                "logprobs": {
                    "content": None,
                    "refusal": [
                        _logprob("I'm", -0.0012038043),
                        _logprob(" very", -0.8438816),
                        _logprob(" sorry", -3.4121115e-06),
                        _logprob(",", -3.3809047e-05),
                        _logprob(" but", -0.038048144),
                        _logprob(" I", -0.0016109125),
                        _logprob(" can't", -0.0073532974),
                        _logprob(" assist", -0.0020837625),
                        _logprob(" with", -0.00318354),
                        _logprob(" that", -0.0017186158),
                        _logprob(".", -0.57687104),
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 79,
            "completion_tokens": 12,
            "total_tokens": 91,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


ALIBABA_ANSWER = (
    'The word **"strawberry"** contains **3** instances of the letter **"r"**.  \n\n'
    "Here is the breakdown for clarity:  \n"
    "- **s** → not r  \n"
    "- **t** → not r  \n"
    "- **r** → **1st r**  \n"
    "- **a** → not r  \n"
    "- **w** → not r  \n"
    "- **b** → not r  \n"
    "- **e** → not r  \n"
    "- **r** → **2nd r**  \n"
    "- **r** → **3rd r**  \n"
    "- **y** → not r  \n\n"
    "⚠️ **Common Pitfall**:  \n"
    'Many people mistakenly count only **2** "r"s because:  \n'
    '- They overlook the **first "r"** in "straw" (position 3).  \n'
    '- They treat the double "r" in "berry" as a single unit (but the question asks for *individual letter '
    "occurrences*, not sounds or digraphs).  \n\n"
    "✅ **Verification**:  \n"
    "- Spelling confirmed via standard English dictionaries (e.g., Merriam-Webster, Oxford).  \n"
    '- Programmatic check (e.g., Python: `len([c for c in "strawberry" if c == "r"])` returns `3`).  \n\n'
    "**Answer: 3**"
)


def test_alibaba_reasoning_content_is_kept_apart_from_content() -> None:
    lines = _lines("alibaba_qwen3max_reasoning.jsonl")
    completion = _completed_cleanly("alibaba_qwen3max_reasoning.jsonl")
    message = completion["choices"][0]["message"]

    assert len(ALIBABA_ANSWER) == 816
    assert message["content"] == ALIBABA_ANSWER == _joined(lines, "content")

    reasoning = message["reasoning_content"]
    assert reasoning == _joined(lines, "reasoning_content")
    assert len(reasoning) == 3301
    assert reasoning.startswith(
        "We are asked: \"How many 'r's are in the word 'strawberry'?\" We need to count the occurrences of the "
        "letter 'r'"
    )
    assert reasoning.endswith("print(count) -> 3.\n\nYes.\n\nSo final answer: 3.")
    assert "**Answer: 3**" not in reasoning

    assert completion == {
        "id": "chatcmpl-3792851e-8f1b-9182-a1dc-b84603c81344",
        "object": "chat.completion",
        "created": 1770764942,
        "model": "qwen3-max",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": ALIBABA_ANSWER,
                    "refusal": None,
                    "reasoning_content": reasoning,
                },
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 24,
            "completion_tokens": 1355,
            "total_tokens": 1379,
            "completion_tokens_details": {"reasoning_tokens": 1084},
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_alibaba_empty_continuation_ids_do_not_overwrite_the_tool_call_id() -> None:
    completion = _completed_cleanly("alibaba_qwen3max_tool_call.jsonl")
    assert completion == {
        "id": "chatcmpl-8e243c57-23b3-9db2-a02e-e3c53929c368",
        "object": "chat.completion",
        "created": 1770764938,
        "model": "qwen3-max",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        _tool_call("call_eee11723464a4b9eb8cee71d", "weather", '{"location": "San Francisco"}')
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 295,
            "completion_tokens": 22,
            "total_tokens": 317,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_deepseek_reasoning_then_tool_call_takes_usage_from_the_finish_chunk() -> None:
    completion = _completed_cleanly("deepseek_reasoner_tool_call.jsonl")
    assert completion == {
        "id": "cca85624-4056-401f-b220-d77601d1f70d",
        "object": "chat.completion",
        "created": 1764664568,
        "model": "deepseek-reasoner",
        "system_fingerprint": "fp_eaab8d114b_prod0820_fp8_kvcache",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "refusal": None,
                    "reasoning_content": (
                        "The user is asking for the weather in San Francisco. I need to use the weather tool to "
                        "get this information. Let me invoke the weather tool with the location parameter set to "
                        '"San Francisco".'
                    ),
                    "tool_calls": [
                        _tool_call("call_00_ioIn7yN9p1ZOMNpDLwd4MgAF", "weather", '{"location": "San Francisco"}')
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 339,
            "completion_tokens": 83,
            "total_tokens": 422,
            "prompt_tokens_details": {"cached_tokens": 320},
            "completion_tokens_details": {"reasoning_tokens": 39},
            "prompt_cache_hit_tokens": 320,
            "prompt_cache_miss_tokens": 19,
        },
    }


def test_groq_whole_tool_call_in_one_fragment_keeps_usage_and_merged_x_groq() -> None:
    completion = _completed_cleanly("groq_tool_call_whole_args.jsonl")
    groq_usage = {
        "queue_time": 0.041520249,
        "prompt_tokens": 210,
        "prompt_time": 0.010407901,
        "completion_tokens": 15,
        "completion_time": 0.046601227,
        "total_tokens": 225,
        "total_time": 0.057009128,
    }
    assert completion == {
        "id": "chatcmpl-b610d559-f156-4aca-8827-24b4fe6af54f",
        "object": "chat.completion",
        "created": 1770770843,
        "model": "llama-3.3-70b-versatile",
        "system_fingerprint": "fp_f8b414701e",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [_tool_call("tk85n1k4m", "weather", "{}")],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": groq_usage,
        "x_groq": {"id": "req_01kh52nj5yfcat8hrmvrk2j2hj", "seed": 689520654, "usage": groq_usage},
    }


CEREBRAS_REASONING = (
    'The user is asking about a "magic number". I have access to a function called "nonUsefulTool" that '
    '"returns a magic number". Let me call this function to get the magic number for the user.\n\n'
    "Looking at the function schema:\n"
    '- Function name: "nonUsefulTool"\n'
    "- Parameters: empty object (no parameters required)\n"
    '- Description: "A non-useful tool that returns a magic number"\n\n'
    "I should call this function to get the magic number."
)


def test_cerebras_reasoning_field_keeps_its_own_name() -> None:
    completion = _completed_cleanly("cerebras_reasoning_field_tool_call.jsonl")
    message = completion["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert completion == {
        "id": "chatcmpl-9e97f9ca-9626-4ef8-8543-6e3ee7cef659",
        "object": "chat.completion",
        "created": 1779147581,
        "model": "zai-glm-4.7",
        "system_fingerprint": "fp_a33c042689e969567008",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "reasoning": CEREBRAS_REASONING,
                    "tool_calls": [_tool_call("bbd2b9d98", "nonUsefulTool", "{}")],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "total_tokens": 426,
            "completion_tokens": 104,
            "completion_tokens_details": {
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
                "reasoning_tokens": 97,
            },
            "prompt_tokens": 322,
            "prompt_tokens_details": {"cached_tokens": 256},
        },
        "time_info": {
            "created": 1779147581.1957242,
            "queue_time": 0.00306479,
            "prompt_time": 0.01150595,
            "completion_time": 0.16727912,
            "total_time": 0.1844015121459961,
        },
    }


def test_mistral_tool_call_without_index_or_type_is_one_function_call() -> None:
    completion = _completed_cleanly("mistral_tool_call_no_index.jsonl")
    assert completion == {
        "id": "b3999b8c93e04e11bcbff7bcab829667",
        "object": "chat.completion",
        "created": 1769088854,
        "model": "mistral-small-latest",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "refusal": None,
                    "tool_calls": [_tool_call("gSIMJiOkT", "weather", '{"location": "San Francisco"}')],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 124, "total_tokens": 146, "completion_tokens": 22},
    }


def test_mistral_glm_empty_name_on_a_continuation_and_delta_index_are_ignored() -> None:
    completion = _completed_cleanly("mistral_glm_incremental_tool_call.jsonl")
    assert "index" not in completion["choices"][0]["message"]
    assert completion == {
        "id": "735e434874a24f68a2390b3cab149242",
        "object": "chat.completion",
        "created": 1787234678,
        "model": "zai-glm-5-2",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "refusal": None,
                    "tool_calls": [
                        _tool_call(
                            "chatcmpl-tool-9f149c74c42f265b",
                            "webSearchTool",
                            '{"query": "current Berlin weather"}',
                        )
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 171,
            "total_tokens": 185,
            "completion_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 128},
        },
    }


def test_mistral_magistral_content_parts_split_into_reasoning_and_content() -> None:
    completion = _completed_cleanly("mistral_magistral_content_parts_reasoning.jsonl")
    assert completion == {
        "id": "a4e29c5b82f94d67b23e108a7c9df6e1",
        "object": "chat.completion",
        "created": 1769088912,
        "model": "magistral-medium-2507",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "2 + 2 = 4",
                    "refusal": None,
                    "reasoning_content": "The user is asking for 2+2. This is basic arithmetic. 2+2=4.",
                },
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "total_tokens": 56, "completion_tokens": 46},
    }


PERPLEXITY_CITATIONS = [
    "https://populationstat.com/united-states/san-francisco",
    "https://en.wikipedia.org/wiki/San_Francisco",
    "https://fred.stlouisfed.org/graph/?g=4K5j",
    "https://www.california-demographics.com/cities_by_population",
    "https://worldpopulationreview.com/us-cities/california/san-francisco",
    "https://worldpopulationreview.com/us-counties/california/san-francisco-county",
    "https://www.worldometers.info/world-population/us-population/",
]


def test_perplexity_cumulative_usage_is_the_last_chunks_not_a_sum() -> None:
    completion = _completed_cleanly("perplexity_cumulative_usage_every_chunk.jsonl")
    assert completion == {
        "id": "58cb9740-f356-49e9-b71e-a02a1376c1b9",
        "object": "chat.completion",
        "created": 1770768240,
        "model": "sonar",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The current population of **[2][3]", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 336, "total_tokens": 346},
        "citations": PERPLEXITY_CITATIONS,
    }


AZURE_SAFE = {"filtered": False, "severity": "safe"}


def test_azure_metadata_comes_from_the_first_chunk_that_has_it() -> None:
    completion = _completed_cleanly("azure_prompt_filter_first_chunk.jsonl")
    assert "system_fingerprint" not in completion
    assert completion == {
        "id": "chatcmpl-CYPS1lijGoK8gd9lYzY3r9Sx50nbt",
        "object": "chat.completion",
        "created": 1762317021,
        "model": "gpt-5-nano-2025-08-07",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Capital of Denmark.", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
                "content_filter_results": {
                    "hate": AZURE_SAFE,
                    "self_harm": AZURE_SAFE,
                    "sexual": AZURE_SAFE,
                    "violence": AZURE_SAFE,
                },
            }
        ],
        "usage": {
            "completion_tokens": 78,
            "completion_tokens_details": {
                "accepted_prediction_tokens": 0,
                "audio_tokens": 0,
                "reasoning_tokens": 64,
                "rejected_prediction_tokens": 0,
            },
            "prompt_tokens": 15,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
            "total_tokens": 93,
        },
        "prompt_filter_results": [
            {
                "prompt_index": 0,
                "content_filter_results": {
                    "hate": AZURE_SAFE,
                    "jailbreak": {"filtered": False, "detected": False},
                    "self_harm": AZURE_SAFE,
                    "sexual": AZURE_SAFE,
                    "violence": AZURE_SAFE,
                },
            }
        ],
        "obfuscation": "DjqQ9RbEQMJ3PX",
    }


XAI_REASONING = (
    "First, the user is asking about the weather in San Francisco. I have a available function called "
    '"weather" that retrieves the weather for a given location.\n\n'
    'The function requires a parameter: "location", which is a string. The user has provided "San Francisco" '
    "as the location, so that's clear and inferable.\n\n"
    "I should call this function to get the weather information. The format for calling the function is "
    "specific: I need to use <function_call> tags with JSON inside, like <function_call>"
    '{"action": "weather", "action_input": {"location": "San Francisco"}}</function_call>.\n\n'
    "This seems to be a direct match, so I don't need to ask for clarification. My response should only "
    "contain the function call if that's the next step, which it is.\n\n"
    'The instructions say: "Keep your response to user clear; please do not make your response verbose!" '
    "So, I shouldn't add any extra text; just the function call.\n\n"
    "Finally, after calling the function, if this were a multi-turn conversation, I might need to respond "
    "based on the result, but for now, this is the logical next step."
)


def test_xai_total_tokens_is_kept_as_sent_and_created_is_the_first_chunks() -> None:
    lines = _lines("xai_grok_reasoning_tool_call.jsonl")
    completion = _completed_cleanly("xai_grok_reasoning_tool_call.jsonl")
    assert len(XAI_REASONING) == 1069
    assert XAI_REASONING == _joined(lines, "reasoning_content")
    assert completion == {
        "id": "7027d986-3c59-a37a-9a5f-50713e01c8a6",
        "object": "chat.completion",
        "created": 1770772293,
        "model": "grok-3-mini",
        "system_fingerprint": "fp_2a885414fb",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "reasoning_content": XAI_REASONING,
                    "tool_calls": [_tool_call("call_79382389", "weather", '{"location":"San Francisco"}')],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 307,
            "completion_tokens": 26,
            "total_tokens": 560,
            "prompt_tokens_details": {"text_tokens": 307, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 306},
            "completion_tokens_details": {
                "reasoning_tokens": 227,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "num_sources_used": 0,
            "cost_in_usd_ticks": 1497500,
        },
    }
