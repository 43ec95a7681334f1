#!/usr/bin/env python3
"""Benchmark models with a real model's layer shapes: random weights, the LLaMA-2 vocabulary.

One set of seeded random weights (normal, std 0.02; RMSNorm weights 1 + 0.02 * normal) with
`--layers` layers of the chosen shape, written in each of `--formats`, always as the same
model: every value is first rounded to bfloat16 precision, so the BF16 GGUF, the safetensors
and the JAX files hold bit-identical numbers (the F16 GGUF too, except values below 2^-17 in
magnitude, about 0.02% of them, which f16's subnormals round), and q/k rows are laid out as each format's loader expects (see below).
Each tensor's values depend only on `--seed` and the tensor's name, so the first N layers of
a bigger model equal an N-layer model. Tensors are generated and written one at a time, so a
full 32-layer 7B (13.5 GB in F16) needs about 2 GB of memory.

    bash scripts/build-llama-cpp.sh                 # the llama.cpp peer, in $LWM_PEER_DIR or ~/.cache/lwm-peer
    python3 scripts/make_bench_model.py --shape lwm-7b --layers 4 \\
        --formats f16,q4_k_m,q8_0,safetensors,jax --out /work/bench-models

Formats (comma-separated, any order) and their outputs under --out, STEM = SHAPE-<N>L
(plus -seed<S> for a seed other than 0):

  f16, bf16        STEM-F16.gguf / STEM-BF16.gguf, written by llama.cpp's own gguf-py:
                   general.architecture llama, every llama.* hyperparameter, the tokenizer.*
                   keys of models/ggml-vocab-llama-spm.gguf; 2-D weights F16/BF16, norms F32.
                   q/k rows in llama.cpp's order (convert_hf_to_gguf's permute of HF's rows).
  q4_k_m, q5_k_m,  STEM-Q4_K_M.gguf, ...: the peer's llama-quantize run on STEM-F16.gguf
  q6_k, q8_0, q4_0 (which is written first, and removed again unless f16 is asked for).
  safetensors      STEM-hf/: a Hugging Face LlamaForCausalLM directory, config.json +
                   model.safetensors (bf16, HF names, q/k rows in HF's rotate-half order,
                   i.e. the inverse of llama.cpp's permute) + tokenizer.model +
                   tokenizer_config.json.
  jax              STEM-jax/: an LWM JAX checkpoint as tux's StreamingCheckpointer writes it
                   (`params`: msgpack records [key_path, flax to_bytes(array)], bf16, arrays
                   over 2^30 bytes in flax's chunked form), scanned layers
                   (transformer/h/scan_decoder/..., a leading layer axis; --jax-layout unscanned
                   for transformer/h/N/...), Flax (in, out) kernels, q/k rows in the original's
                   interleaved order (llama.cpp's), plus config.json (HF style: the theta and
                   context the params file cannot carry) and tokenizer.model. lwm loads it as
                   `--model STEM-jax`. With --vision (jax only; STEM gets -vision): an
                   LWM-Chat-shaped vision-language model, plus transformer/vte/embedding and
                   vision_head/kernel (8448 rows) and `vqgan`, a real-size random VQGAN pickle.

Checked: for lwm-7b and tinyllama-1.1b (GQA) models, `lwm logits --numerics exact` gives the
same top logits (to 1e-5) from the BF16 GGUF, the F16 GGUF, the safetensors and the JAX folders,
and llama-bench runs the GGUFs.

tokenizer.model is a SentencePiece ModelProto written from the vocabulary GGUF (pieces,
scores, types; BPE, byte fallback, identity normalizer, dummy prefix: LLaMA's settings).

Shapes:
  lwm-7b          LWM-Text-Chat-1M (LLaMA-2-7B layers): hidden 4096, FFN 11008, 32 heads, 32 KV
                  heads (no GQA), head dim 128, vocab 32000, rope theta 5e7, 1048576
                  positions, RMSNorm eps 1e-6 (shared/reference/lwm-facts.md §1.1, §1.5).
  tinyllama-1.1b  the GQA shape (TinyLlama-1.1B): hidden 2048, FFN 5632, 32 heads, 4 KV heads,
                  head dim 64, vocab 32000, theta 1e4, 2048 positions, eps 1e-5 (22 layers).

The peer: --peer-dir DIR (default ${LWM_PEER_DIR:-~/.cache/lwm-peer}, build-llama-cpp.sh's
DIR; the sdist folder or its vendor/llama.cpp work too) gives gguf-py, the vocabulary GGUF and
build/bin/llama-quantize; --gguf-py, --vocab and --quantize override each. Existing outputs are
kept (rerun with --force to rewrite them); files are written under a temporary name and renamed
when complete. Needs numpy only (plus the peer).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

SDIST = "llama_cpp_python-0.3.36"

SHAPES = {
    # LWM-Text-Chat-1M's HF config: rope_theta 5e7, max_position_embeddings 1048576, eps 1e-6.
    "lwm-7b": dict(hidden=4096, ffn=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000,
                   theta=5e7, ctx=1048576, eps=1e-6, full_layers=32),
    "tinyllama-1.1b": dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, head_dim=64, vocab=32000,
                           theta=1e4, ctx=2048, eps=1e-5, full_layers=22),
}

GGUF_FORMATS = {"f16": "F16", "bf16": "BF16"}
QUANT_FORMATS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0", "q4_0": "Q4_0"}
OTHER_FORMATS = ("safetensors", "jax")
STD = 0.02
MAX_CHUNK_BYTES = 1 << 30  # flax.serialization.MAX_CHUNK_SIZE
GENERATOR = "scripts/make_bench_model.py v2"  # bump when the values or layouts change


# --------------------------------------------------------------------------- the weights

class Model:
    """Shape, tensor list and the seeded values, in llama.cpp's (GGUF) layout: numpy (out, in)."""

    def __init__(self, shape: str, layers: int, seed: int, vision: bool = False):
        self.name = shape
        self.s = SHAPES[shape]
        self.layers = layers
        self.seed = seed
        self.vision = vision
        s = self.s
        h, f, v = s["hidden"], s["ffn"], s["vocab"]
        q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        self.top = [("token_embd.weight", (v, h)), ("output_norm.weight", (h,)), ("output.weight", (v, h))]
        self.per_layer = [
            ("attn_norm.weight", (h,)), ("attn_q.weight", (q, h)), ("attn_k.weight", (kv, h)),
            ("attn_v.weight", (kv, h)), ("attn_output.weight", (h, q)), ("ffn_norm.weight", (h,)),
            ("ffn_gate.weight", (f, h)), ("ffn_up.weight", (f, h)), ("ffn_down.weight", (h, f)),
        ]

    def gguf_tensors(self):
        out = list(self.top)
        for i in range(self.layers):
            out += [(f"blk.{i}.{n}", shp) for n, shp in self.per_layer]
        return out

    def values(self, name: str, shape) -> np.ndarray:
        """float32 values of tensor `name` (GGUF naming and layout), on the bfloat16 grid."""
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= STD
        if len(shape) == 1:
            a += 1.0
        return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)

    def tag(self) -> str:
        """general.name of the GGUFs and _comment of config.json: what an existing output must
        say to be kept (another generator, seed or layer count is not the same model)."""
        kind = ", vision-language (vte, vision_head)" if self.vision else ""
        return f"{self.name} shape{kind}, {self.layers} layers, random weights, seed {self.seed} ({GENERATOR})"

    def params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.gguf_tensors())


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the uint16 bit patterns."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: llama.cpp q/k rows -> HF rows.

    permute views each head's rows as (2, D/2) and swaps to (D/2, 2) (HF's rotate-half pairs
    (i, i + D/2) become adjacent rows); this views them as (D/2, 2) and swaps back."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- vocabulary

