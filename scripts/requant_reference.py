#!/usr/bin/env python3
"""llama.cpp's answers for the default model requantized to each format (issue 18's "correct
means"): `llama-quantize --allow-requantize` makes the files, `llama-server` gives, per file,
the top-10 tokens after the reference prompt with their log-probabilities (log-softmax of the
raw logits: differences between them are logit differences) and the 32-token greedy answer to
the reference chat prompt. Written as a fixture that crates/lwm/tests/requantized.rs compares
with, when the files are present (LWM_REQUANT_DIR).

    python3 scripts/requant_reference.py --default-model ~/.cache/.../SmolLM2-135M-Instruct.Q4_1.gguf \\
        --bin PEER/vendor/llama.cpp/build/bin --out-dir /work/requant \\
        > crates/lwm/tests/fixtures/requant-reference.json

The prompts and their token ids are those of tests/fixtures/smollm2-reference.json (ids are
sent as ids, so tokenization plays no part).
"""
import argparse
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# llama-server configurations whose answers show how far llama.cpp's own execution paths
# part on this model (weight repacking off, one-token batches, no flash attention): the
# test's tolerance per format comes from this spread.
VARIANTS = ["", "-nr", "-nr -ub 1", "-fa off"]

FORMATS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "F16", "BF16"]


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def serve(bin_dir, model, port, extra):
    p = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(model), "-t", "2", "-c", "2048",
                          "--port", str(port), "-np", "1", "--no-webui", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            pass
        time.sleep(0.2)
    p.kill()
    raise SystemExit(f"llama-server did not start on {model}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default-model", required=True, type=Path)
    ap.add_argument("--bin", required=True, type=Path, help="llama.cpp build/bin")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--reference", type=Path, default=Path(__file__).resolve().parent.parent
                    / "crates/lwm/tests/fixtures/smollm2-reference.json")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--port", type=int, default=18093)
    ap.add_argument("--server-args", default="", help="extra llama-server arguments, e.g. '-ub 1 -nr' "
                    "(one-token batches, no weight repacking: every product through ggml's vec_dot)")
    a = ap.parse_args()
    ref = json.loads(a.reference.read_text())
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = {"source": f"{a.default_model.name} ({a.default_model.stat().st_size} bytes), "
                     "requantized by llama-quantize --allow-requantize",
           "llama_cpp_commit": ref.get("llama_cpp_commit"),
           "prompt_token_ids": ref["prompt_token_ids"],
           "chat_prompt_token_ids": ref["chat_prompt_token_ids"],
           "note": "top10: [id, logprob] after the prompt (log-softmax of llama.cpp's raw logits, "
                   "2 threads, f16 KV, CPU backend with its repacking); top10_variants: the same with "
                   "other llama-server flags; greedy: 32 argmax ids (ignore_eos)",
           "formats": {}}
    for fmt in a.formats.split(","):
        path = a.out_dir / f"smollm2-135m-{fmt}.gguf"
        if not path.exists():
            subprocess.run([str(a.bin / "llama-quantize"), "--allow-requantize", str(a.default_model),
                            str(path), fmt, "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{fmt}: {path.stat().st_size} bytes", file=sys.stderr, flush=True)
        variants = {}
        for v in VARIANTS:
            srv = serve(a.bin, path, a.port, a.server_args.split() + v.split())
            try:
                r = post(a.port, {"prompt": ref["prompt_token_ids"], "n_predict": 1, "n_probs": 10,
                                  "temperature": 0, "cache_prompt": False})
                top = r["completion_probabilities"][0]["top_logprobs"]
                variants[v] = [[t["id"], round(t["logprob"], 5)] for t in top]
                if v == "":
                    g = post(a.port, {"prompt": ref["chat_prompt_token_ids"], "n_predict": ref["greedy_n_tokens"],
                                      "temperature": 0, "cache_prompt": False, "return_tokens": True,
                                      "ignore_eos": True})
            finally:
                srv.terminate()
                srv.wait()
        out["formats"][fmt] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path),
                               "top10": variants[""],
                               "top10_variants": {k: v for k, v in variants.items() if k},
                               "greedy_token_ids": g["tokens"], "greedy_text": g["content"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
