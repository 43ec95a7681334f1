#!/usr/bin/env python3
"""Write the small seed inputs of every fuzz target into fuzz/seeds/<target>/.

Everything is built here from the formats' definitions (no model weights): tiny GGUF,
safetensors and JAX msgpack models, a pickled nested dict of numpy arrays, tokenizer
files and OpenAI requests. Needs Python 3 and numpy (the pickle seed only)."""
import io
import json
import os
import pickle
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- GGUF
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, i) for i in items)
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}[t]
    return struct.pack(fmt, v)


def gguf(meta, tensors, align=32):
    """meta: [(key, type, value)]; tensors: [(name, dims, ggml_type, data bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, t, v in meta:
        out += gstr(k) + struct.pack("<I", t) + gval(t, v)
    off = 0
    blobs = b""
    for name, dims, gt, data in tensors:
        out += gstr(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", gt, off)
        pad = (-len(data)) % align
        blobs += data + b"\0" * pad
        off += len(data) + pad
    out += b"\0" * ((-len(out)) % align)
    return out + blobs


def f32s(n, x=0.5):
    return struct.pack("<%df" % n, *([x] * n))


V, H, FF = 8, 4, 8
tokens = ["<unk>", "<s>", "</s>", "\u2581Hello", "\u2581world", "l", "o", "<0x0A>"]
spm_meta = [
    ("tokenizer.ggml.model", STR, "llama"),
    ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
    ("tokenizer.ggml.scores", ARR, (F32, [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])),
    ("tokenizer.ggml.token_type", ARR, (I32, [2, 3, 3, 1, 1, 1, 1, 6])),
    ("tokenizer.ggml.bos_token_id", U32, 1),
    ("tokenizer.ggml.eos_token_id", U32, 2),
]
bpe_tokens = ["a", "b", "c", "\u0120", "ab", "<|endoftext|>"]
bpe_meta = [
    ("tokenizer.ggml.model", STR, "gpt2"),
    ("tokenizer.ggml.pre", STR, "gpt-2"),
    ("tokenizer.ggml.tokens", ARR, (STR, bpe_tokens)),
    ("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 1, 1, 1, 3])),
    ("tokenizer.ggml.merges", ARR, (STR, ["a b"])),
    ("tokenizer.ggml.eos_token_id", U32, 5),
]
llama_meta = [
    ("general.architecture", STR, "llama"),
    ("general.alignment", U32, 32),
    ("llama.embedding_length", U32, H),
    ("llama.feed_forward_length", U32, FF),
    ("llama.block_count", U32, 1),
    ("llama.attention.head_count", U32, 2),
    ("llama.attention.head_count_kv", U32, 1),
    ("llama.context_length", U32, 64),
    ("llama.rope.freq_base", F32, 10000.0),
    ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
    ("llama.rope.scaling.type", STR, "linear"),
    ("llama.rope.scaling.factor", F32, 2.0),
]
# GGUF dims are innermost first: a (rows, cols) matrix is written [cols, rows].
llama_tensors = [
    ("token_embd.weight", [H, V], 0, f32s(H * V)),
    ("output_norm.weight", [H], 0, f32s(H)),
    ("blk.0.attn_norm.weight", [H], 0, f32s(H)),
    ("blk.0.attn_q.weight", [H, H], 1, b"\0\x3c" * (H * H)),
    ("blk.0.attn_k.weight", [H, 2], 0, f32s(2 * H)),
    ("blk.0.attn_v.weight", [H, 2], 0, f32s(2 * H)),
    ("blk.0.attn_output.weight", [H, H], 0, f32s(H * H)),
    ("blk.0.ffn_norm.weight", [H], 0, f32s(H)),
    ("blk.0.ffn_gate.weight", [H, FF], 0, f32s(H * FF)),
    ("blk.0.ffn_up.weight", [H, FF], 0, f32s(H * FF)),
    ("blk.0.ffn_down.weight", [FF, H], 0, f32s(H * FF)),
]
# One Q8_0 block (32 values): f16 scale + 32 int8.
q8 = ("blk.0.q8.weight", [32], 8, b"\0\x3c" + bytes(range(32)))
put("gguf", "llama-spm", gguf(llama_meta + spm_meta, llama_tensors))
put("gguf", "llama-bpe-q8", gguf(llama_meta + bpe_meta, llama_tensors[:3] + [q8]))
put("gguf", "vocab-only", gguf(spm_meta, []))
put("tokenizer", "gguf-bpe", b"\x02" + gguf(bpe_meta, []))

# ----------------------------------------------------------------------------- safetensors
def safetensors(tensors):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


hf_config = json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
    "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": [2], "rope_scaling": {"rope_type": "linear", "factor": 2.0},
}).encode()
st = safetensors([
    ("model.embed_tokens.weight", "F32", [V, H], f32s(V * H)),
    ("model.norm.weight", "BF16", [H], b"\x80\x3f" * H),
    ("model.layers.0.self_attn.q_proj.weight", "F16", [H, H], b"\0\x3c" * (H * H)),
])
put("safetensors", "llama", struct.pack("<H", len(hf_config)) + hf_config + st)
put("safetensors", "no-config", struct.pack("<H", 0) + st)

# ----------------------------------------------------------------------------- JAX msgpack
def mp(v):
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        return b"\xcf" + struct.pack(">Q", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, bytes):
        return b"\xc6" + struct.pack(">I", len(v)) + v
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(mp(i) for i in v)
    if isinstance(v, tuple) and v[0] == "ext":
        return b"\xc7" + bytes([len(v[2])]) + struct.pack("b", v[1]) + v[2] if len(v[2]) < 256 \
            else b"\xc9" + struct.pack(">I", len(v[2])) + struct.pack("b", v[1]) + v[2]
    raise TypeError(v)


def jarr(shape, dtype="float32"):
    n = 1
    for s in shape:
        n *= s
    raw = f32s(n, 0.25) if dtype == "float32" else b"\x80\x3e" * n
    return mp(("ext", 1, mp([list(shape), dtype, raw])))


def jax(records, dtype="float32"):
    return b"".join(bytes([0x92]) + mp(list(p)) + mp(jarr(s, dtype)) for p, s in records)


L = 1
jax_records = [
    (["transformer", "wte", "embedding"], (V, H)),
    (["transformer", "ln_f", "kernel"], (H,)),
    (["lm_head", "kernel"], (H, V)),
] + [
    (["transformer", "h", "scan_decoder"] + p, (L,) + s)
    for p, s in [
        (["attention", "wq", "kernel"], (H, H)),
        (["attention", "wk", "kernel"], (H, H)),
        (["attention", "wv", "kernel"], (H, H)),
        (["attention", "wo", "kernel"], (H, H)),
        (["feed_forward", "w1", "kernel"], (H, FF)),
        (["feed_forward", "w2", "kernel"], (FF, H)),
        (["feed_forward", "w3", "kernel"], (H, FF)),
        (["attention_norm", "kernel"], (H,)),
        (["ffn_norm", "kernel"], (H,)),
    ]
]
jax_config = json.dumps({
    "model_type": "llama", "vocab_size": V, "hidden_size": H, "intermediate_size": FF,
    "num_hidden_layers": L, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
}).encode()
put("jax_msgpack", "scanned-f32", struct.pack("<H", len(jax_config)) + jax_config + jax(jax_records))
put("jax_msgpack", "scanned-bf16", struct.pack("<H", len(jax_config)) + jax_config + jax(jax_records, "bfloat16"))
put("jax_msgpack", "no-config", struct.pack("<H", 0) + jax(jax_records[:3]))

# ----------------------------------------------------------------------------- VQGAN pickle
try:
    import numpy as np

    tree = {
        "encoder": {"conv_in": {"kernel": np.ones((3, 3, 3, 4), np.float32), "bias": np.zeros(4, np.float32)}},
        "quantize": {"embeddings": np.arange(8, dtype=np.float32).reshape(2, 4)},
        "decoder": {"norm": {"scale": np.ones(4, np.float32)}, "big": np.zeros((2, 3), np.float32).T},
    }
    put("vqgan_pickle", "tree-p4", pickle.dumps(tree, protocol=4))
    put("vqgan_pickle", "tree-p2", pickle.dumps(tree, protocol=2))
except ImportError:
    print("numpy missing: no vqgan_pickle seeds", file=sys.stderr)

# ----------------------------------------------------------------------------- tokenizer
tok_json = json.dumps({
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 0, "content": "<s>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "vocab": {"<s>": 0, "H": 1, "e": 2, "l": 3, "o": 4, "\u0120": 5, "He": 6, "ll": 7},
              "merges": ["H e", "l l"]},
}).encode()
put("tokenizer", "hf-bpe", b"\x00" + tok_json)


def pb_varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_field(num, wire, payload):
    key = pb_varint((num << 3) | wire)
    if wire == 2:
        return key + pb_varint(len(payload)) + payload
    if wire == 5:
        return key + payload
    return key + pb_varint(payload)


def sp_piece(piece, score, typ):
    return pb_field(1, 2, piece.encode()) + pb_field(2, 5, struct.pack("<f", score)) + pb_field(3, 0, typ)


# ModelProto: pieces = 1, trainer_spec = 2 (model_type = 3: 1 unigram, 2 bpe; byte_fallback = 35),
# normalizer_spec = 3 (add_dummy_prefix = 3, remove_extra_whitespaces = 4).
pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("\u2581Hello", -1.0, 1),
          ("\u2581", -2.0, 1), ("H", -3.0, 1), ("e", -3.0, 1), ("l", -3.0, 1), ("o", -3.0, 1),
          ("<0x0A>", 0.0, 6)]
for model_type, name in [(1, "spm-unigram"), (2, "spm-bpe")]:
    proto = b"".join(pb_field(1, 2, sp_piece(*p)) for p in pieces)
    proto += pb_field(2, 2, pb_field(3, 0, model_type) + pb_field(35, 0, 1))
    proto += pb_field(3, 2, pb_field(3, 0, 1) + pb_field(4, 0, 1))
    put("tokenizer", name, b"\x01" + proto)

# ----------------------------------------------------------------------------- server requests
reqs = {
    "chat-basic": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}],
                   "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 1,
                   "stream": True, "stream_options": {"include_usage": True}},
    "chat-tools": {"messages": [{"role": "user", "content": "weather?"},
                                {"role": "assistant", "content": None, "tool_calls": [
                                    {"id": "c1", "type": "function",
                                     "function": {"name": "get", "arguments": "{\"city\":\"Oslo\"}"}}]},
                                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
                   "tools": [{"type": "function", "function": {"name": "get", "description": "d",
                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                             "required": ["city"]}}}],
                   "tool_choice": "auto", "logprobs": True, "top_logprobs": 2},
    "chat-schema": {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                        "type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}},
                    "logit_bias": {"5": -100, "7": 2.5}, "n": 2, "top_k": 40, "min_p": 0.05,
                    "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    "completion-text": {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 3, "echo": False,
                        "response_format": {"type": "json_object"}, "ignore_eos": True},
    "completion-ids": {"prompt": [1, 2, 3, 31999], "stop": "x", "n": 1},
}
for name, body in reqs.items():
    put("server_request", name, json.dumps(body).encode())
