"""Checks a running `lwm serve` with the official `openai` Python client.

Usage: client_check.py BASE_URL MODEL_ID API_KEY LWM_BINARY MODEL_PATH CORS_ORIGIN
The server runs with API_KEY as its key and CORS_ORIGIN allowed; LWM_BINARY and
MODEL_PATH give `lwm tokenize` to compare /tokenize with.
Exits non-zero with a message on the first failed check; prints one line per check.
"""
import json
import subprocess
import sys
import urllib.error
import urllib.request

import openai

BASE, MODEL, KEY, LWM, MODEL_PATH, ORIGIN = sys.argv[1:7]
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)
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


def http(method, path, body=None, headers=None, key=KEY):
    """One request; returns (status, headers, body bytes)."""
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = "Bearer " + key
    h.update(headers or {})
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(path, body, content_type="application/json"):
    """POST raw bytes; returns (status, parsed JSON body)."""
    status, _, data = http("POST", path, body, {"Content-Type": content_type})
    return status, json.loads(data)


def post_json(path, obj):
    return raw(path, json.dumps(obj).encode())


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


def expect_400(name, call, param):
    """`call` must fail with 400 naming `param`, and the server must keep serving."""
    try:
        call()
    except openai.BadRequestError as e:
        check(e.body.get("param") == param, f"{name}: param {e.body}")
    else:
        raise SystemExit(f"FAILED: {name}: no error")
    still_serving(name)
    ok("error: " + name)


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
# A schema that matches nothing (it only refers to itself) compiles in llguidance: it must
# be a 400 before generation starts, streamed or not (it was a 500, found by the soak).
for stream in (False, True):
    expect_api_error(f"schema matching nothing (stream={stream})", 400, lambda: client.chat.completions.create(
        model=MODEL, messages=msgs, stream=stream,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}))
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

# --- fields: harmless OpenAI ones are accepted, anything unimplemented is a 400 naming it.
r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, user="x")
check(r.usage.completion_tokens >= 1, "user accepted")
for name, call, param in [
    ("unknown field", lambda: client.completions.create(model=MODEL, prompt="x", extra_body={"no_such_field": [1, 2]}), "no_such_field"),
    ("unimplemented chat field", lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"audio": {"voice": "x"}}), "audio"),
    ("store true", lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], store=True), "store"),
    ("echo", lambda: client.completions.create(model=MODEL, prompt="x", echo=True), "echo"),
]:
    expect_400(name, call, param)

# --- sampling extras (llama-server's fields through extra_body) and logit_bias.
PROMPT = "The capital of France is"
greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
for extra in ({"top_k": 1}, {"min_p": 1.0}):
    outs = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=s, extra_body=extra).choices[0].text for s in (1, 2, 3)}
    check(outs == {greedy}, f"{extra} at temperature 1.5 should be greedy: {outs} vs {greedy!r}")
loop = client.completions.create(model=MODEL, prompt="1, 1, 1, 1, 1, 1,", max_tokens=8, temperature=0).choices[0].text
pen = client.completions.create(model=MODEL, prompt="1, 1, 1, 1, 1, 1,", max_tokens=8, temperature=0, extra_body={"repeat_penalty": 3.0}).choices[0].text
check(loop.startswith(" 1,") and pen != loop, f"repeat_penalty changed nothing: {loop!r} / {pen!r}")
ok("top_k, min_p, repeat_penalty")


def tokenize(text, **kw):
    status, body = post_json("/tokenize", {"content": text, **kw})
    check(status == 200, f"tokenize {status} {body}")
    return body["tokens"]


first = tokenize(greedy)[0]
banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias={str(first): -100}).choices[0].text
check(tokenize(banned)[0] != first and banned != greedy, f"banned token {first} still first: {banned!r}")
forced_ids = tokenize(" the")
check(len(forced_ids) == 1, f"' the' is {forced_ids}")
forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.8, seed=4, logit_bias={str(forced_ids[0]): 100}).choices[0].text
check(forced == " the" * 3, f"forced token: {forced!r}")
ok("logit_bias bans and forces")