class Vocab:
    """The tokenizer.* keys of llama.cpp's ggml-vocab-llama-spm.gguf."""

    def __init__(self, gguf, path: Path):
        r = gguf.GGUFReader(str(path))
        self.fields = []  # (name, value, type, sub_type)
        for f in r.fields.values():
            if not f.name.startswith("tokenizer."):
                continue
            vt = f.types[0]
            sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
            self.fields.append((f.name, field_value(gguf, f), vt, sub))
        d = {n: v for n, v, _, _ in self.fields}
        self.tokens = d["tokenizer.ggml.tokens"]
        self.scores = d.get("tokenizer.ggml.scores") or [0.0] * len(self.tokens)
        self.types = d.get("tokenizer.ggml.token_type") or [1] * len(self.tokens)
        self.bos = d.get("tokenizer.ggml.bos_token_id", 1)
        self.eos = d.get("tokenizer.ggml.eos_token_id", 2)
        self.unk = d.get("tokenizer.ggml.unknown_token_id", 0)
        self.add_bos = bool(d.get("tokenizer.ggml.add_bos_token", True))
        self.add_eos = bool(d.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(d.get("tokenizer.ggml.add_space_prefix", True))
        if d.get("tokenizer.ggml.model") != "llama":
            raise SystemExit(f"{path}: tokenizer.ggml.model is {d.get('tokenizer.ggml.model')!r}, expected 'llama' (SentencePiece)")

    def sentencepiece_model(self) -> bytes:
        """A SentencePiece ModelProto (the fields SentencePiece and lwm read)."""
        out = bytearray()
        for piece, score, kind in zip(self.tokens, self.scores, self.types):
            sp = pb_bytes(1, piece.encode("utf-8")) + pb_key(2, 5) + struct.pack("<f", score)
            if kind != 1:
                sp += pb_varint_field(3, int(kind))
            out += pb_bytes(1, sp)
        trainer = (pb_varint_field(3, 2)  # model_type BPE
                   + pb_varint_field(4, len(self.tokens))
                   + pb_varint_field(35, 1)  # byte_fallback
                   + pb_varint_field(40, self.unk) + pb_varint_field(41, self.bos)
                   + pb_varint_field(42, self.eos) + pb_varint_field(43, -1))
        normalizer = (pb_bytes(1, b"identity") + pb_varint_field(3, int(self.add_space_prefix))
                      + pb_varint_field(4, 0) + pb_varint_field(5, 1))
        out += pb_bytes(2, trainer) + pb_bytes(3, normalizer)
        return bytes(out)

    def tokenizer_config(self, ctx: int) -> dict:
        return {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
            "bos_token": self.tokens[self.bos], "eos_token": self.tokens[self.eos],
            "unk_token": self.tokens[self.unk], "legacy": True, "model_max_length": ctx,
            "clean_up_tokenization_spaces": False,
        }


def field_value(gguf, f):
    vt = f.types[0]
    if hasattr(f, "contents"):
        return f.contents()
    if vt == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if vt == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields: 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_key(field: int, wire: int) -> bytes:
    return pb_varint(field << 3 | wire)


def pb_varint_field(field: int, n: int) -> bytes:
    return pb_key(field, 0) + pb_varint(n)


def pb_bytes(field: int, b: bytes) -> bytes:
    return pb_key(field, 2) + pb_varint(len(b)) + b


# --------------------------------------------------------------------------- writers

def hf_config(m: Model, v: Vocab) -> dict:
    s = m.s
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["ffn"],
        "num_hidden_layers": m.layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
        "max_position_embeddings": s["ctx"], "rms_norm_eps": s["eps"], "rope_theta": s["theta"],
        "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "initializer_range": STD, "bos_token_id": v.bos, "eos_token_id": v.eos, "use_cache": True,
        "torch_dtype": "bfloat16",
        "_comment": m.tag(),
    }


