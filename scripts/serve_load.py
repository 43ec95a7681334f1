#!/usr/bin/env python3
"""Load benchmark for `lwm serve` (not a test): N concurrent clients for D seconds.

    lwm serve --model default --port 8080 &
    python3 scripts/serve_load.py --url http://127.0.0.1:8080 --clients 16 --seconds 60

Each client loops over chat requests (plain, streamed, and json_schema-constrained in turn)
with the official `openai` client. Prints errors, throughput, p50/p99 latency and the
server's resident memory (from /metrics) every 5 s, so a leak shows as a rising column.
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request

import openai

TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "autumn", "bees", "a market"]
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "mood": {"enum": ["calm", "busy", "sad"]}},
    "required": ["title", "mood"],
    "additionalProperties": False,
}


def rss_mib(url):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("lwm_resident_memory_bytes "):
                return float(line.split()[1]) / 2**20
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="model id (default: the server's only model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = a.model or client.models.list().data[0].id
    lock = threading.Lock()
    latencies, errors, tokens = [], [], [0]
    deadline = time.time() + a.seconds

    def worker(k):
        i = 0
        while time.time() < deadline:
            topic = TOPICS[(k + i) % len(TOPICS)]
            kind = (k + i) % 3
            msgs = [{"role": "user", "content": f"Write two sentences about {topic}."}]
            t0 = time.time()
            try:
                if kind == 0:
                    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=a.max_tokens, temperature=0.7, seed=i)
                    n = r.usage.completion_tokens
                elif kind == 1:
                    n = 0
                    for c in client.chat.completions.create(model=model, messages=msgs, max_tokens=a.max_tokens, temperature=0.7, seed=i, stream=True):
                        n += sum(1 for ch in c.choices if ch.delta.content)
                else:
                    r = client.chat.completions.create(
                        model=model, messages=msgs, max_tokens=a.max_tokens * 2, temperature=0.7, seed=i,
                        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
                    if r.choices[0].finish_reason == "stop":
                        json.loads(r.choices[0].message.content)
                    n = r.usage.completion_tokens
                with lock:
                    latencies.append(time.time() - t0)
                    tokens[0] += n
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(repr(e))
            i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(a.clients)]
    t_start = time.time()
    for t in threads:
        t.start()
    print(f"{'t (s)':>6} {'requests':>9} {'errors':>7} {'RSS MiB':>8}")
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        with lock:
            n, e = len(latencies), len(errors)
        print(f"{time.time() - t_start:6.0f} {n:9d} {e:7d} {rss_mib(a.url):8.1f}", flush=True)
    for t in threads:
        t.join()
    wall = time.time() - t_start
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    print(f"clients {a.clients}, {wall:.0f} s: {len(lat)} requests, {len(errors)} errors")
    print(f"throughput {len(lat) / wall:.2f} req/s, {tokens[0] / wall:.1f} completion tokens/s")
    print(f"latency p50 {q(0.50):.2f} s, p99 {q(0.99):.2f} s, mean {statistics.mean(lat) if lat else float('nan'):.2f} s")
    for e in errors[:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
