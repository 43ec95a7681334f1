"""Checks a running `lwm serve` with the official `openai` Python client.

Usage: client_check.py BASE_URL MODEL_ID
Exits non-zero with a message on the first failed check; prints one line per check.
"""
import json
import sys
import urllib.error
import urllib.request

import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300)
TAGS = ["science", "sports", "politics", "cooking", "music", "travel", "technology", "health"]
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^doc-[0-9]{1,4}$"},
        "tags": {"type": "array", "items": {"enum": TAGS}, "maxItems": 3},
        "meta": {
            "type": "object",
            "properties": {"language": {"enum": ["en", "fr", "de"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["language", "confidence"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "tags", "meta"],
    "additionalProperties": False,
}


def ok(name):
    print("ok", name, flush=True)


def check(cond, msg):
    if not cond:
        raise SystemExit("FAILED: " + msg)


def raw(path, body, content_type="application/json"):
    """POST raw bytes; returns (status, parsed JSON body)."""
    req = urllib.request.Request(BASE + path, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def error_shape(status, body, want_status, name):
    check(status == want_status, f"{name}: status {status}, want {want_status}: {body}")
    err = body.get("error")
    check(isinstance(err, dict), f"{name}: no error object: {body}")
    for k in ("message", "type", "param", "code"):
        check(k in err, f"{name}: error lacks {k}: {body}")
    check(isinstance(err["message"], str) and err["message"], f"{name}: empty message")


def still_serving(name):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    check(r.choices[0].text != "" and r.usage.completion_tokens >= 1, f"server unusable after {name}")


def validate(v):
    try:
        import jsonschema  # the reference validator, when installed
        jsonschema.validate(v, SCHEMA)
        return
    except ImportError:
        pass
    check(set(v) == {"id", "tags", "meta"}, f"keys {set(v)}")
    check(len(v["tags"]) <= 3 and all(t in TAGS for t in v["tags"]), f"tags {v['tags']}")


# --- happy paths
models = client.models.list()
check([m.id for m in models.data] == [MODEL], f"models: {models}")
ok("models")

r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0, seed=1
)
text = r.choices[0].message.content
check(len(text) > 0, f"chat answer {text!r}")
check(r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 1, f"usage {r.usage}")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total_tokens")
check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
ok("chat")

# Same prompt again: the prompt cache serves all but the last prompt token.
r2 = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0, seed=1
)
check(r2.choices[0].message.content == text, "greedy repeat differs")
cached = r2.usage.prompt_tokens_details.cached_tokens
check(cached == r2.usage.prompt_tokens - 1, f"prompt cache reused {cached} of {r2.usage.prompt_tokens}")
ok("prompt cache")

r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=["8"])
check(r.choices[0].text.startswith(" 5, 6"), f"completion {r.choices[0].text!r}")
check("8" not in r.choices[0].text, "stop string leaked")
ok("completion")

r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
check(len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and all(x <= 0 for x in lp.token_logprobs), f"logprobs {lp}")
ok("completion logprobs")

r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
)
c = r.choices[0].logprobs.content
check(len(c) >= 1 and len(c[0].top_logprobs) == 3 and c[0].top_logprobs[0].logprob >= c[0].logprob - 1e-5, f"{c}")
ok("chat logprobs")

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
    temperature=0, seed=1, stream=True, stream_options={"include_usage": True},
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            parts.append(ch.delta.content)
        finish = ch.finish_reason or finish
check("".join(parts) == text, f"stream {''.join(parts)!r} != {text!r}")
check(finish in ("stop", "length") and usage and usage.completion_tokens >= 1, f"finish {finish} usage {usage}")
ok("chat stream")

stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stream=True)
check("".join(c.choices[0].text for c in stream if c.choices).startswith(" 5, 6"), "completion stream")
ok("completion stream")

# A client that goes away mid-stream: the server keeps serving.
stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=400, stream=True
)
for i, _ in enumerate(stream):
    if i == 3:
        break