def write_gguf(gguf, m: Model, v: Vocab, path: Path, kind: str) -> None:
    """kind: F16 or BF16; norms stay F32."""
    s = m.s
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(m.tag())
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_block_count(m.layers)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_vocab_size(s["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "F16" else gguf.LlamaFileType.MOSTLY_BF16)
    for name, value, vt, sub in v.fields:
        w.add_key_value(name, value, vt, sub_type=sub)
    qt = gguf.GGMLQuantizationType.F16 if kind == "F16" else gguf.GGMLQuantizationType.BF16
    tensors = m.gguf_tensors()
    for name, shape in tensors:
        n = int(np.prod(shape))
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), n * 2, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape) in enumerate(tensors):
        a = m.values(name, shape)
        if len(shape) > 1:
            a = a.astype(np.float16) if kind == "F16" else bf16_bits(a)
        w.write_tensor_data(a)
        progress(i + 1, len(tensors), name)
    w.close()


def hf_tensors(m: Model):
    """(HF name, GGUF name, shape, q/k heads to unpermute with or 0), in HF's usual order."""
    s = m.s
    out = [("model.embed_tokens.weight", "token_embd.weight", (s["vocab"], s["hidden"]), 0)]
    names = {"attn_q": ("self_attn.q_proj", s["heads"]), "attn_k": ("self_attn.k_proj", s["kv_heads"]),
             "attn_v": ("self_attn.v_proj", 0), "attn_output": ("self_attn.o_proj", 0),
             "ffn_gate": ("mlp.gate_proj", 0), "ffn_up": ("mlp.up_proj", 0), "ffn_down": ("mlp.down_proj", 0),
             "attn_norm": ("input_layernorm", 0), "ffn_norm": ("post_attention_layernorm", 0)}
    order = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    shapes = {n.split(".")[0]: shp for n, shp in m.per_layer}
    for i in range(m.layers):
        for g in order:
            hf, heads = names[g]
            out.append((f"model.layers.{i}.{hf}.weight", f"blk.{i}.{g}.weight", shapes[g], heads))
    out.append(("model.norm.weight", "output_norm.weight", (s["hidden"],), 0))
    out.append(("lm_head.weight", "output.weight", (s["vocab"], s["hidden"]), 0))
    return out


