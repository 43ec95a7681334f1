#!/usr/bin/env python3
"""Long-context benchmark suite: lwm vs llama.cpp (llama-cpp-python) measured in the same
run on the same GGUF with the same threads, written as Markdown and JSON.

Cases (each one `lwm-bench compare --json` call, so both engines run back to back):
  prefill at 512 / 8192 / 32768 prompt tokens, and decode of 128 tokens at depth 0 (a
  1-token prompt) / 8192 / 32768 (the decode figures of the long-prefill runs), plus peak
  RSS of each engine and ratios lwm / llama.cpp. /proc/pressure/cpu is recorded before and
  after every case, and each figure carries min-max over the repetitions. Then the kernel
  figures (`lwm-bench kernels`: FMA peak vs the attention kernel).

    python3 scripts/bench_suite.py --lwm target/release/lwm --threads 2 --reps 3 \\
        --sizes 512,8192,32768 --kv-type f16 --out bench-results

Note: llama.cpp runs with its default f16 KV cache; pass --kv-type f16 for equal KV types.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path


def pressure():
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def run_case(args, prompt, gen):
    cmd = [args.lwm_bench, "compare", "--json", "--lwm", args.lwm, "-t", str(args.threads),
           "--reps", str(args.reps), "--warmup", str(args.warmup), "-p", str(prompt), "-n", str(gen)]
    if args.model:
        cmd += ["--model", args.model]
    cmd += ["--", "--kv-type", args.kv_type, "--max-sequence-length", str(max(prompt + gen + 16, 8192))]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    before = pressure()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-2000:], "prompt_tokens": prompt}
    v = json.loads(out.stdout)
    v["pressure_before"], v["pressure_after"] = before, pressure()
    return v


def fmt(s):
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lwm", default="target/release/lwm")
    ap.add_argument("--lwm-bench", default="target/release/lwm-bench")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="lwm's untimed runs before the timed ones (0 for very long prompts; llama.cpp's warm-up is 32 tokens)")
    ap.add_argument("--sizes", default="512,8192,32768")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()

    cases = [run_case(args, 1, args.gen)]  # decode at depth 0
    for n in [int(x) for x in args.sizes.split(",") if x]:
        cases.append(run_case(args, n, args.gen))
    kernels = subprocess.run([args.lwm_bench, "kernels", "--json", "-t", str(args.threads),
                              "--reps", str(args.reps)], capture_output=True, text=True)
    kernel_json = None
    if kernels.returncode == 0:
        text = kernels.stdout
        kernel_json = json.loads(text[text.index("{"):])

    lines = [f"Threads {args.threads}, {args.reps} reps (median, min-max), lwm KV {args.kv_type}, "
             "llama.cpp KV f16 (its default).", "",
             "| case | lwm tok/s | llama.cpp tok/s | lwm / llama.cpp | lwm RSS MB | llama.cpp RSS MB | cpu pressure before / after |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        if "error" in c:
            lines.append(f"| prompt {c['prompt_tokens']} | error: {c['error'][:120]} | | | | | |")
            continue
        ours, peer, r = c["lwm"], c["llama_cpp"], c["ratio"]
        n = ours["prompt_tokens"]
        press = f"{c['pressure_before']} / {c['pressure_after']}"
        if n > 1:
            lines.append(f"| prefill {n} | {fmt(ours['prefill_tok_s'])} | {fmt(peer['prefill_tok_s'])} | "
                         f"{r['prefill']:.2f}x | {ours['peak_rss_mb']:.0f} | {peer['peak_rss_mb']:.0f} | {press} |")
        depth = 0 if n == 1 else n
        lines.append(f"| decode {ours['gen_tokens']} at depth {depth} | {fmt(ours['decode_tok_s'])} | "
                     f"{fmt(peer['decode_tok_s'])} | {r['decode']:.2f}x | {ours['peak_rss_mb']:.0f} | "
                     f"{peer['peak_rss_mb']:.0f} | {press} |")
    if kernel_json:
        lines += ["", "| kernel | GFLOP/s | % of FMA peak |", "|---|---|---|",
                  f"| FMA peak ({kernel_json['threads']} threads) | {kernel_json['fma_peak_gflops']:.1f} | 100% |"]
        for a in kernel_json["attention"]:
            lines.append(f"| attention {a['kv_type']} KV, {a['q_rows']} rows at depth {a['depth']} | "
                         f"{a['gflops']:.1f} | {a['pct_of_peak']:.0f}% |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps({"cases": cases, "kernels": kernel_json}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
