#!/usr/bin/env python3
"""Benchmark models with a real model's layer shapes: random weights, the LLaMA-2 vocabulary.

Writes a GGUF F16 (or BF16) file with `--layers` of the shape's layers, the tokenizer taken
from llama.cpp's `models/ggml-vocab-llama-spm.gguf` (the LLaMA-2 SentencePiece vocabulary),
then quantizes it with llama.cpp's own `llama-quantize` to each of `--quants`. Tensors are
written one at a time, so a full 32-layer 7B model (13.5 GB in F16) needs little memory.

    bash scripts/build-llama-cpp.sh            # or any llama.cpp build with llama-quantize
    python3 scripts/make_bench_model.py --peer DIR/vendor/llama.cpp --shape lwm-7b --layers 4 \\
        --quants Q4_K_M,Q8_0 --out /work/bench-models

Files: OUT/<shape>-<layers>L-F16.gguf and OUT/<shape>-<layers>L-<QUANT>.gguf.
Shapes: lwm-7b (LLaMA-2-7B: hidden 4096, FFN 11008, 32 heads, no GQA; LWM-Text-Chat-1M theta 5e7,
1M positions), tinyllama-1.1b (GQA: 32 heads, 4 KV heads).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    # LWM-Text-Chat-1M (shared/reference/lwm-facts.md): LLaMA-2-7B layers, theta 5e7, 1M context.
    "lwm-7b": dict(hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, theta=5e7, ctx=1048576, eps=1e-6),
    "tinyllama-1.1b": dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000, theta=1e4, ctx=2048, eps=1e-5),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, help="llama.cpp source tree (vendor/llama.cpp of the sdist) with build/bin")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="lwm-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    ap.add_argument("--quants", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0", help="llama-quantize type names, comma-separated ('' for none)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    peer = Path(args.peer)
    sys.path.insert(0, str(peer / "gguf-py"))
    import gguf  # llama.cpp's own writer

    s = SHAPES[args.shape]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.shape}-{args.layers}L"
    base = out_dir / f"{stem}-{args.dtype.upper()}.gguf"

    vocab = gguf.GGUFReader(str(peer / "models" / "ggml-vocab-llama-spm.gguf"))
    w = gguf.GGUFWriter(str(base), "llama")
    w.add_name(f"{args.shape} shape, {args.layers} layers, random weights")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_block_count(args.layers)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.dtype == "f16" else gguf.LlamaFileType.MOSTLY_BF16)
    for f in vocab.fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(f.name, vals, vt, sub_type=sub)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_key_value(f.name, bytes(f.parts[f.data[0]]).decode(), vt)
        else:
            w.add_key_value(f.name, f.parts[f.data[0]].tolist()[0], vt)

    h, ffn, v = s["hidden"], s["ffn"], s["vocab"]
    kv = h // s["heads"] * s["kv_heads"]
    tensors = [("token_embd.weight", (v, h)), ("output_norm.weight", (h,)), ("output.weight", (v, h))]
    for i in range(args.layers):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", (h,)), (p + "attn_q.weight", (h, h)), (p + "attn_k.weight", (kv, h)),
            (p + "attn_v.weight", (kv, h)), (p + "attn_output.weight", (h, h)), (p + "ffn_norm.weight", (h,)),
            (p + "ffn_gate.weight", (ffn, h)), (p + "ffn_up.weight", (ffn, h)), (p + "ffn_down.weight", (h, ffn)),
        ]
    half = np.float16 if args.dtype == "f16" else None
    qt = gguf.GGMLQuantizationType.F16 if args.dtype == "f16" else gguf.GGMLQuantizationType.BF16

    def make(name, shape, i):
        rng = np.random.default_rng([args.seed, i])
        if len(shape) == 1:  # norms: around 1, f32 as llama.cpp keeps them
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        std = 0.02 if "down" not in name and "output." not in name else 0.02 / np.sqrt(2 * args.layers)
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    for i, (name, shape) in enumerate(tensors):
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape) in enumerate(tensors):
        a = make(name, shape, i)
        if len(shape) > 1:
            if half is not None:
                a = a.astype(np.float16)
            else:  # bf16: round to nearest even, as a uint16 array
                b = a.view(np.uint32)
                a = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        w.write_tensor_data(a)
        print(f"  {name} {shape}", file=sys.stderr, end="\r")
    w.close()
    print(f"{base}: {base.stat().st_size / 1e6:.0f} MB", file=sys.stderr)

    quantize = peer / "build" / "bin" / "llama-quantize"
    for q in filter(None, args.quants.split(",")):
        dst = out_dir / f"{stem}-{q}.gguf"
        subprocess.run([str(quantize), str(base), str(dst), q, "2"], check=True, stdout=subprocess.DEVNULL)
        print(f"{dst}: {dst.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
