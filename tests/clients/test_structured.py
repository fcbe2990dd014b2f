#!/usr/bin/env python3
"""Structured output through the official `openai` and `ollama` Python clients against a
running `hearth serve`; every output is validated with the `jsonschema` package.

    python3 tests/clients/test_structured.py http://127.0.0.1:PORT MODEL [REQUESTS] [--free-form]

REQUESTS (default 50) json_schema requests spread over the schemas below (nested objects,
arrays, enums, required, additionalProperties: false, string patterns and lengths, number
ranges): 100% must finish and validate. --free-form adds the `json_object` / `format: "json"`
checks, whose output size no schema bounds (a base model such as Gemma3-270M may repeat
itself inside a string until max_tokens). Run by tests/structured.rs.
"""
import concurrent.futures
import json, re, sys
from typing import Annotated, List, Literal

import jsonschema
import ollama
import openai
import pydantic

FREE_FORM = "--free-form" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--free-form"]
BASE = ARGS[0].rstrip("/")
MODEL = ARGS[1] if len(ARGS) > 1 else "smollm2"
REQUESTS = int(ARGS[2]) if len(ARGS) > 2 else 50
FAILURES = []

oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)
ol = ollama.Client(host=BASE, timeout=300)


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
        FAILURES.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


class Address(pydantic.BaseModel):
    street: str = pydantic.Field(max_length=40)
    city: str = pydantic.Field(max_length=30)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["engineer", "teacher", "farmer"]
    address: Address
    hobbies: List[Annotated[str, pydantic.Field(max_length=20)]] = pydantic.Field(max_length=3)


SCHEMAS = [
    ("person", "Describe a person who lives in a small town.", Person.model_json_schema()),
    ("order", "Write a coffee shop order.", {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                "type": "object",
                "properties": {"drink": {"enum": ["latte", "espresso", "tea"]},
                               "size": {"enum": ["small", "large"]},
                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["drink", "size", "count"], "additionalProperties": False}},
            "total": {"type": "number", "minimum": 0, "maximum": 100},
        },
        "required": ["id", "items", "total"], "additionalProperties": False}),
    ("weather", "Report today's weather in Oslo.", {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "celsius": {"type": "integer", "minimum": -50, "maximum": 50},
                       "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
                       "wind": {"type": "object", "properties": {
                           "speed": {"type": "integer", "minimum": 0, "maximum": 200},
                           "direction": {"enum": ["N", "E", "S", "W"]}},
                           "required": ["speed", "direction"], "additionalProperties": False}},
        "required": ["city", "celsius", "sky", "wind"], "additionalProperties": False}),
    ("book", "Recommend a book.", {
        "type": "object",
        "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 40},
                       "year": {"type": "integer", "minimum": 1450, "maximum": 2026},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                "maxItems": 3},
                       "rating": {"type": "number", "minimum": 0, "maximum": 5},
                       "available": {"type": "boolean"}},
        "required": ["title", "year", "tags", "rating", "available"], "additionalProperties": False}),
    ("colours", "Name some colours.", {
        "type": "array", "minItems": 2, "maxItems": 5,
        "items": {"enum": ["red", "green", "blue", "yellow", "black", "white"]}}),
]


def schema_requests():
    # Two at a time: the server decodes them in one batch (--parallel 2), each under its own
    # grammar, as two users' requests would be.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = [b for b in pool.map(schema_request, range(REQUESTS)) if b]
    assert not bad, f"{len(bad)}/{REQUESTS} invalid: {bad[:3]}"
    print(f"     {REQUESTS}/{REQUESTS} outputs valid over {len(SCHEMAS)} schemas")