def write_safetensors(m: Model, path: Path) -> None:
    """model.safetensors in bf16, streamed: the header first (all shapes are known), then each tensor."""
    tensors = hf_tensors(m)
    header, off = {}, 0
    for hf, _, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[hf] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for i, (hf, g, shape, heads) in enumerate(tensors):
            a = m.values(g, shape)
            if heads:
                a = unpermute(a, heads)
            bf16_bits(a).tofile(f)
            progress(i + 1, len(tensors), hf)


# msgpack, the few forms flax and tux write (as msgpack-python packs them: smallest encoding).
def mp_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    for tag, fmt, lim in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
        if n < lim:
            return bytes([tag]) + struct.pack(fmt, n)
    raise ValueError(n)


def mp_sized(n: int, fix: int | None, fix_lim: int, tags) -> bytes:
    if fix is not None and n < fix_lim:
        return bytes([fix | n])
    for tag, fmt, lim in tags:
        if n < lim:
            return bytes([tag]) + struct.pack(fmt, n)
    raise ValueError(f"msgpack length {n} too large")


def mp_str(s: str) -> bytes:
    b = s.encode()
    return mp_sized(len(b), 0xA0, 32, ((0xD9, ">B", 1 << 8), (0xDA, ">H", 1 << 16), (0xDB, ">I", 1 << 32))) + b


def mp_bin_header(n: int) -> bytes:
    return mp_sized(n, None, 0, ((0xC4, ">B", 1 << 8), (0xC5, ">H", 1 << 16), (0xC6, ">I", 1 << 32)))


def mp_array_header(n: int) -> bytes:
    return mp_sized(n, 0x90, 16, ((0xDC, ">H", 1 << 16), (0xDD, ">I", 1 << 32)))


def mp_map_header(n: int) -> bytes:
    return mp_sized(n, 0x80, 16, ((0xDE, ">H", 1 << 16), (0xDF, ">I", 1 << 32)))


def mp_ext_header(code: int, n: int) -> bytes:
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixext:
        return bytes([fixext[n], code])
    for tag, fmt, lim in ((0xC7, ">B", 1 << 8), (0xC8, ">H", 1 << 16), (0xC9, ">I", 1 << 32)):
        if n < lim:
            return bytes([tag]) + struct.pack(fmt, n) + bytes([code])
    raise ValueError(n)


