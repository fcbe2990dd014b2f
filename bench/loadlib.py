"""Shared pieces of the loopback load scripts (bench/serve-load, bench/soak): a free port,
waiting for a server, one streamed chat completion with its timings, percentiles."""
import http.client, json, socket, time

QUESTIONS = ["Why is the sky blue?", "How do plants grow?", "What is a computer?", "Why do we sleep?",
             "How does rain form?", "What is music?", "Why is the sea salty?", "How do birds fly?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, model, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not come up")


def one_request(port, model, question, max_tokens):
    """Streams one chat completion; returns (ok, tokens, ttft, [inter-token gaps])."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return False, 0, 0.0, []
        ttft, last, gaps, pieces, usage = None, None, [], 0, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if content:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
                pieces += 1
        return ttft is not None, usage if usage is not None else pieces, ttft or 0.0, gaps
    except (OSError, ValueError, KeyError):
        return False, 0, 0.0, []


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
