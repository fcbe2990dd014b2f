#!/usr/bin/env python3
"""Tool calling through the official `openai` and `ollama` Python clients against a running
`hearth serve` offering a model whose chat template has tool syntax (the synthetic Qwen2
with Qwen2.5's template: Hermes <tool_call>; the synthetic Llama 3 with Llama 3.2's: one
JSON object): arguments validated against each tool's parameter schema with
`jsonschema`, streamed tool-call deltas reassembled equal to the whole answer, Ollama's
object arguments, and a tool result fed back.

    python3 tests/clients/test_tools.py http://127.0.0.1:PORT MODEL [NO_TOOLS_MODEL]
"""
import json, sys

import httpx
import jsonschema
import ollama
import openai

BASE, MODEL = sys.argv[1].rstrip("/"), sys.argv[2]
NO_TOOLS = sys.argv[3] if len(sys.argv) > 3 else None
FAILURES = []
oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)
ol = ollama.Client(host=BASE, timeout=300)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                                        "b": {"type": "integer", "minimum": -100, "maximum": 100}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MSG = [{"role": "user", "content": "What is the weather in Oslo, and what is 2 + 3?"}]


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
        FAILURES.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def valid(name, arguments):
    assert name in SCHEMAS, name
    jsonschema.validate(arguments, SCHEMAS[name])


def openai_required():
    for seed in range(10):
        r = oa.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                       max_tokens=300, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, r
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id, call
            valid(call.function.name, json.loads(call.function.arguments))


def openai_named_single():
    r = oa.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=300, seed=3,
                                   tool_choice={"type": "function", "function": {"name": "add"}},
                                   parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add", r
    valid("add", json.loads(calls[0].function.arguments))


def openai_stream_equals_whole():
    kwargs = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=300, seed=5)
    whole = oa.chat.completions.create(**kwargs).choices[0].message.tool_calls
    parts = {}
    finish = None
    for chunk in oa.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            p = parts.setdefault(d.index, {"name": "", "arguments": ""})
            p["name"] += d.function.name or ""
            p["arguments"] += d.function.arguments or ""
    streamed = [parts[i] for i in sorted(parts)]
    assert finish == "tool_calls", finish
    assert [(p["name"], json.loads(p["arguments"])) for p in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole], (streamed, whole)


def openai_tool_result_round_trip():
    first = oa.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=300, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    call = first.choices[0].message.tool_calls[0]
    messages = MSG + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r = oa.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.content is not None, r


def openai_no_tool_syntax():
    if not NO_TOOLS:
        return
    try:
        oa.chat.completions.create(model=NO_TOOLS, messages=MSG, tools=TOOLS, max_tokens=4)
    except openai.BadRequestError as e:
        assert "tool" in str(e.body), e.body
        return
    raise AssertionError("tools accepted by a template without tool syntax")


def ollama_tools():
    # Ollama has no tool_choice; hearth accepts OpenAI's as an extension (sent here as a
    # plain request, since ollama.Client.chat has no such parameter).
    r = httpx.post(f"{BASE}/api/chat", timeout=300, json={
        "model": MODEL, "messages": MSG, "tools": TOOLS, "tool_choice": "required", "stream": False,
        "options": {"num_predict": 300, "seed": 2}}).json()
    calls = r["message"]["tool_calls"]
    assert calls, r
    for call in calls:
        assert isinstance(call["function"]["arguments"], dict), call
        valid(call["function"]["name"], call["function"]["arguments"])
    # The client's own chat() with tools (auto): an answer, text or calls, parsed by the client.
    o = ol.chat(model=MODEL, messages=MSG, tools=TOOLS, options={"num_predict": 16, "seed": 2})
    for call in o.message.tool_calls or []:
        valid(call.function.name, dict(call.function.arguments))


for name, fn in [("openai_required", openai_required), ("openai_named_single", openai_named_single),
                 ("openai_stream_equals_whole", openai_stream_equals_whole),
                 ("openai_tool_result_round_trip", openai_tool_result_round_trip),
                 ("openai_no_tool_syntax", openai_no_tool_syntax), ("ollama_tools", ollama_tools)]:
    check(name, fn)
print(f"{len(FAILURES)} failed")
sys.exit(1 if FAILURES else 0)