def flax_array_segments(shape, dtype_name: str, itemsize: int):
    """flax.serialization.to_bytes(array) as [(header bytes, data bytes that follow)].

    Arrays of at most 2^30 bytes: ExtType(1, packb((shape, dtype, raw))). Larger ones:
    {"__msgpack_chunked_array__": True, "shape": {"0": d0, ..}, "chunks": {"0": Ext1(flat), ..}}
    with chunks of int(2^30 / itemsize) elements."""
    def ext(shp, nbytes):
        inner = mp_array_header(3) + mp_array_header(len(shp)) + b"".join(mp_uint(d) for d in shp)
        inner += mp_str(dtype_name) + mp_bin_header(nbytes)
        return mp_ext_header(1, len(inner) + nbytes) + inner

    n = int(np.prod(shape))
    if n * itemsize <= MAX_CHUNK_BYTES:
        return [(ext(shape, n * itemsize), n * itemsize)]
    cs = max(1, MAX_CHUNK_BYTES // itemsize)
    chunks = [min(cs, n - i) for i in range(0, n, cs)]
    head = mp_map_header(3) + mp_str("__msgpack_chunked_array__") + b"\xc3" + mp_str("shape")
    head += mp_map_header(len(shape)) + b"".join(mp_str(str(i)) + mp_uint(d) for i, d in enumerate(shape))
    head += mp_str("chunks") + mp_map_header(len(chunks))
    segs = []
    for k, c in enumerate(chunks):
        segs.append(((head if k == 0 else b"") + mp_str(str(k)) + ext((c,), c * itemsize), c * itemsize))
    return segs


def write_record(f, key, shape, blocks) -> None:
    """One tux StreamingCheckpointer record, packb((key_path, to_bytes(array))), bf16 data
    streamed from `blocks` (uint16 arrays whose concatenation is the array in C order)."""
    segs = flax_array_segments(shape, "bfloat16", 2)
    total = sum(len(h) + n for h, n in segs)
    f.write(mp_array_header(2) + mp_array_header(len(key)) + b"".join(mp_str(k) for k in key))
    f.write(mp_bin_header(total))
    it = (memoryview(np.ascontiguousarray(b)).cast("B") for b in blocks)
    cur = memoryview(b"")
    for h, n in segs:
        f.write(h)
        while n:
            if not len(cur):
                cur = next(it)
            take = min(n, len(cur))
            f.write(cur[:take])
            cur, n = cur[take:], n - take
    if len(cur) or next(it, None) is not None:
        raise AssertionError(f"{'/'.join(key)}: more data than its shape {shape}")


JAX_LAYER = [  # JAX path below the layer, GGUF name, transposed (Flax Dense kernels are (in, out))
    (("attention", "wk", "kernel"), "attn_k", True), (("attention", "wo", "kernel"), "attn_output", True),
    (("attention", "wq", "kernel"), "attn_q", True), (("attention", "wv", "kernel"), "attn_v", True),
    (("attention_norm", "kernel"), "attn_norm", False),
    (("feed_forward", "w1", "kernel"), "ffn_gate", True), (("feed_forward", "w2", "kernel"), "ffn_down", True),
    (("feed_forward", "w3", "kernel"), "ffn_up", True), (("ffn_norm", "kernel"), "ffn_norm", False),
]


def write_jax(m: Model, path: Path, layout: str) -> None:
    """The params file, records in flax's (sorted) tree order. q/k rows stay in llama.cpp's
    order, which is the original's interleaved RoPE layout (lwm-facts §3.3)."""
    s = m.s
    shapes = {n.split(".")[0]: shp for n, shp in m.per_layer}

    def kernel(g, shape, transposed):
        a = m.values(g, shape)
        return bf16_bits(a.T if transposed else a)

    records = [(("lm_head", "kernel"), lambda: [kernel("output.weight", (s["vocab"], s["hidden"]), True)],
                (s["hidden"], s["vocab"]))]
    for sub, g, tr in JAX_LAYER:
        shp = shapes[g]
        jshape = tuple(reversed(shp)) if tr else shp
        if layout == "scanned":
            records.append((("transformer", "h", "scan_decoder") + sub,
                            lambda g=g, shp=shp, tr=tr: (kernel(f"blk.{i}.{g}.weight", shp, tr) for i in range(m.layers)),
                            (m.layers,) + jshape))
        else:
            for i in range(m.layers):
                records.append((("transformer", "h", str(i)) + sub,
                                lambda g=g, shp=shp, tr=tr, i=i: [kernel(f"blk.{i}.{g}.weight", shp, tr)], jshape))
    if layout == "unscanned":  # flax sorts dict keys as strings: "0", "1", "10", "11", ..., "2"
        records[1:] = sorted(records[1:], key=lambda r: r[0])
    records.append((("transformer", "ln_f", "kernel"), lambda: [kernel("output_norm.weight", (s["hidden"],), False)],
                    (s["hidden"],)))
    if m.vision:  # LWM-Chat's second embedding table and head (flax's sorted order: vte < wte)
        records.append((("transformer", "vte", "embedding"),
                        lambda: [kernel("vision_embd.weight", (VISION_VOCAB, s["hidden"]), False)],
                        (VISION_VOCAB, s["hidden"])))
    records.append((("transformer", "wte", "embedding"),
                    lambda: [kernel("token_embd.weight", (s["vocab"], s["hidden"]), False)], (s["vocab"], s["hidden"])))
    if m.vision:
        records.append((("vision_head", "kernel"),
                        lambda: [kernel("vision_output.weight", (VISION_VOCAB, s["hidden"]), True)],
                        (s["hidden"], VISION_VOCAB)))
    with open(path, "wb") as f:
        for i, (key, blocks, shape) in enumerate(records):
            write_record(f, key, shape, blocks())
            progress(i + 1, len(records), "/".join(key))


VISION_VOCAB = 8448  # 8192 VQGAN codes, end of frame, end of vision, padding (lwm-facts §4)


def write_vqgan(path: Path, seed: int) -> None:
    """A VQGAN weights pickle with the real one's shapes (lwm-facts §6: hidden 128, channel_mult
    (1, 2, 2, 4, 6), 2 res blocks per encoder level, 3 per decoder level, z 64, 8192 x 64
    codebook; 146,244,675 parameters), random values scaled like an initialisation: the nested
    dict of float32 numpy arrays that lwm/vqgan.py loads with pickle."""
    import pickle
    rng = np.random.default_rng([seed, 0x76716761])
    tree: dict = {}

    def put(name: str, shape, scale: float) -> None:
        node = tree
        *parents, leaf = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = rng.uniform(-scale, scale, shape).astype(np.float32)

    def conv(n, k, i, o):
        put(f"{n}/kernel", (k, k, i, o), (1.0 / (k * k * i)) ** 0.5)
        put(f"{n}/bias", (o,), 0.01)

    def norm(n, c):
        put(f"{n}/scale", (c,), 1.0)
        put(f"{n}/bias", (c,), 0.01)

    def res(n, i, o):
        norm(f"{n}/GroupNorm_0", i)
        conv(f"{n}/Conv_0", 3, i, o)
        norm(f"{n}/GroupNorm_1", o)
        conv(f"{n}/Conv_1", 3, o, o)
        if i != o:
            conv(f"{n}/Conv_2", 1, i, o)

    ch = [128 * m for m in (1, 2, 2, 4, 6)]
    conv("encoder/Conv_0", 3, 3, 128)
    c = 128
    for lvl, o in enumerate(ch):
        for b in range(2):
            res(f"encoder/DownsamplingBlock_{lvl}/ResnetBlock_{b}", c, o)
            c = o
        if lvl + 1 < len(ch):
            conv(f"encoder/DownsamplingBlock_{lvl}/Downsample_0/Conv_0", 3, c, c)
    for b in range(2):
        res(f"encoder/MidBlock_0/ResnetBlock_{b}", c, c)
        res(f"decoder/MidBlock_0/ResnetBlock_{b}", c, c)
    norm("encoder/GroupNorm_0", c)
    conv("encoder/Conv_1", 3, c, 64)
    conv("quant_conv", 1, 64, 64)
    conv("post_quant_conv", 1, 64, 64)
    put("quantize/embeddings", (8192, 64), 0.5)
    conv("decoder/Conv_0", 3, 64, c)
    for u, lvl in enumerate(reversed(range(len(ch)))):
        for b in range(3):
            res(f"decoder/UpsamplingBlock_{u}/ResnetBlock_{b}", c, ch[lvl])
            c = ch[lvl]
        if lvl > 0:
            conv(f"decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0", 3, c, c)
    norm("decoder/GroupNorm_0", c)
    conv("decoder/Conv_1", 3, c, 3)
    n = sum(a.size for a in _leaves(tree))
    if n != 146_244_675:
        raise AssertionError(f"VQGAN has {n} parameters, not the real one's 146,244,675")
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=4)


