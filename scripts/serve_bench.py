#!/usr/bin/env python3
"""Serving benchmark: `lwm serve` against llama.cpp's `llama-server` on the same GGUF, same run.

For each model and each client count C, each server is started alone (2 threads, C parallel
slots: `--max-active C` / `-np C` with continuous batching), warmed up with one request, then
C client threads each send --requests completion requests back to back (distinct prompts,
--max-tokens new tokens each with `ignore_eos`, so both servers generate exactly the same number of
tokens; greedy). Reported per server: aggregate completion tok/s (all generated tokens / wall
time of the phase), request latency p50 / p99, errors, peak RSS of the server process (VmHWM),
and the CPU pressure (/proc/pressure/cpu "some" avg10) before and after. Servers run one after
the other, lwm first then llama.cpp, per (model, C); --rounds repeats the pair to show spread.

    bash scripts/build-llama-cpp.sh
    python3 scripts/serve_bench.py --lwm target/release/lwm \\
        --llama-server ~/.cache/lwm-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server \\
        --models ~/.cache/lwm/models/SmolLM2-135M-Instruct.Q4_1.gguf --clients 8,32 \\
        --requests 4 --max-tokens 64 --json docs/bench/serve.json

Not a test: it prints a Markdown table (and writes JSON with --json).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

WORDS = ("river garden lantern copper harbor meadow violin glacier orchard compass "
         "thunder pepper marble canyon falcon velvet").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pressure() -> float:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except OSError:
        return float("nan")


def vm(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def post(url: str, body: dict, timeout: float = 900) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def prompt(k: int, i: int) -> str:
    words = [WORDS[(k * 7 + i * 3 + j) % len(WORDS)] for j in range(24)]
    return f"Story {k}-{i}: " + " ".join(words) + ". Continue the story:"


def start(cmd: list[str], port: int, log) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"server exited with {p.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    p.kill()
    raise SystemExit(f"server did not become healthy: {' '.join(cmd)}")


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    lat, errors, tokens = [], [], [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int):
        barrier.wait()
        for i in range(requests):
            body = {"prompt": prompt(k, i), "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            t0 = time.time()
            try:
                r = post(url, body)
                n = r["usage"]["completion_tokens"]
                with lock:
                    lat.append(time.time() - t0)
                    tokens[0] += n
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    errors.append(repr(e)[:200])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"tok_s": tokens[0] / wall, "tokens": tokens[0], "wall_s": wall, "p50_s": q(0.5),
            "p99_s": q(0.99), "errors": len(errors), "error_samples": errors[:3]}


def run_one(name: str, cmd: list[str], port: int, clients: int, a) -> dict:
    with open(f"/tmp/serve_bench_{name}.log", "w") as log:
        before = pressure()
        p = start(cmd, port, log)
        try:
            post(f"http://127.0.0.1:{port}/v1/completions",
                 {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
            r = load(port, clients, a.requests, a.max_tokens)
            r["peak_rss_mb"] = vm(p.pid, "VmHWM")
        finally:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        r["pressure_before"], r["pressure_after"] = before, pressure()
        return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lwm", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--models", required=True, help="comma-separated GGUF files")
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx-per-slot", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lwm-args", default="", help="extra lwm serve flags")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for model in a.models.split(","):
        for clients in [int(c) for c in a.clients.split(",")]:
            for rnd in range(a.rounds):
                port = free_port()
                lwm_cmd = [a.lwm, "serve", "-m", model, "--port", str(port), "-t", str(a.threads),
                           "--max-active", str(clients), "--max-tokens-limit", str(a.max_tokens)]
                lwm_cmd += a.lwm_args.split()
                ours = run_one("lwm", lwm_cmd, port, clients, a)
                port = free_port()
                llama_cmd = [a.llama_server, "-m", model, "--port", str(port), "-t", str(a.threads),
                             "-np", str(clients), "-c", str(clients * a.ctx_per_slot), "-cb"]
                peer = run_one("llama", llama_cmd, port, clients, a)
                row = {"model": os.path.basename(model), "clients": clients, "round": rnd,
                       "lwm": ours, "llama": peer,
                       "ratio_tok_s": ours["tok_s"] / peer["tok_s"] if peer["tok_s"] else None}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| model | clients | lwm tok/s | llama-server tok/s | ratio | p50 s lwm / llama | "
          "p99 s lwm / llama | errors | peak RSS MB lwm / llama | CPU pressure |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, p = r["lwm"], r["llama"]
        print(f"| {r['model']} | {r['clients']} | {o['tok_s']:.1f} | {p['tok_s']:.1f} | "
              f"{r['ratio_tok_s']:.2f}x | {o['p50_s']:.2f} / {p['p50_s']:.2f} | "
              f"{o['p99_s']:.2f} / {p['p99_s']:.2f} | {o['errors']} / {p['errors']} | "
              f"{o['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} | "
              f"{max(o['pressure_before'], p['pressure_before']):.0f}% |")
    if a.json:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "args": vars(a)}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags")).split()
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
        return f"{name} ({', '.join(isa)})"
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
