#!/usr/bin/env python3
"""The official `openai` and `ollama` Python clients against a running `hearth serve`.

    python3 tests/clients/test_clients.py http://127.0.0.1:PORT [MODEL [OTHER_MODEL...]]

MODEL (default smollm2) gets every check; each OTHER_MODEL is listed and chats through
both clients. Run by tests/clients.rs, which starts the server on a free loopback port over
a folder of the user's own GGUF files.
"""
import sys

import ollama
import openai

BASE = sys.argv[1].rstrip("/")
MODEL = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
OTHER_MODELS = sys.argv[3:]
FAILURES = []


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
        FAILURES.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
ol = ollama.Client(host=BASE, timeout=120)
MSG = [{"role": "user", "content": "Why is the sky blue?"}]


def openai_models():
    ids = [m.id for m in oa.models.list()]
    assert MODEL in ids, ids


def openai_chat():
    r = oa.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and len(c.message.content) > 10, r
    assert c.finish_reason == "length", c.finish_reason
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0, r.usage


def openai_stream():
    stream = oa.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = oa.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, temperature=0)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"], finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16, chunks[-1]


def openai_completion():
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text, r.choices[0].text
    s = oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def openai_stop():
    r = oa.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0, stop=["."])
    c = r.choices[0]
    assert c.finish_reason == "stop" and "." not in c.message.content, c


def openai_seed():
    def once():
        r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=16, temperature=1.0, seed=1234)
        return r.choices[0].message.content
    assert once() == once()


def openai_errors():
    def expect(exc, **kw):
        args = dict(model=MODEL, messages=MSG, max_tokens=4)
        args.update(kw)
        try:
            oa.chat.completions.create(**args)
        except exc as e:
            assert e.body and "message" in e.body, e.body
            return
        raise AssertionError(f"{kw} was accepted")
    expect(openai.NotFoundError, model="no-such-model")
    expect(openai.BadRequestError, model="../../etc/passwd")
    expect(openai.BadRequestError, temperature=-1)
    expect(openai.BadRequestError, top_p=3)
    expect(openai.BadRequestError, n=2)
    expect(openai.BadRequestError, messages=[{"role": "user", "content": "word " * 5000}])


def openai_embeddings():
    r = oa.embeddings.create(model="minilm", input=["hello world", "the sea"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384, r
    assert r.usage.prompt_tokens > 0
    # The client asks for base64 by default and decodes it; "float" must give the same numbers.
    f = oa.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert all(abs(x - y) < 1e-5 for x, y in zip(f.data[0].embedding, r.data[0].embedding))


def ollama_embed():
    r = ol.embed(model="minilm", input=["hello world", "the sea"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384, r
    one = ol.embed(model="minilm", input="hello world")
    assert all(abs(x - y) < 1e-5 for x, y in zip(one.embeddings[0], r.embeddings[0]))


def ollama_list_show_ps():
    names = [m.model for m in ol.list().models]
    assert MODEL in names, names
    info = ol.show(MODEL)
    assert info.details.quantization_level == "Q4_1", info.details
    ol.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})
    assert any(m.model == MODEL for m in ol.ps().models)


def ollama_generate():
    r = ol.generate(model=MODEL, prompt="Why is the sky blue?", options={"num_predict": 12, "temperature": 0})
    assert r.done and r.done_reason == "length" and len(r.response) > 10, r
    assert r.eval_count == 12 and r.prompt_eval_count > 0 and r.total_duration > 0, r
    parts = list(ol.generate(model=MODEL, prompt="Why is the sky blue?", stream=True,
                             options={"num_predict": 12, "temperature": 0}))
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].done and not any(p.done for p in parts[:-1])


def ollama_chat():
    r = ol.chat(model=MODEL, messages=MSG, options={"num_predict": 12, "temperature": 0})
    assert r.message.role == "assistant" and len(r.message.content) > 10, r
    parts = list(ol.chat(model=MODEL, messages=MSG, stream=True, options={"num_predict": 12, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == r.message.content
    stopped = ol.chat(model=MODEL, messages=MSG, options={"num_predict": 40, "temperature": 0, "stop": ["."]})
    assert stopped.done_reason == "stop" and "." not in stopped.message.content, stopped


def other_models_by_file_stem():
    ids = [m.id for m in oa.models.list()]
    names = [m.model for m in ol.list().models]
    for model in OTHER_MODELS:
        assert model in ids and model in names, (model, ids, names)
        r = oa.chat.completions.create(model=model, messages=MSG, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.model == model, r
        o = ol.chat(model=model + ":latest", messages=MSG, options={"num_predict": 4, "temperature": 0})
        assert o.done_reason == "length" and o.message.content == r.choices[0].message.content, (o, r)


def every_listed_model_answers():
    # Both clients list the same names, and every one of them can be used.
    listed = ol.list().models
    assert sorted(m.model for m in listed) == sorted(m.id for m in oa.models.list())
    for m in listed:
        if m.details.format == "safetensors":
            ol.embed(model=m.model, input="Hi")
        else:
            ol.generate(model=m.model, prompt="Hi", options={"num_predict": 1})


def ollama_errors():
    for model in ["no-such-model", "../x"]:
        try:
            ol.chat(model=model, messages=MSG)
        except ollama.ResponseError as e:
            assert e.status_code in (400, 404), e.status_code
            continue
        raise AssertionError(f"{model} accepted")


for name, fn in list(globals().items()):
    if name.startswith(("openai_", "ollama_")) and callable(fn):
        check(name, fn)
print(f"{len(FAILURES)} failed")
sys.exit(1 if FAILURES else 0)