def _leaves(t):
    for v in t.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


# --------------------------------------------------------------------------- driver

def progress(i: int, n: int, what: str) -> None:
    if sys.stderr.isatty():
        print(f"\r  [{i}/{n}] {what:<60}", end="" if i < n else "\n", file=sys.stderr, flush=True)


def size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def human(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def report(p: Path, t0: float | None = None, note: str = "") -> None:
    took = f" in {time.time() - t0:.1f} s" if t0 is not None else ""
    print(f"{p}: {human(size(p))} ({size(p)} bytes){took}{note}", flush=True)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            print(f"  {f.name}: {human(f.stat().st_size)}", flush=True)


def find_llama_cpp(peer_dir: Path) -> Path:
    for c in (peer_dir, peer_dir / "vendor" / "llama.cpp", peer_dir / SDIST / "vendor" / "llama.cpp"):
        if (c / "gguf-py" / "gguf").is_dir():
            return c
    found = sorted(peer_dir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    raise SystemExit(f"no llama.cpp tree (with gguf-py) under {peer_dir}: run scripts/build-llama-cpp.sh {peer_dir}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="lwm-7b")
    ap.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    ap.add_argument("--formats", default="f16,q4_k_m,q5_k_m,q6_k,q8_0,q4_0",
                    help="comma-separated: " + ",".join([*GGUF_FORMATS, *QUANT_FORMATS, *OTHER_FORMATS])
                    + " (default: %(default)s)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-dir", "--peer", type=Path,
                    default=Path(os.environ.get("LWM_PEER_DIR", Path.home() / ".cache" / "lwm-peer")),
                    help="build-llama-cpp.sh's DIR, the sdist or its vendor/llama.cpp (default $LWM_PEER_DIR or ~/.cache/lwm-peer)")
    ap.add_argument("--gguf-py", type=Path, help="llama.cpp's gguf-py folder (default: from --peer-dir)")
    ap.add_argument("--vocab", type=Path, help="vocabulary GGUF (default: models/ggml-vocab-llama-spm.gguf from --peer-dir)")
    ap.add_argument("--quantize", type=Path, help="llama-quantize binary (default: build/bin/llama-quantize from --peer-dir)")
    ap.add_argument("--threads", type=int, default=2, help="llama-quantize threads (default 2)")
    ap.add_argument("--jax-layout", choices=["scanned", "unscanned"], default="scanned",
                    help="scanned: transformer/h/scan_decoder/... (what LWM's released files use); unscanned: transformer/h/N/...")
    ap.add_argument("--vision", action="store_true",
                    help="an LWM-Chat-shaped vision-language model (jax format only): vte and vision_head "
                    "(8448 rows), and a real-size random VQGAN pickle `vqgan` next to the params")
    ap.add_argument("--force", action="store_true", help="rewrite outputs that exist")
    args = ap.parse_args()

    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    known = {*GGUF_FORMATS, *QUANT_FORMATS, *OTHER_FORMATS}
    bad = [f for f in formats if f not in known]
    if bad:
        ap.error(f"unknown format(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    if args.layers < 1:
        ap.error("--layers must be at least 1")

    need_peer_tree = args.gguf_py is None or args.vocab is None or (args.quantize is None and any(f in QUANT_FORMATS for f in formats))
    llama = find_llama_cpp(args.peer_dir.expanduser()) if need_peer_tree else None
    gguf_py = args.gguf_py or llama / "gguf-py"
    vocab_path = args.vocab or llama / "models" / "ggml-vocab-llama-spm.gguf"
    sys.path.insert(0, str(gguf_py))
    import gguf  # llama.cpp's own reader and writer

    if args.vision and formats != ["jax"]:
        ap.error("--vision writes only the jax format (LWM's vision checkpoints are JAX params)")
    m = Model(args.shape, args.layers, args.seed, args.vision)
    vocab = Vocab(gguf, vocab_path)
    if len(vocab.tokens) != m.s["vocab"]:
        raise SystemExit(f"{vocab_path} has {len(vocab.tokens)} tokens, the {m.name} shape {m.s['vocab']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{m.name}-{m.layers}L" + ("-vision" if m.vision else "") + (f"-seed{m.seed}" if m.seed else "")
    print(f"{stem}: {m.params() / 1e6:.1f}M parameters ({m.layers} of {m.name}'s {m.s['full_layers']} layers), "
          f"gguf-py {gguf_py}, vocab {vocab_path}", flush=True)

    def exists(p: Path) -> bool:
        """Keep an existing output, if it is this model (else stop: mixing models would defeat
        the point of writing one model in many formats)."""
        if not p.exists() or args.force:
            return False
        try:
            if p.suffix == ".gguf":
                made = gguf.GGUFReader(str(p)).fields["general.name"].contents()
            else:
                made = json.loads((p.parent / "config.json").read_text()).get("_comment")
        except Exception as e:  # unreadable or half-written: not ours to keep
            made = f"unreadable ({e})"
        if made != m.tag():
            raise SystemExit(f"{p} exists but holds another model ({made!r}, not {m.tag()!r}): remove it or pass --force")
        report(p, note=" (exists; --force rewrites it)")
        return True

    def tmp(p: Path) -> Path:
        return p.with_name(p.name + ".part")

    quants = [f for f in formats if f in QUANT_FORMATS]
    f16 = out / f"{stem}-F16.gguf"
    pending_q = [q for q in quants if not exists(out / f"{stem}-{QUANT_FORMATS[q]}.gguf")]
    kinds = [k for k in GGUF_FORMATS if k in formats or (k == "f16" and pending_q)]
    f16_made = False
    for k in kinds:
        p = out / f"{stem}-{GGUF_FORMATS[k]}.gguf"
        if exists(p):
            continue
        f16_made |= k == "f16"
        t0 = time.time()
        write_gguf(gguf, m, vocab, tmp(p), GGUF_FORMATS[k])
        os.replace(tmp(p), p)
        report(p, t0)

    if quants:
        quantize = args.quantize or llama / "build" / "bin" / "llama-quantize"
        if pending_q and not Path(quantize).is_file():
            raise SystemExit(f"no {quantize}: run scripts/build-llama-cpp.sh first")
        for q in pending_q:
            p = out / f"{stem}-{QUANT_FORMATS[q]}.gguf"
            t0 = time.time()
            r = subprocess.run([str(quantize), str(f16), str(tmp(p)), QUANT_FORMATS[q], str(args.threads)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                print(r.stdout[-4000:], file=sys.stderr)
                raise SystemExit(f"llama-quantize {QUANT_FORMATS[q]} failed ({r.returncode})")
            os.replace(tmp(p), p)
            report(p, t0)
        if "f16" not in formats and f16_made:
            f16.unlink()  # made only as the quantizer's input
            print(f"{f16}: removed (only the quantizer's input)", flush=True)

    cfg = hf_config(m, vocab)
    if "safetensors" in formats:
        d = out / f"{stem}-hf"
        if not exists(d / "model.safetensors"):
            t0 = time.time()
            d.mkdir(exist_ok=True)
            write_safetensors(m, tmp(d / "model.safetensors"))
            write_small(d, cfg, vocab, m.s["ctx"], tokenizer_config=True)
            os.replace(tmp(d / "model.safetensors"), d / "model.safetensors")
            report(d, t0)

    if "jax" in formats:
        d = out / f"{stem}-jax"
        if not exists(d / "params"):
            t0 = time.time()
            d.mkdir(exist_ok=True)
            write_jax(m, tmp(d / "params"), args.jax_layout)
            write_small(d, cfg, vocab, m.s["ctx"], tokenizer_config=False)
            if m.vision:
                write_vqgan(tmp(d / "vqgan"), m.seed)
                os.replace(tmp(d / "vqgan"), d / "vqgan")
            os.replace(tmp(d / "params"), d / "params")
            report(d, t0)
    return 0


def write_small(d: Path, cfg: dict, vocab: Vocab, ctx: int, tokenizer_config: bool) -> None:
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (d / "tokenizer.model").write_bytes(vocab.sentencepiece_model())
    if tokenizer_config:
        (d / "tokenizer_config.json").write_text(json.dumps(vocab.tokenizer_config(ctx), indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
