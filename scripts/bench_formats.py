#!/usr/bin/env python3
"""lwm vs llama-bench on the same GGUF files, interleaved, 2 threads: prefill, decode at depth 0
(and optionally prefill/decode at a long depth) and the peak RSS of each process, per file.

Each case runs lwm then llama-bench back to back, so both see the same machine state;
/proc/pressure/cpu is recorded around every run, and every figure carries min-max over the
repetitions. Peak RSS comes from wait4's rusage of each child, the same for both engines.

    python3 scripts/bench_formats.py --lwm target/release/lwm \\
        --llama-bench PEER/vendor/llama.cpp/build/bin/llama-bench \\
        --models /work/bench-models/lwm-7b-4L-{Q4_K_M,Q5_K_M,Q6_K,Q8_0,F16,BF16}.gguf \\
        --prompt 512 --gen 32 --depth 4096 --depth-models Q4_K_M --out docs/bench/formats.md

Cases per model: `pp{prompt}` + `tg{gen}` at depth 0 (lwm: `bench -p {prompt} -n {gen}` and
`-p 1 -n {gen}`, llama-bench: `-p {prompt} -n 0`, `-p 0 -n {gen}`); with --depth for the
models named by --depth-models: `pp{depth}` and `tg{gen}@d{depth}` (lwm: `-p {depth} -n {gen}`,
whose decode follows a {depth}-token prompt; llama-bench: `-p {depth} -n 0` and
`-p 0 -n {gen} -d {depth}`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def pressure():
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])  # some avg10
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_rss(cmd):
    """Runs cmd (stderr dropped); returns (stdout, peak RSS in MB from wait4, seconds,
    CPU pressure before, after)."""
    print("  $", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    p0 = pressure()
    t0 = time.time()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.execv(str(cmd[0]), list(map(str, cmd)))
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(map(str, cmd))}")
    return b"".join(chunks).decode(), ru.ru_maxrss / 1024, time.time() - t0, p0, pressure()


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def lwm_case(a, model, prompt, gen):
    out, rss, secs, p0, p1 = run_rss([a.lwm, "bench", "--json", "-m", model, "-t", a.threads,
                                      "-p", prompt, "-n", gen, "--reps", a.reps, "--warmup", a.warmup,
                                      "-c", max(prompt + gen + 16, 4096)])
    v = json.loads(out)["lwm"]
    return {"prefill": v["prefill_tok_s"], "decode": v["decode_tok_s"], "rss_mb": rss,
            "load_s": v["load_s"], "secs": secs, "pressure": [p0, p1]}


def peer_case(a, model, prompt, gen, depth=0):
    cmd = [a.llama_bench, "-m", model, "-t", a.threads, "-p", prompt, "-n", gen, "-r", a.reps, "-o", "json"]
    if depth:
        cmd += ["-d", depth]
    out, rss, secs, p0, p1 = run_rss(cmd)
    tests = json.loads(out)
    return {"ts": spread([float(x) for x in tests[0]["samples_ts"]]), "rss_mb": rss, "secs": secs,
            "pressure": [p0, p1]}


def fmt(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lwm", default="target/release/lwm")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--depth", type=int, default=0, help="also a long-context case at this depth")
    ap.add_argument("--depth-models", default="", help="comma-separated name parts of the models that get it")
    ap.add_argument("--out", required=True, help="Markdown file (a .json beside it)")
    a = ap.parse_args()

    results = []
    for model in a.models:
        name = Path(model).stem
        print(f"{name}:", file=sys.stderr, flush=True)
        size_mb = Path(model).stat().st_size / 1e6
        ours = lwm_case(a, model, a.prompt, a.gen)
        ours0 = lwm_case(a, model, 1, a.gen)
        pp = peer_case(a, model, a.prompt, 0)
        tg = peer_case(a, model, 0, a.gen)
        r = {"model": name, "file_mb": size_mb, "lwm_pp": ours, "lwm_tg": ours0, "peer_pp": pp, "peer_tg": tg}
        if a.depth and any(p and p in name for p in a.depth_models.split(",")):
            r["lwm_deep"] = lwm_case(a, model, a.depth, a.gen)
            r["peer_deep_pp"] = peer_case(a, model, a.depth, 0)
            r["peer_deep_tg"] = peer_case(a, model, 0, a.gen, a.depth)
        results.append(r)
        Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1))

    lines = [f"| file (MB) | pp{a.prompt} lwm | llama.cpp | ratio | tg{a.gen} lwm | llama.cpp | ratio "
             f"| peak RSS lwm / llama.cpp (MB) | CPU pressure during (avg10 %) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lp, lt = r["lwm_pp"]["prefill"], r["lwm_tg"]["decode"]
        pp, pt = r["peer_pp"]["ts"], r["peer_tg"]["ts"]
        rss_l = max(r["lwm_pp"]["rss_mb"], r["lwm_tg"]["rss_mb"])
        rss_p = max(r["peer_pp"]["rss_mb"], r["peer_tg"]["rss_mb"])
        ps = [p for k in ("lwm_pp", "lwm_tg", "peer_pp", "peer_tg") for p in r[k]["pressure"]]
        lines.append(f"| {r['model']} ({r['file_mb']:.0f}) | {fmt(lp)} | {fmt(pp)} | {lp['median'] / pp['median']:.2f}x "
                     f"| {fmt(lt)} | {fmt(pt)} | {lt['median'] / pt['median']:.2f}x "
                     f"| {rss_l:.0f} / {rss_p:.0f} ({rss_l / rss_p:.2f}x) | {min(ps):.0f}–{max(ps):.0f} |")
    deep = [r for r in results if "lwm_deep" in r]
    if deep:
        lines += ["", f"| file | pp{a.depth} lwm | llama.cpp | ratio | tg{a.gen} at depth {a.depth} lwm | llama.cpp | ratio "
                  f"| peak RSS lwm / llama.cpp (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in deep:
            lp, lt = r["lwm_deep"]["prefill"], r["lwm_deep"]["decode"]
            pp, pt = r["peer_deep_pp"]["ts"], r["peer_deep_tg"]["ts"]
            rss_p = max(r["peer_deep_pp"]["rss_mb"], r["peer_deep_tg"]["rss_mb"])
            lines.append(f"| {r['model']} | {fmt(lp)} | {fmt(pp)} | {lp['median'] / pp['median']:.2f}x "
                         f"| {fmt(lt)} | {fmt(pt)} | {lt['median'] / pt['median']:.2f}x "
                         f"| {r['lwm_deep']['rss_mb']:.0f} / {rss_p:.0f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
