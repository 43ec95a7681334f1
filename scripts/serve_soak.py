#!/usr/bin/env python3
"""Soak (and load) test for `lwm serve` (not a CI test): C concurrent clients for D seconds
over a weighted mix of good and bad requests, with the server's RSS, threads and open fds
sampled every second.

    cargo build --release -p lwm-cli
    python3 scripts/serve_soak.py --lwm target/release/lwm --clients 32 --seconds 600 \
        --json soak.json --png soak.png
    python3 scripts/serve_soak.py --url http://127.0.0.1:8080 --pid PID ...   # a running server

With --lwm it starts `lwm serve --model MODEL --port 0 --max-active C` itself (with an API
key, so wrong keys can be tried; extra flags after --server-arg) and stops it at the end.
Each client loops over the mix (--mix, weights): plain and streamed chat with the official
`openai` client, streams and non-streamed requests the client abandons mid-way (a raw
socket closed: a real disconnect), a long prompt near the context and one over it (must be
a 400 naming it), json_schema output (validated), /v1/completions, malformed or invalid
requests over raw HTTP (each must be its 4xx in OpenAI's error shape), and the GET
endpoints. Every request ends in one of: ok, expected 4xx, cancelled (by us), or
UNEXPECTED (a 5xx, a connection error or timeout we did not cause, a 2xx for a bad
request, a 4xx for a good one, an answer that does not parse), with examples.

At the end: a summary, a JSON (--json) with the counts and the per-second series, a PNG
of RSS over time (--png, needs matplotlib), and checks that the server answers a normal
request, has nothing left in flight (/metrics), logged no panic, and that RSS stayed flat
over the second half of the load (linear-fit slope <= --max-slope MiB/min, and the last
window's median <= the first window after warm-up's median x (1 + --max-growth)).
Exit status 1 if anything failed.
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import openai

TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "autumn", "bees", "a market"]
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "mood": {"enum": ["calm", "busy", "sad"]}},
    "required": ["title", "mood"],
    "additionalProperties": False,
}
# kind: weight. "bad" draws one of BAD_KINDS, "info" one of the GET endpoints.
DEFAULT_MIX = (
    "chat:20,stream:15,stream_disconnect:10,nonstream_disconnect:4,long_prompt:2,over_context:3,"
    "json_schema:8,completion:10,bad:17,info:10"
)
BAD_KINDS = [
    "malformed_json", "unknown_field", "wrong_type", "n_too_large", "unknown_model", "wrong_key",
    "too_large_body", "unknown_path", "empty_messages", "max_tokens_too_large", "bad_temperature",
    "unsatisfiable_schema",
]
LOREM = (
    "The committee met on a grey morning to review the harbour accounts, the state of the "
    "lighthouse, the price of rope and the schedule of the autumn ferries. "
)


class Soak:
    def __init__(self, a, base, key, model, ctx, max_prompt, max_body, max_n):
        self.a, self.base, self.key, self.model = a, base, key, model
        self.ctx, self.max_prompt, self.max_body, self.max_n = ctx, max_prompt, max_body, max_n
        u = urllib.parse.urlparse(base)
        self.host, self.port = u.hostname, u.port or 80
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=key or "unused", max_retries=0, timeout=a.timeout)
        self.lock = threading.Lock()
        self.counts = collections.defaultdict(collections.Counter)  # kind -> outcome -> n
        self.examples = []  # unexpected outcomes (kind, message), the first few
        self.latency = collections.defaultdict(list)
        self.long_text = None
        self.over_text = None

    # --- bookkeeping -------------------------------------------------------------------
    def record(self, kind, outcome, t0, detail=None):
        with self.lock:
            self.counts[kind][outcome] += 1
            if outcome == "ok":
                self.latency[kind].append(time.time() - t0)
            if outcome == "UNEXPECTED":
                if len(self.examples) < self.a.examples:
                    self.examples.append({"kind": kind, "t": round(time.time() - self.t_start, 1), "detail": str(detail)[:500]})
                print(f"UNEXPECTED {kind}: {str(detail)[:300]}", flush=True)

    def headers(self, key=None):
        h = {"Content-Type": "application/json"}
        k = self.key if key is None else key
        if k:
            h["Authorization"] = "Bearer " + k
        return h

    def raw(self, method, path, body=None, key=None, timeout=None):
        """One raw HTTP request on a fresh connection: (status, body bytes)."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.a.timeout)
        try:
            c.request(method, path, body=body, headers=self.headers(key))
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    # --- prompts -----------------------------------------------------------------------
    def n_tokens(self, text):
        st, b = self.raw("POST", "/tokenize", json.dumps({"content": text}).encode())
        if st != 200:
            raise RuntimeError(f"/tokenize: {st} {b[:200]!r}")
        return len(json.loads(b)["tokens"])

    def prepare_prompts(self):
        """A long document of about --long-tokens tokens (default: the context less 256,
        capped to fit with max_tokens and the template) and one of max_prompt + 200 tokens."""
        per = self.n_tokens(LOREM)
        target = min(self.a.long_tokens or self.ctx - 256, self.max_prompt - self.a.max_tokens - 64)
        self.long_target = target
        reps = max(1, target // per)
        self.long_text = "".join(f"[{i}] " + LOREM for i in range(reps))
        while self.n_tokens(self.long_text) > target:
            reps -= max(1, reps // 20)
            self.long_text = "".join(f"[{i}] " + LOREM for i in range(reps))
        over = (self.max_prompt + 200) // per + 2
        self.over_text = "".join(f"[{i}] " + LOREM for i in range(over))
        return self.n_tokens(self.long_text), self.n_tokens(self.over_text)

    # --- the request kinds ---------------------------------------------------------------
    def msgs(self, rng):
        return [{"role": "user", "content": f"Write two sentences about {rng.choice(TOPICS)}."}]

    def run_one(self, kind, rng):
        t0 = time.time()
        mt = self.a.max_tokens
        c = self.client
        try:
            if kind == "chat":
                r = c.chat.completions.create(model=self.model, messages=self.msgs(rng), max_tokens=mt,
                                              temperature=0.8, seed=rng.randrange(1 << 30))
                self.check_chat(r)
            elif kind == "stream":
                finish, usage = None, None
                stream = c.chat.completions.create(model=self.model, messages=self.msgs(rng), max_tokens=mt,
                                                   temperature=0.8, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    usage = chunk.usage or usage
                    for ch in chunk.choices:
                        finish = ch.finish_reason or finish
                if finish not in ("stop", "length") or not usage:
                    raise ValueError(f"stream ended without a finish reason or usage: {finish} {usage}")
            elif kind == "stream_disconnect":
                return self.stream_disconnect(kind, rng, t0)
            elif kind == "nonstream_disconnect":
                return self.nonstream_disconnect(kind, rng, t0)
            elif kind == "long_prompt":
                # A fresh first line: the prompt cache can reuse the template, not the document.
                head = f"Minutes of meeting {rng.randrange(10**6)}.\n"
                r = c.chat.completions.create(
                    model=self.model, max_tokens=mt, temperature=0.8,
                    messages=[{"role": "user", "content": head + self.long_text + "\nSummarise the minutes in one sentence."}])
                self.check_chat(r)
                if r.usage.prompt_tokens < self.long_target // 2:
                    raise ValueError(f"long prompt has only {r.usage.prompt_tokens} tokens")
            elif kind == "over_context":
                try:
                    c.chat.completions.create(model=self.model, max_tokens=mt,
                                              messages=[{"role": "user", "content": self.over_text}])
                except openai.BadRequestError as e:
                    body = e.body if isinstance(e.body, dict) else {}
                    if body.get("code") == "context_length_exceeded" and "tokens" in str(body.get("message")):
                        return self.record(kind, "expected_4xx", t0)
                    return self.record(kind, "UNEXPECTED", t0, f"400 without context_length_exceeded: {e.body}")
                return self.record(kind, "UNEXPECTED", t0, "a prompt over the context was accepted")
            elif kind == "json_schema":
                r = c.chat.completions.create(
                    model=self.model, messages=self.msgs(rng), max_tokens=2 * mt, temperature=0.8,
                    response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
                self.check_chat(r)
                if r.choices[0].finish_reason == "stop":
                    v = json.loads(r.choices[0].message.content)
                    if set(v) != {"title", "mood"} or v["mood"] not in ("calm", "busy", "sad"):
                        raise ValueError(f"schema violated: {v}")
            elif kind == "completion":
                r = c.completions.create(model=self.model, prompt=f"A short note about {rng.choice(TOPICS)}:",
                                         max_tokens=mt, temperature=0.8)
                if not r.choices or r.choices[0].finish_reason not in ("stop", "length") or r.usage.completion_tokens < 1:
                    raise ValueError(f"bad completion: {r}")
            elif kind.startswith("info:"):
                return self.info(kind, t0)
            elif kind.startswith("bad:"):
                return self.bad(kind, rng, t0)
            else:
                raise AssertionError(kind)
            self.record(kind, "ok", t0)
        except openai.APIStatusError as e:
            self.record(kind, "UNEXPECTED", t0, f"HTTP {e.status_code}: {e.body}")
        except Exception as e:  # connection errors, timeouts, bad answers
            self.record(kind, "UNEXPECTED", t0, repr(e))

    def check_chat(self, r):
        ch = r.choices[0]
        if ch.finish_reason not in ("stop", "length") or ch.message.content is None or r.usage.completion_tokens < 1:
            raise ValueError(f"bad chat answer: {r}")

    def stream_disconnect(self, kind, rng, t0):
        """Read a few SSE chunks of a long streamed answer, then close the socket."""
        body = json.dumps({"model": self.model, "messages": self.msgs(rng), "max_tokens": 200,
                           "temperature": 0.8, "stream": True}).encode()
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.a.timeout)
        try:
            c.request("POST", "/v1/chat/completions", body=body, headers=self.headers())
            r = c.getresponse()
            if r.status != 200:
                return self.record(kind, "UNEXPECTED", t0, f"HTTP {r.status}: {r.read()[:300]!r}")
            want, got = rng.randint(1, 6), 0
            while got < want:
                line = r.fp.readline()
                if not line:
                    return self.record(kind, "UNEXPECTED", t0, "the stream ended early")
                if line.startswith(b"data: [DONE]"):
                    return self.record(kind, "ok", t0)  # finished before we left
                if line.startswith(b"data: "):
                    if b'"error"' in line:
                        return self.record(kind, "UNEXPECTED", t0, line[:300])
                    got += 1
            c.sock.shutdown(socket.SHUT_RDWR)
            self.record(kind, "cancelled", t0)
        except Exception as e:
            self.record(kind, "UNEXPECTED", t0, repr(e))
        finally:
            c.close()

    def nonstream_disconnect(self, kind, rng, t0):
        """Send a non-streamed chat and hang up before the answer."""
        body = json.dumps({"model": self.model, "messages": self.msgs(rng), "max_tokens": 200,
                           "temperature": 0.8}).encode()
        try:
            s = socket.create_connection((self.host, self.port), timeout=self.a.timeout)
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n")
            if self.key:
                head += f"Authorization: Bearer {self.key}\r\n"
            s.sendall(head.encode() + b"\r\n" + body)
            time.sleep(rng.uniform(0.05, 2.0))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
            self.record(kind, "cancelled", t0)
        except Exception as e:
            self.record(kind, "UNEXPECTED", t0, repr(e))

    def info(self, kind, t0):
        path = kind.split(":", 1)[1]
        try:
            if path == "/v1/models":
                ids = [m.id for m in self.client.models.list().data]
                if ids != [self.model]:
                    raise ValueError(f"models {ids}")
            else:
                st, b = self.raw("GET", path)
                if st != 200:
                    return self.record(kind, "UNEXPECTED", t0, f"HTTP {st}: {b[:300]!r}")
                if path != "/metrics":
                    json.loads(b)
            self.record(kind, "ok", t0)
        except Exception as e:
            self.record(kind, "UNEXPECTED", t0, repr(e))

    def bad(self, kind, rng, t0):
        what = kind.split(":", 1)[1]
        good = {"model": self.model, "messages": self.msgs(rng), "max_tokens": 8}
        path, key, want, param = "/v1/chat/completions", None, 400, None
        if what == "malformed_json":
            body = json.dumps(good).encode()[: rng.randint(1, 40)]
        elif what == "unknown_field":
            body, param = json.dumps({**good, "frobnicate": True}).encode(), "frobnicate"
        elif what == "wrong_type":
            field, val = rng.choice([("max_tokens", "ten"), ("messages", "hi"), ("temperature", [1]), ("stream", "yes")])
            body, param = json.dumps({**good, field: val}).encode(), field
        elif what == "n_too_large":
            body, param = json.dumps({**good, "n": self.max_n + 1}).encode(), "n"
        elif what == "unknown_model":
            body, want = json.dumps({**good, "model": "no-such-model"}).encode(), 404
        elif what == "wrong_key":
            body, key, want = json.dumps(good).encode(), "sk-wrong", 401
        elif what == "too_large_body":
            pad = "x" * (self.max_body + 1024)
            body, want = json.dumps({**good, "messages": [{"role": "user", "content": pad}]}).encode(), 413
        elif what == "unknown_path":
            path, body, want = rng.choice(["/v1/nope", "/v2/chat/completions", "/admin"]), json.dumps(good).encode(), 404
        elif what == "empty_messages":
            body, param = json.dumps({**good, "messages": []}).encode(), "messages"
        elif what == "max_tokens_too_large":
            body, param = json.dumps({**good, "max_tokens": 10**7}).encode(), "max_tokens"
        elif what == "bad_temperature":
            body, param = json.dumps({**good, "temperature": -1}).encode(), "temperature"
        elif what == "unsatisfiable_schema":  # matches nothing: was a 500
            rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
            body, param = json.dumps({**good, "response_format": rf}).encode(), "response_format"
        else:
            raise AssertionError(what)
        if rng.random() < 0.3 and what not in ("unknown_path", "wrong_key"):
            body = body.replace(b'"max_tokens"', b'"stream": true, "max_tokens"', 1) if b'"stream"' not in body else body
        try:
            st, b = self.raw("POST", path, body=body, key=key)
        except Exception as e:
            return self.record(kind, "UNEXPECTED", t0, repr(e))
        try:
            err = json.loads(b)["error"]
            shaped = isinstance(err.get("message"), str) and "type" in err
        except Exception:
            err, shaped = None, False
        if st != want or not shaped:
            return self.record(kind, "UNEXPECTED", t0, f"want {want}, got {st}: {b[:300]!r}")
        if param and err.get("param") != param:
            return self.record(kind, "UNEXPECTED", t0, f"param {err.get('param')!r}, want {param!r}: {b[:300]!r}")
        self.record(kind, "expected_4xx", t0)

    # --- the run -----------------------------------------------------------------------
    def worker(self, k, mix, deadline):
        rng = random.Random(self.a.seed * 1000 + k)
        kinds, weights = zip(*mix)
        while time.time() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "bad":
                choices = [b for b in BAD_KINDS if b != "wrong_key" or self.key]
                kind = "bad:" + rng.choice(choices)
            elif kind == "info":
                kind = "info:" + rng.choice(["/v1/models", "/metrics", "/health", "/props", f"/v1/models/{self.model}"])
            self.run_one(kind, rng)


def read_metrics(base, key, timeout=10):
    u = urllib.parse.urlparse(base)
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        c.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
        r = c.getresponse()
        text = r.read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            try:
                out[name] = float(v)
            except ValueError:
                pass
    return out


def proc_sample(pid):
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0]) / 1024  # MiB
            elif k == "Threads":
                d[k] = int(v)
    d["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return d


def slope_mib_per_min(ts, ys):
    if len(ts) < 3:
        return float("nan")
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lwm", help="the lwm binary: start `lwm serve` with it")
    ap.add_argument("--url", help="attach to a running server instead")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for /proc sampling")
    ap.add_argument("--model", default="default", help="with --lwm: the model to serve")
    ap.add_argument("--api-key", default=None, help="the server's key (with --lwm: default sk-soak, set through LWM_API_KEY)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `lwm serve` flag (repeat)")
    ap.add_argument("--max-active", type=int, default=None, help="with --lwm: --max-active (default: --clients)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"kind:weight,... (default {DEFAULT_MIX})")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--long-tokens", type=int, default=0, help="tokens of the long prompt (default: context - 256)")
    ap.add_argument("--ctx-size", type=int, default=None, help="with --lwm: the server's context (--ctx-size)")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds: more is UNEXPECTED")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default min(60, D/5))")
    ap.add_argument("--max-slope", type=float, default=1.0, help="MiB/min over the last half")
    ap.add_argument("--max-growth", type=float, default=0.10, help="last window median over first after warm-up")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--json", help="write counts and series here")
    ap.add_argument("--png", help="write the RSS chart here")
    ap.add_argument("--log", default=None, help="with --lwm: the server's stderr goes here (default: a temp file)")
    a = ap.parse_args()
    if bool(a.lwm) == bool(a.url):
        ap.error("give exactly one of --lwm and --url")
    mix = []
    for part in a.mix.split(","):
        k, _, w = part.partition(":")
        mix.append((k.strip(), float(w)))

    server, log_path, pid = None, None, a.pid
    key = a.api_key
    if a.lwm:
        key = key or "sk-soak"
        log_path = a.log or f"/tmp/lwm-soak-{os.getpid()}.log"
        cmd = [a.lwm, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", "0",
               "--max-active", str(a.max_active or a.clients)] + a.server_arg
        if a.ctx_size:
            cmd += ["--ctx-size", str(a.ctx_size)]
        print("server:", " ".join(cmd), f"(LWM_API_KEY set; log {log_path})", flush=True)
        logf = open(log_path, "w")
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env={**os.environ, "LWM_API_KEY": key}, text=True)
        base = None
        t_wait = time.time()
        for line in server.stderr:
            logf.write(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                base = m.group(1)
                break
            if time.time() - t_wait > 300:
                break
        if not base:
            server.kill()
            sys.exit("the server did not start; see " + log_path)

        def pump():
            for line in server.stderr:
                logf.write(line)
                logf.flush()
        threading.Thread(target=pump, daemon=True).start()
        pid = server.pid
    else:
        base = a.url.rstrip("/")

    failures = []
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key or "unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        st0 = http.client.HTTPConnection(urllib.parse.urlparse(base).hostname, urllib.parse.urlparse(base).port, timeout=30)
        st0.request("GET", "/props", headers={"Authorization": f"Bearer {key}"} if key else {})
        props = json.loads(st0.getresponse().read())
        st0.close()
        lim = props["limits"]
        soak = Soak(a, base, key, model, props["n_ctx"], lim["max_prompt_tokens"], lim["max_body_bytes"], lim["max_n"])
        n_long, n_over = soak.prepare_prompts()
        print(f"model {model}, context {props['n_ctx']}, max prompt {lim['max_prompt_tokens']}, slots {props['total_slots']}; "
              f"long prompt {n_long} tokens, over-context prompt {n_over} tokens", flush=True)

        series = []
        stop_sampling = threading.Event()
        t_start = time.time()
        soak.t_start = t_start

        def sampler():
            while not stop_sampling.is_set():
                t = time.time() - t_start
                s = {"t": round(t, 2)}
                try:
                    if pid:
                        s.update(proc_sample(pid))
                    m = read_metrics(base, key)
                    s["metrics_rss_mib"] = m.get("lwm_resident_memory_bytes", float("nan")) / 2**20
                    if "lwm_kv_cache_reserved_bytes" in m:
                        s["kv_mib"] = m["lwm_kv_cache_bytes"] / 2**20
                        s["kv_reserved_mib"] = m["lwm_kv_cache_reserved_bytes"] / 2**20
                    s["active"] = m.get("lwm_active_requests")
                    s["queue"] = m.get("lwm_queue_depth")
                except Exception as e:
                    s["error"] = repr(e)
                series.append(s)
                stop_sampling.wait(max(0.0, 1.0 - (time.time() - t_start - t)))

        threading.Thread(target=sampler, daemon=True).start()
        deadline = t_start + a.seconds
        threads = [threading.Thread(target=soak.worker, args=(k, mix, deadline), daemon=True) for k in range(a.clients)]
        for t in threads:
            t.start()
        last = 0
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            now = time.time() - t_start
            if now - last >= 30:
                last = now
                with soak.lock:
                    tot = collections.Counter()
                    for c in soak.counts.values():
                        tot.update(c)
                s = series[-1] if series else {}
                print(f"t {now:5.0f} s  {dict(tot)}  RSS {s.get('VmRSS', s.get('metrics_rss_mib', float('nan'))):.1f} MiB  "
                      f"KV {s.get('kv_mib', float('nan')):.0f}/{s.get('kv_reserved_mib', float('nan')):.0f} MiB  "
                      f"fds {s.get('fds')} threads {s.get('Threads')} active {s.get('active')} queue {s.get('queue')}",
                      flush=True)
        t_end_clients = time.time() - t_start
        for t in threads:
            t.join()
        soak.client.close()

        # Nothing may stay in flight: the engine drops what the disconnects left.
        drained = False
        for _ in range(120):
            m = read_metrics(base, key)
            if m.get("lwm_active_requests", 0) == 0 and m.get("lwm_queue_depth", 0) == 0:
                drained = True
                break
            time.sleep(1)
        if not drained:
            failures.append(f"requests still in flight after the run: active {m.get('lwm_active_requests')}, queue {m.get('lwm_queue_depth')}")
        time.sleep(3)
        stop_sampling.set()
        time.sleep(1.2)
        # The server still answers a normal request.
        try:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                               max_tokens=8, temperature=0)
            after_ok = bool(r.choices[0].message.content)
        except Exception as e:
            after_ok = False
            failures.append(f"the server does not answer after the run: {e!r}")
        # The engine publishes its gauges after each step: give it a moment to settle.
        for _ in range(20):
            final_metrics = read_metrics(base, key)
            if final_metrics.get("lwm_active_requests", 0) == 0 and final_metrics.get("lwm_queue_depth", 0) == 0:
                break
            time.sleep(0.5)
        else:
            failures.append("a request stayed in flight after the final check")
        client.close()
    finally:
        if server:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            time.sleep(0.5)
            logf.close()

    # --- summary -------------------------------------------------------------------------
    wall = t_end_clients
    total = collections.Counter()
    for c in soak.counts.values():
        total.update(c)
    n_requests = sum(total.values())
    print(f"\n{a.clients} clients, {a.seconds:.0f} s of load ({wall:.0f} s until the last client finished): "
          f"{n_requests} requests, {n_requests / wall:.2f} req/s")
    print(f"{'kind':32} {'ok':>6} {'4xx':>6} {'cancel':>6} {'UNEXP':>6} {'p50 s':>7} {'p99 s':>7}")
    for kind in sorted(soak.counts):
        c = soak.counts[kind]
        lat = sorted(soak.latency.get(kind, []))
        p50 = f"{lat[len(lat) // 2]:.2f}" if lat else "-"
        p99 = f"{lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.2f}" if lat else "-"
        print(f"{kind:32} {c['ok']:6d} {c['expected_4xx']:6d} {c['cancelled']:6d} {c['UNEXPECTED']:6d} {p50:>7} {p99:>7}")
    print(f"{'total':32} {total['ok']:6d} {total['expected_4xx']:6d} {total['cancelled']:6d} {total['UNEXPECTED']:6d}")
    if total["UNEXPECTED"]:
        failures.append(f"{total['UNEXPECTED']} unexpected outcomes")
        for e in soak.examples:
            print("  example:", e)

    # RSS: the load phase only.
    key_rss = "VmRSS" if pid else "metrics_rss_mib"
    load = [s for s in series if key_rss in s and s["t"] <= a.seconds]
    warm = a.warmup if a.warmup is not None else min(60.0, a.seconds / 5)
    win = min(60.0, a.seconds / 5)
    rss = {}
    if load:
        ys = [s[key_rss] for s in load]
        half = [s for s in load if s["t"] >= a.seconds / 2]
        slope = slope_mib_per_min([s["t"] for s in half], [s[key_rss] for s in half])
        first = [s[key_rss] for s in load if warm <= s["t"] < warm + win]
        lastw = [s[key_rss] for s in load if s["t"] >= a.seconds - win]
        m_first = statistics.median(first) if first else float("nan")
        m_last = statistics.median(lastw) if lastw else float("nan")
        growth = m_last / m_first - 1 if first and lastw else float("nan")
        rss = {"source": key_rss, "start_mib": ys[0], "after_warmup_median_mib": m_first, "last_window_median_mib": m_last,
               "end_mib": ys[-1], "peak_mib": max(ys), "slope_last_half_mib_per_min": slope,
               "growth_last_vs_first_window": growth, "warmup_s": warm, "window_s": win,
               "max_slope_mib_per_min": a.max_slope, "max_growth": a.max_growth}
        print(f"RSS ({key_rss}) start {ys[0]:.1f} MiB, median {m_first:.1f} MiB in [{warm:.0f}, {warm + win:.0f}) s, "
              f"median {m_last:.1f} MiB in the last {win:.0f} s, end {ys[-1]:.1f}, peak {max(ys):.1f} MiB")
        print(f"RSS slope over the last half: {slope:+.3f} MiB/min (limit {a.max_slope}); "
              f"last window vs first after warm-up: {100 * growth:+.1f}% (limit {100 * a.max_growth:.0f}%)")
        if not slope <= a.max_slope:
            failures.append(f"RSS slope {slope:.3f} MiB/min over the last half > {a.max_slope}")
        if not growth <= a.max_growth:
            failures.append(f"RSS grew {100 * growth:.1f}% > {100 * a.max_growth:.0f}%")
    else:
        failures.append("no RSS samples")
    kv_pts = [s for s in load if "kv_reserved_mib" in s]
    if kv_pts:
        kv_half = [s for s in kv_pts if s["t"] >= a.seconds / 2]
        rss["kv_reserved_peak_mib"] = max(s["kv_reserved_mib"] for s in kv_pts)
        rss["kv_reserved_end_mib"] = kv_pts[-1]["kv_reserved_mib"]
        rss["kv_reserved_slope_last_half_mib_per_min"] = slope_mib_per_min(
            [s["t"] for s in kv_half], [s["kv_reserved_mib"] for s in kv_half])
        print(f"KV caches reserved: peak {rss['kv_reserved_peak_mib']:.0f} MiB, end of load {rss['kv_reserved_end_mib']:.0f} MiB, "
              f"slope over the last half {rss['kv_reserved_slope_last_half_mib_per_min']:+.2f} MiB/min")
        if key_rss in kv_pts[0]:
            # Diagnostic, not a pass/fail: RSS less the KV caches in use, whose size follows
            # the requests in flight (long prompts come and go), so a leak elsewhere shows.
            rss["rss_minus_kv_slope_last_half_mib_per_min"] = slope_mib_per_min(
                [s["t"] for s in kv_half], [s[key_rss] - s["kv_reserved_mib"] for s in kv_half])
            print(f"RSS less the KV caches: slope over the last half {rss['rss_minus_kv_slope_last_half_mib_per_min']:+.2f} MiB/min "
                  "(diagnostic)")
    fd_pts = [s for s in series if "fds" in s]
    if fd_pts:
        print(f"fds start {fd_pts[0]['fds']} end {fd_pts[-1]['fds']} max {max(s['fds'] for s in fd_pts)}; "
              f"threads start {fd_pts[0]['Threads']} end {fd_pts[-1]['Threads']} max {max(s['Threads'] for s in fd_pts)}")
    sample_errors = [s for s in series if "error" in s]
    if sample_errors:
        failures.append(f"{len(sample_errors)} samples failed, first: {sample_errors[0]['error']}")
    if log_path:
        with open(log_path) as f:
            log = f.read()
        if "panicked" in log:
            failures.append("the server log has a panic")
    m = final_metrics
    tokens = m.get("lwm_completion_tokens_total", 0)
    print(f"server counters: {tokens:.0f} completion tokens ({tokens / wall:.1f}/s), "
          f"{m.get('lwm_prompt_tokens_total', 0):.0f} prompt tokens of which {m.get('lwm_cached_prompt_tokens_total', 0):.0f} from the prompt cache, "
          f"mean batch {m.get('lwm_batched_sequences_total', 0) / max(1, m.get('lwm_forward_steps_total', 0)):.1f}")
    print(f"server after the run: active {m.get('lwm_active_requests')}, queue {m.get('lwm_queue_depth')}, "
          f"cancelled {m.get('lwm_cancelled_requests_total')}, answers a chat: {after_ok}")
    fivexx = {k: v for k, v in m.items() if k.startswith("lwm_requests_total") and re.search(r'status="5', k)}
    if fivexx:
        failures.append(f"/metrics counts 5xx: {fivexx}")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"clients": a.clients, "seconds": a.seconds, "mix": a.mix, "max_tokens": a.max_tokens,
                       "long_prompt_tokens": n_long, "over_context_tokens": n_over, "context": soak.ctx,
                       "wall_s": wall, "requests": n_requests, "requests_per_s": n_requests / wall,
                       "counts": {k: dict(v) for k, v in sorted(soak.counts.items())}, "total": dict(total),
                       "unexpected_examples": soak.examples, "rss": rss, "failures": failures,
                       "server_metrics_after": {k: v for k, v in m.items() if k.startswith(("lwm_requests_total", "lwm_cancelled", "lwm_active", "lwm_queue", "lwm_completion", "lwm_prompt", "lwm_cached", "lwm_forward", "lwm_batched"))},
                       "series": series}, f, indent=1)
    if a.png and load:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=90)
        ts = [s["t"] for s in series if key_rss in s]
        ax.plot(ts, [s[key_rss] for s in series if key_rss in s], lw=1, label=f"RSS ({key_rss})")
        kv = [s for s in series if "kv_reserved_mib" in s]
        if kv:
            ax.plot([s["t"] for s in kv], [s["kv_reserved_mib"] for s in kv], lw=0.8, color="tab:orange",
                    label="KV caches reserved (/metrics)")
        ax.axvline(warm, color="grey", ls=":", lw=1)
        ax.axvline(a.seconds, color="grey", ls="--", lw=1, label="end of load")
        if half:
            t0h = half[0]["t"]
            y0 = statistics.fmean(s[key_rss] for s in half) - slope / 60 * (statistics.fmean(s["t"] for s in half) - t0h)
            ax.plot([t0h, half[-1]["t"]], [y0, y0 + slope / 60 * (half[-1]["t"] - t0h)], "r-", lw=1,
                    label=f"fit, last half: {slope:+.2f} MiB/min")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        if fd_pts:
            ax2 = ax.twinx()
            ax2.plot([s["t"] for s in fd_pts], [s["fds"] for s in fd_pts], color="tab:green", lw=0.7, alpha=0.6, label="open fds")
            ax2.set_ylabel("open fds")
            ax2.set_ylim(bottom=0)
            ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="lower left", fontsize=8)
        ax.set_title(f"lwm serve soak: {a.clients} clients, {a.seconds:.0f} s")
        fig.tight_layout()
        fig.savefig(a.png)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("soak passed: no unexpected outcome, nothing in flight, RSS flat")


if __name__ == "__main__":
    main()
