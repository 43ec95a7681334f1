#!/usr/bin/env python3
"""Ring prefill across network-namespace hosts at shaped link speeds (issue 23; not a test).

Every rank runs in its own host (scripts/netns-hosts.sh), MPI over TCP on veth links whose
egress is limited by tbf and, with --delays, each host's outgoing packets wait a fixed one-way
latency (scripts/nfq_delay.py). For each ring size, link rate, latency, prompt length and prefill chunk it
runs `mpirun ... lwm ring-bench --json` and records prefill time and, per worker, attention
compute vs wait per key/value block and bytes sent, next to what docs/scaling.md's condition
predicts for the wait (a shard's transfer time, plus LEGS one-way latencies, minus a step's
compute, if positive). LEGS = 3: a message past Open MPI's eager limit (64 KiB over TCP) is a
rendezvous: the first fragment, the receiver's acknowledgement, then the rest.

    sudo python3 scripts/ring_netns_bench.py --lwm target/release/lwm --model default \\
        --sp 2,4 --rates off,1gbit,300mbit,100mbit --tokens 4096 --chunks 4096,256 \\
        --delays 0,1,5 --json docs/bench/ring-netns.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTS = os.path.join(HERE, "netns-hosts.sh")
# One-way latencies a shard's transfer pays: a rendezvous (first fragment, ack, the rest).
LEGS = 3


def rate_bytes(rate: str) -> float | None:
    if rate == "off":
        return None
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f / 8
    raise SystemExit(f"rate '{rate}': use e.g. 100mbit, 1gbit or off")


def pressure() -> str:
    try:
        return open("/proc/pressure/cpu").readline().strip()
    except OSError:
        return "n/a"


def sh(*args: str) -> str:
    return subprocess.run(["bash", HOSTS, *args], check=True, capture_output=True, text=True).stdout


def ping_ms(name: str) -> float:
    """Mean user-to-user round trip host 0 -> host 1 over 10 pings (-U: after the delay queues)."""
    hosts = open(f"/run/lwm-netns/{name}/hosts").read().split()
    out = subprocess.run(["ip", "netns", "exec", hosts[1], "ping", "-U", "-c", "10", "-i", "0.05", "-q", hosts[2]],
                         capture_output=True, text=True).stdout
    try:
        return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])
    except (IndexError, ValueError):
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lwm", required=True, help="lwm built with --features mpi (release)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--sp", default="2,4")
    ap.add_argument("--rates", default="off,1gbit,300mbit,100mbit")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--chunks", default="0", help="prefill chunks; 0 = the whole prompt in one pass")
    ap.add_argument("--delays", default="0", help="one-way latencies added per host, ms (0 = none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    rows = []
    for sp in [int(x) for x in a.sp.split(",")]:
        name = f"lwmbn{sp}"
        sh("up", name, str(sp), str(100 + sp))
        try:
            for tokens in [int(x) for x in a.tokens.split(",")]:
                for chunk in [int(x) for x in a.chunks.split(",")]:
                    chunk = chunk or tokens
                    for rate, delay in [(r, d) for r in a.rates.split(",") for d in a.delays.split(",")]:
                        sh("shape", name, rate)
                        sh("delay", name, delay if float(delay) > 0 else "off")
                        rtt = ping_ms(name)
                        before = pressure()
                        cmd = ["bash", HOSTS, "mpirun", name, "-n", str(sp), a.lwm, "ring-bench",
                               "-m", a.model, "--tokens", str(tokens), "--repeats", str(a.repeats),
                               "-t", str(a.threads), "--prefill-chunk", str(chunk), "--json"]
                        t0 = time.time()
                        out = subprocess.run(cmd, capture_output=True, text=True)
                        wall = time.time() - t0
                        if out.returncode != 0:
                            print(out.stderr[-2000:], file=sys.stderr)
                            raise SystemExit(f"sp={sp} rate={rate} delay={delay} tokens={tokens}: failed")
                        run = json.loads(out.stdout)["runs"][0]
                        blocks = max(1, run["attention_blocks"])
                        per_block_bytes = run["bytes_per_block"]
                        b = rate_bytes(rate)
                        compute_ms = run["compute_ms_per_block"]
                        # Per layer sp steps, sp - 1 of them hand on a shard of S bytes; the
                        # transfer of step s + 1's shard runs during step s's compute, so each
                        # of those waits max(0, S/B - compute). Averaged over the sp blocks.
                        shard = per_block_bytes * sp / (sp - 1)
                        transfer_ms = LEGS * float(delay) + (0.0 if b is None else 1e3 * shard / b)
                        predicted = None if b is None and float(delay) == 0 else \
                            (sp - 1) / sp * max(0.0, transfer_ms - compute_ms)
                        row = {"sp": sp, "rate": rate, "delay_ms": float(delay), "ping_rtt_ms": rtt,
                               "tokens": tokens, "prefill_chunk": chunk,
                               "prefill_secs": run["prefill_secs"], "tok_s": run["tokens_per_sec_median"],
                               "compute_ms_per_block": compute_ms, "wait_ms_per_block": run["wait_ms_per_block"],
                               "predicted_wait_ms_per_block": predicted, "bytes_per_block": per_block_bytes,
                               "blocks": blocks, "per_worker": run["per_worker"], "wall_secs": wall,
                               "cpu_pressure_before": before, "cpu_pressure_after": pressure()}
                        rows.append(row)
                        p = row["prefill_secs"]
                        print(f"sp={sp} {rate:>8} +{delay}ms (rtt {rtt:.2f}) tokens={tokens} chunk={chunk}: prefill {p['median']:.2f}s "
                              f"({p['min']:.2f}-{p['max']:.2f}), compute {compute_ms:.2f} ms/block, "
                              f"wait {row['wait_ms_per_block']:.2f} ms/block (predicted "
                              f"{'-' if predicted is None else f'{predicted:.2f}'}), "
                              f"{per_block_bytes / 1024:.0f} KiB/block; cpu {row['cpu_pressure_after']}", flush=True)
                sh("shape", name, "off")
                sh("delay", name, "off")
        finally:
            sh("down", name)
    if a.json:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        avx512 = "avx512f" in open("/proc/cpuinfo").read()
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "avx512f": avx512, "nproc": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