# --- n: choices side by side, each seeded seed+i; usage counts the prompt once.
r3 = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=7, n=3)
check(sorted(c.index for c in r3.choices) == [0, 1, 2], f"n=3 indexes {[c.index for c in r3.choices]}")
r1 = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=8)
check(r3.choices[1].text == r1.choices[0].text, f"choice 1 is not seed+1: {r3.choices[1].text!r} vs {r1.choices[0].text!r}")
check(r3.usage.prompt_tokens == r1.usage.prompt_tokens, f"prompt counted once: {r3.usage} vs {r1.usage}")
check(3 <= r3.usage.completion_tokens <= 18 and r3.usage.completion_tokens > r1.usage.completion_tokens, f"usage {r3.usage}")
rc = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say a color."}], max_tokens=6, temperature=1.0, seed=7, n=3)
stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say a color."}], max_tokens=6, temperature=1.0, seed=7, n=3, stream=True, stream_options={"include_usage": True})
texts, finishes, usage = {}, {}, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        if ch.finish_reason:
            finishes[ch.index] = ch.finish_reason
check(sorted(finishes) == [0, 1, 2], f"stream finishes {finishes}")
check([texts[i] for i in range(3)] == [c.message.content for c in sorted(rc.choices, key=lambda c: c.index)], f"stream {texts} vs {[c.message.content for c in rc.choices]}")
check(usage and usage.completion_tokens == rc.usage.completion_tokens, f"stream usage {usage} vs {rc.usage}")
ok("n=3 (plain and streamed)")

# --- tools: the call is forced by the grammar, its arguments match the schema.
import jsonschema

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
for choice, seed in (("required", 1), ("required", 2), ({"type": "function", "function": {"name": "get_time"}}, 3)):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0.8, seed=seed)
    c = r.choices[0]
    check(c.finish_reason == "tool_calls" and c.message.content is None, f"no tool call: {c}")
    call = c.message.tool_calls[0]
    check(call.type == "function" and call.id.startswith("call_"), f"call {call}")
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    if isinstance(choice, dict):
        check(call.function.name == "get_time", f"named tool_choice ignored: {call}")
    jsonschema.validate(json.loads(call.function.arguments), schema)
weather_call = None
stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0, stream=True)
name, args, finish = "", "", None
for chunk in stream:
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
            weather_call = weather_call or tc.id
        finish = ch.finish_reason or finish
check(finish == "tool_calls" and name in ("get_weather", "get_time"), f"streamed call {name!r} {finish}")
jsonschema.validate(json.loads(args), {"get_weather": WEATHER, "get_time": TIME}[name])
auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0)
a = auto.choices[0]
check(a.finish_reason == "tool_calls" or (a.message.content and not a.message.content.startswith("<")), f"auto: {a}")
ok("tools: required, named, streamed, auto")

# The round trip: the call and its result go back in; the answer reads them.
call = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, temperature=0).choices[0].message.tool_calls[0]
history = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 31 degrees celsius."},
]
r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0)
check(isinstance(r.choices[0].message.content, str) and r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length"), f"round trip {r}")
short = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0)
check(r.usage.prompt_tokens > short.usage.prompt_tokens + 10, f"the call and result did not reach the prompt: {r.usage} vs {short.usage}")
ok("tools: role tool round trip")

# --- uniqueItems: enforced, never a duplicate.
UNIQ = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["sports", "music", "science", "travel"]}, "minItems": 3, "maxItems": 4, "uniqueItems": True}}, "required": ["tags"], "additionalProperties": False}
for seed in (1, 2, 3, 4):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tag this: the band played music at the stadium. Repeat tags as often as you like."}],
        max_tokens=60, temperature=1.3, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "tags", "schema": UNIQ}},
    )
    v = json.loads(r.choices[0].message.content)
    jsonschema.validate(v, UNIQ)
    check(len(set(v["tags"])) == len(v["tags"]) >= 3, f"tags {v}")
ok("uniqueItems")

