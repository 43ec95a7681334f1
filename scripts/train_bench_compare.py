"""`lwm train-bench` and the original's JAX training step (scripts/train_peer_jax.py) in one
invocation, on the same fixed model (vocabulary 259, hidden 256, 2 layers, 4 heads of 64,
chunks 256, batch 1), one length at a time and alternating lwm / JAX at each length, so
both see the same machine load. Prints a Markdown table per dtype with tokens/s, the ratio
lwm/JAX, CPU seconds per step (steadier than wall time on a shared machine) and peak RSS;
writes all records as JSON.

Threads: lwm runs with `--threads 1`; the JAX child runs with XLA_FLAGS=
--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 (set by
train_peer_jax.py --threads 1). Neither is pinned to a core.

Usage: train_bench_compare.py --lwm-bin target/release/lwm --python /tmp/jaxpeer/bin/python \
           --lwm-src PATH/TO/LWM --tux PATH/TO/tux [--lengths 512,...,8192] [--steps 2] \
           [--dtypes f32,bf16] [--json OUT.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def lwm_one(a, n, dtype):
    cmd = [a.lwm_bin, "train-bench", "--json", "--lengths", str(n), "--steps", str(a.steps),
           "--threads", "1", "--chunk", str(a.chunk), "--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if out.returncode != 0:
        return dict(error=out.stderr.strip()[-300:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def jax_one(a, n, dtype):
    cmd = [a.python, os.path.join(HERE, "train_peer_jax.py"), "--lwm", a.lwm_src,
           "--lengths", str(n), "--steps", str(a.steps), "--threads", "1",
           "--chunk", str(a.chunk), "--dtype", {"f32": "fp32"}.get(dtype, dtype),
           "--timeout", str(a.timeout)]
    if a.tux:
        cmd += ["--tux", a.tux]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        out = subprocess.run(cmd + ["--json", f.name], capture_output=True, text=True,
                             timeout=a.timeout + 60)
        if out.returncode != 0:
            return dict(error=out.stderr.strip()[-300:])
        return json.load(open(f.name))[0]


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def table(rows, dtype):
    lines = [
        f"dtype {dtype}:",
        "",
        "| seq_len | lwm tok/s | JAX tok/s | lwm/JAX | lwm CPU s/step | JAX CPU s/step "
        "| lwm/JAX by CPU time | lwm peak RSS MiB | JAX peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, l, j in rows:
        lt, jt = l.get("tokens_per_s"), j.get("tokens_per_s")
        lc, jc = l.get("cpu_s_per_step"), j.get("cpu_s_per_step")
        ratio = lt / jt if lt and jt else None
        cpu_ratio = jc / lc if lc and jc else None
        note = "; ".join(f"{k}: {r['error']}" for k, r in (("lwm", l), ("JAX", j)) if "error" in r)
        lines.append(
            f"| {n} | {fmt(lt, '.0f')} | {fmt(jt, '.0f')} | {fmt(ratio, '.2f')} | "
            f"{fmt(lc, '.2f')} | {fmt(jc, '.2f')} | {fmt(cpu_ratio, '.2f')} | "
            f"{fmt(l.get('peak_rss_mib'), '.0f')} | {fmt(j.get('peak_rss_mib'), '.0f')} |"
            + (f" {note}" if note else ""))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lwm-bin", default="target/release/lwm")
    p.add_argument("--python", default=sys.executable, help="Python with jax/flax/optax")
    p.add_argument("--lwm-src", required=True, help="LargeWorldModel/LWM checkout")
    p.add_argument("--tux", help="haoliuhl/tux checkout (default: installed tux)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--dtypes", default="f32", help="f32 and/or bf16, comma-separated")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json")
    a = p.parse_args()
    records, tables = [], []
    for dtype in a.dtypes.split(","):
        rows = []
        for n in [int(x) for x in a.lengths.split(",")]:
            l = lwm_one(a, n, dtype)
            j = jax_one(a, n, dtype)
            print(f"# {dtype} {n}: lwm {json.dumps(l)}\n#   JAX {json.dumps(j)}", flush=True)
            rows.append((n, l, j))
            records.append(dict(dtype=dtype, seq_len=n, lwm=l, jax=j))
        tables.append(table(rows, dtype))
    print("\n\n".join(tables))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