def schema_request(i):
    """Request `i`; None when its output is valid, else what was wrong."""
    name, prompt, schema = SCHEMAS[i % len(SCHEMAS)]
    r = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=400, seed=i,
        temperature=0.8 if i >= len(SCHEMAS) else 0,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    c = r.choices[0]
    try:
        assert c.finish_reason == "stop", f"finish {c.finish_reason}"
        jsonschema.validate(json.loads(c.message.content), schema)
    except (AssertionError, ValueError, jsonschema.ValidationError) as e:
        return (name, i, str(e)[:200], c.message.content[:300])
    return None


def openai_parse():
    r = oa.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a teacher."}],
                                  response_format=Person, max_tokens=400, temperature=0)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person), r
    assert 0 <= p.age <= 120 and len(p.hobbies) <= 3, p


def openai_parse_length():
    # Too few tokens to close the object: finish_reason "length", which parse() reports.
    try:
        oa.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a farmer."}],
                                  response_format=Person, max_tokens=5, temperature=0)
    except openai.LengthFinishReasonError:
        return
    raise AssertionError("no LengthFinishReasonError")


def openai_json_object():
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with the keys name and age of a cat."}],
                                   response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(json.loads(r.choices[0].message.content), dict), r


def openai_stream_schema():
    schema = SCHEMAS[2][2]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": SCHEMAS[2][1]}], max_tokens=300, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(stream=True, **kwargs)
                   if c.choices)
    jsonschema.validate(json.loads(text), schema)
    assert text == oa.chat.completions.create(**kwargs).choices[0].message.content


def openai_bad_schema():
    try:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "x", "schema": {"type": "object", "properties": {"a": {"enum": []}},
                                                               "required": ["a"]}}})
    except openai.BadRequestError as e:
        assert e.body and "response_format" in str(e.body), e.body
        return
    raise AssertionError("accepted")


def ollama_format_schema():
    r = ol.chat(model=MODEL, messages=[{"role": "user", "content": "Describe an engineer."}],
                format=Person.model_json_schema(), options={"num_predict": 400, "temperature": 0})
    assert r.done_reason == "stop", r
    Person.model_validate_json(r.message.content)


def ollama_format_json():
    r = ol.generate(model=MODEL, prompt="Give a JSON object with the keys name and age of a cat.", format="json",
                    options={"num_predict": 300, "temperature": 0})
    assert r.done_reason == "stop", r
    assert isinstance(json.loads(r.response), dict), r


def ollama_bad_format():
    try:
        ol.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], format={"type": "nonsense"})
    except ollama.ResponseError as e:
        assert e.status_code == 400, e
        return
    raise AssertionError("accepted")


def bounded_numbers():
    """Numbers with no bounds, sampled hot: llama.cpp's schema grammars end a number's parts
    at 16 digits each; without that a model can write digits until max_tokens."""
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
              "required": ["x", "y"], "additionalProperties": False}
    for seed in range(6):
        r = oa.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Two long numbers."}], max_tokens=200,
            seed=seed, temperature=1.5,
            response_format={"type": "json_schema", "json_schema": {"name": "nums", "schema": schema}})
        c = r.choices[0]
        runs = [len(m) for m in re.findall(r"[0-9]+", c.message.content)]
        assert c.finish_reason == "stop" and max(runs) <= 16, (c.finish_reason, c.message.content[:200])
        jsonschema.validate(json.loads(c.message.content), schema)


CHECKS = [("schema_requests", schema_requests), ("bounded_numbers", bounded_numbers), ("openai_parse", openai_parse),
          ("openai_parse_length", openai_parse_length), ("openai_stream_schema", openai_stream_schema),
          ("openai_bad_schema", openai_bad_schema), ("ollama_format_schema", ollama_format_schema),
          ("ollama_bad_format", ollama_bad_format)]
if FREE_FORM:
    CHECKS += [("openai_json_object", openai_json_object), ("ollama_format_json", ollama_format_json)]
for name, fn in CHECKS:
    check(f"{MODEL} {name}", fn)
print(f"{len(FAILURES)} failed")
sys.exit(1 if FAILURES else 0)