# --- /tokenize, /detokenize, /props, models/{id}.
TEXT = "Hello world, tokenize me: ünïcödé 123"
cli = json.loads(subprocess.run([LWM, "tokenize", "-m", MODEL_PATH, "-p", TEXT, "--json"], capture_output=True, text=True, check=True).stdout)
ids = tokenize(TEXT, add_special=True)
check(ids == cli["ids"], f"/tokenize {ids} != lwm tokenize {cli['ids']}")
pieces = tokenize(TEXT, with_pieces=True)
check([p["id"] for p in pieces] == tokenize(TEXT) and all("piece" in p for p in pieces), f"with_pieces {pieces}")
status, body = post_json("/detokenize", {"tokens": tokenize(TEXT)})
check(status == 200 and body["content"] == TEXT, f"/detokenize {status} {body}")
status, body = post_json("/detokenize", {"tokens": [1, 10**9]})
error_shape(status, body, 400, "detokenize out of vocabulary")
status, body = post_json("/tokenize", {"content": 5})
error_shape(status, body, 400, "tokenize wrong type")
status, _, data = http("GET", "/props")
props = json.loads(data)
check(status == 200 and props["total_slots"] == 8 and props["n_ctx"] > 0 and props["model_alias"] == MODEL and "im_start" in props["chat_template"], f"props {props}")
check(client.models.retrieve(MODEL).id == MODEL, "models/{id}")
try:
    client.models.retrieve("no-such-model")
except openai.NotFoundError as e:
    check(e.body.get("code") == "model_not_found", f"{e.body}")
else:
    raise SystemExit("FAILED: models/{id} of an unknown model")
ok("tokenize, detokenize, props, models/{id}")

# --- API key and CORS.
bad = openai.OpenAI(base_url=BASE + "/v1", api_key="wrong-key", max_retries=0, timeout=60)
for name, call in [("wrong key chat", lambda: bad.chat.completions.create(model=MODEL, messages=ASK)), ("wrong key models", lambda: bad.models.list())]:
    try:
        call()
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.body.get("code") == "invalid_api_key" and e.body.get("type") == "invalid_request_error", f"{name}: {e.body}")
    else:
        raise SystemExit(f"FAILED: {name}: accepted")
    still_serving(name)
status, _, _ = http("POST", "/tokenize", b'{"content": "x"}', key=None)
check(status == 401, f"tokenize without a key: {status}")
status, _, _ = http("GET", "/health", key=None)
check(status == 200, f"health without a key: {status}")
ok("api key")
status, h, _ = http("OPTIONS", "/v1/chat/completions", None, {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}, key=None)
check(status in (200, 204) and h.get("Access-Control-Allow-Origin") == ORIGIN, f"preflight {status} {dict(h)}")
check("POST" in h.get("Access-Control-Allow-Methods", "") and "authorization" in h.get("Access-Control-Allow-Headers", "").lower(), f"preflight {dict(h)}")
status, h, _ = http("GET", "/v1/models", None, {"Origin": ORIGIN})
check(status == 200 and h.get("Access-Control-Allow-Origin") == ORIGIN, f"CORS on GET {dict(h)}")
status, h, _ = http("GET", "/v1/models", None, {"Origin": "http://elsewhere.test"})
check(status == 200 and h.get("Access-Control-Allow-Origin") is None, f"CORS for another origin {dict(h)}")
ok("cors")

# --- bad tool and n input: 400 naming the parameter, and the server keeps serving.
for name, kw, param in [
    ("malformed tool schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ("unusable tool schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "array", "minItems": 4, "maxItems": 1}}, "required": ["x"]}}}], "tool_choice": "none"}, "tools[0].function.parameters"),
    ("unknown tool name", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}, "tool_choice"),
    ("tool message without tool_call_id", {"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ("n too large", {"n": 9}, "n"),
    ("logit_bias out of range", {"logit_bias": {"5": 150}}, "logit_bias"),
    ("logit_bias outside the vocabulary", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("min_p out of range", {"extra_body": {"min_p": 2}}, "min_p"),
    ("top_k negative", {"extra_body": {"top_k": -1}}, "top_k"),
    ("repeat_penalty zero", {"extra_body": {"repeat_penalty": 0}}, "repeat_penalty"),
    ("uniqueItems where it cannot be enforced", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}, "response_format"),
]:
    args = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    args.update(kw)
    expect_400(name, lambda: client.chat.completions.create(**args), param)

status, _, data = http("GET", "/metrics")
metrics = data.decode()
check(status == 200, f"metrics {status}")
for needle in ("lwm_requests_total{", "lwm_completion_tokens_total", "lwm_queue_depth", "lwm_request_duration_seconds_bucket", "lwm_cancelled_requests_total"):
    check(needle in metrics, f"metrics lack {needle}")
status, _, data = http("GET", "/health")
check(status == 200 and json.loads(data)["status"] == "ok", "health")
ok("metrics and health")
print("all checks passed")