stream.close()
still_serving("client disconnect")
ok("disconnect")

docs = [
    ("doc-17", "The team scored twice in the second half and won the championship final."),
    ("doc-203", "Simmer the tomatoes with garlic and basil, then toss the sauce with fresh pasta."),
]
for (doc_id, doc), temperature, seed in [(docs[0], 0.0, 0), (docs[1], 1.0, 5), (docs[0], 1.2, 11)]:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Document {doc_id}: {doc}\nTag it with at most 3 tags from: {', '.join(TAGS)}. Answer in JSON."}],
        max_tokens=160, temperature=temperature, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "tags", "schema": SCHEMA, "strict": True}},
    )
    check(r.choices[0].finish_reason == "stop", f"json_schema did not finish: {r.choices[0].message.content!r}")
    validate(json.loads(r.choices[0].message.content))
ok("json_schema")

r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Give a JSON object describing a dog."}],
    max_tokens=128, temperature=0.7, seed=3, response_format={"type": "json_object"},
)
if r.choices[0].finish_reason == "stop":
    check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object")
ok("json_object")

# --- bad input: 4xx in OpenAI's error shape, and the server keeps serving.
def expect_api_error(name, status, call):
    try:
        call()
    except openai.APIStatusError as e:
        check(e.status_code == status, f"{name}: status {e.status_code}, want {status}: {e.body}")
        check(isinstance(e.body, dict) and "message" in e.body and "type" in e.body, f"{name}: body {e.body}")
    else:
        raise SystemExit(f"FAILED: {name}: no error")
    still_serving(name)
    ok("error: " + name)


msgs = [{"role": "user", "content": "hi"}]
expect_api_error("empty messages", 400, lambda: client.chat.completions.create(model=MODEL, messages=[]))
expect_api_error("unknown model", 404, lambda: client.chat.completions.create(model="no-such-model", messages=msgs))
expect_api_error("temperature wrong type", 400, lambda: client.chat.completions.create(model=MODEL, messages=msgs, extra_body={"temperature": "hot"}))
expect_api_error("max_tokens wrong type", 400, lambda: client.completions.create(model=MODEL, prompt="x", extra_body={"max_tokens": "ten"}))
expect_api_error("messages wrong type", 400, lambda: client.chat.completions.create(model=MODEL, messages="hello"))
expect_api_error("invalid schema", 400, lambda: client.chat.completions.create(
    model=MODEL, messages=msgs,
    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 4, "maxItems": 1}}}))
expect_api_error("prompt over context", 400, lambda: client.completions.create(model=MODEL, prompt="word " * 10000, max_tokens=1))
expect_api_error("max_tokens over limit", 400, lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=10**9))

for name, path, body, want in [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400),
    ("body not an object", "/v1/completions", b"[1, 2]", 400),
    ("oversized body", "/v1/completions", json.dumps({"model": MODEL, "prompt": "a" * 150_000}).encode(), 413),
    ("missing prompt", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400),
    ("stop wrong type", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": 5}).encode(), 400),
    ("unknown endpoint", "/v1/nothing", b"{}", 404),
]:
    status, body = raw(path, body)
    error_shape(status, body, want, name)
    still_serving(name)
    ok("error: " + name)

# Unknown fields are ignored.
r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, extra_body={"no_such_field": [1, 2], "user": "x"})
check(r.usage.completion_tokens >= 1, "unknown fields")
ok("unknown fields ignored")

with urllib.request.urlopen(BASE + "/metrics", timeout=30) as resp:
    metrics = resp.read().decode()
for needle in ("lwm_requests_total{", "lwm_completion_tokens_total", "lwm_queue_depth", "lwm_request_duration_seconds_bucket", "lwm_cancelled_requests_total"):
    check(needle in metrics, f"metrics lack {needle}")
with urllib.request.urlopen(BASE + "/health", timeout=30) as resp:
    check(json.loads(resp.read())["status"] == "ok", "health")
ok("metrics and health")
print("all checks passed")
