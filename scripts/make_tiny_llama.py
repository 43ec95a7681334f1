#!/usr/bin/env python3
"""Build the tiny random LLaMA fixture and its llama.cpp reference logits.

Writes into the fixture directory (default crates/lwm/tests/fixtures/tiny-llama):

  hf/config.json, hf/model.safetensors   Hugging Face layout (rotate-half q/k rows), f32
  tiny-llama-f32.gguf                    same weights, llama.cpp layout (interleaved q/k rows)
  tiny-llama-f16.gguf, tiny-llama-q8_0.gguf   2-D weights stored as F16 / Q8_0 (norms stay F32)
  input_ids.json                         token ids fed to every model (no BOS)
  logits.npy                             llama.cpp logits of tiny-llama-f32.gguf, rope_theta 1e4
  logits_theta5e5.npy                    the same GGUF with rope_freq_base overridden to 5e5
  logits_f16.npy, logits_q8_0.npy        llama.cpp logits of the F16 / Q8_0 GGUFs
  README.md                              how it was made, versions, measured differences

Every logits file is float32 with shape (n_tokens, vocab) and holds the logits of every position.

The q/k permutation follows the layout convention llama.cpp's HF converter uses for LLaMA:
rows of each head are reordered from "rotate-half" pairing (i, i + D/2) to the interleaved
pairing (2i, 2i + 1). The script cross-checks llama.cpp against an independent float64 numpy
forward pass of the HF weights (rotate-half RoPE, GQA, SwiGLU, RMSNorm); a wrong permutation
would show up as a large difference.

Needs: numpy, safetensors, gguf, llama-cpp-python.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

SEED = 20240613
N_TOKENS = 48

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

INIT_STD = 0.2


def make_weights(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Canonical HF tensors, [out, in] orientation, float32."""
    h = cfg["hidden_size"]
    f = cfg["intermediate_size"]
    v = cfg["vocab_size"]
    hd = cfg["head_dim"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]

    def dense(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * INIT_STD).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": dense(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = dense(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = dense(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = dense(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = dense(h, nh * hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = dense(f, h)
        w[p + "mlp.up_proj.weight"] = dense(f, h)
        w[p + "mlp.down_proj.weight"] = dense(h, f)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = dense(v, h)
    return w


# ---------------------------------------------------------------- numpy reference forward


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int], theta: float) -> np.ndarray:
    """float64 forward of the HF weights: returns (T, vocab) logits."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    t = len(ids)
    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)  # (T, hd)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hN = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (hN @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd)
        k = (hN @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd)
        v = (hN @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k = np.repeat(k, rep, axis=1)  # head j uses kv head j // rep
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        hN = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = hN @ w[p + "mlp.gate_proj.weight"].T
        u = hN @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


# ---------------------------------------------------------------- GGUF (llama.cpp layout)


def hf_to_interleaved_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF rotate-half order to llama.cpp interleaved order.

    Within one head HF keeps the rotation pairs at rows (i, i + D/2); llama.cpp expects them at
    rows (2i, 2i + 1). View the rows as (head, half, i) and emit them as (head, i, half).
    """
    out_dim = weight.shape[0]
    hd = out_dim // n_heads
    r = weight.reshape(n_heads, 2, hd // 2, *weight.shape[1:])
    return np.ascontiguousarray(np.swapaxes(r, 1, 2).reshape(weight.shape))


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}


def gguf_tensors(w: dict[str, np.ndarray], cfg: dict, permute: bool = True) -> list[tuple[str, np.ndarray]]:
    out = [("token_embd.weight", w["model.embed_tokens.weight"])]
    for i in range(cfg["num_hidden_layers"]):
        for suffix, short in GGUF_NAMES.items():
            t = w[f"model.layers.{i}.{suffix}"]
            if not permute:
                pass
            elif short == "attn_q":
                t = hf_to_interleaved_rows(t, cfg["num_attention_heads"])
            elif short == "attn_k":
                t = hf_to_interleaved_rows(t, cfg["num_key_value_heads"])
            out.append((f"blk.{i}.{short}.weight", t))
    out.append(("output_norm.weight", w["model.norm.weight"]))
    out.append(("output.weight", w["lm_head.weight"]))
    return out


def write_gguf(path: Path, w: dict[str, np.ndarray], cfg: dict, qtype: str, permute: bool = True) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_name(f"tiny-llama-{qtype.lower()}")
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])
    wr.add_rope_dimension_count(cfg["head_dim"])
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_vocab_size(cfg["vocab_size"])
    wr.add_file_type(int(file_type))
    # No tokenizer: llama.cpp accepts "no_vocab" and then sizes the vocab from llama.vocab_size.
    wr.add_tokenizer_model("no_vocab")
    for name, t in gguf_tensors(w, cfg, permute):
        if t.ndim == 1 or qtype == "F32":
            wr.add_tensor(name, t.astype(np.float32))
        elif qtype == "F16":
            wr.add_tensor(name, t.astype(np.float16))
        else:
            q = gguf.quants.quantize(t.astype(np.float32), Q.Q8_0)
            wr.add_tensor(name, q, raw_dtype=Q.Q8_0)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def stored_weights(w: dict[str, np.ndarray], qtype: str) -> dict[str, np.ndarray]:
    """The weights as a GGUF of `qtype` stores them (2-D tensors rounded/quantized), as f32."""
    import gguf

    out = {}
    for k, v in w.items():
        if v.ndim == 1 or qtype == "F32":
            out[k] = v
        elif qtype == "F16":
            out[k] = v.astype(np.float16).astype(np.float32)
        else:
            Q = gguf.GGMLQuantizationType.Q8_0
            out[k] = gguf.quants.dequantize(gguf.quants.quantize(v, Q), Q).reshape(v.shape)
    return out


# ---------------------------------------------------------------- llama.cpp


def llamacpp_logits(path: Path, ids: list[int], rope_freq_base: float = 0.0) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        n_ubatch=64,
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        rope_freq_base=rope_freq_base,
        type_k=0,  # GGML_TYPE_F32: keep the KV cache in f32 (default F16 would add ~1e-3 error)
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    assert llm.n_vocab() == CONFIG["vocab_size"], llm.n_vocab()
    llm.reset()
    llm.eval(ids)
    assert llm.n_tokens == len(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)
    # Also read llama.cpp's own per-position logits buffer to prove every row is real.
    for pos in (0, len(ids) // 2, len(ids) - 1):
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(pos), shape=(llm.n_vocab(),))
        assert np.array_equal(row, logits[pos]), pos
    llm.close()
    return logits


def llamacpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def ggml_version() -> str:
    """ggml's shared-library version as built by llama-cpp-python (e.g. 0.25.3)."""
    import llama_cpp

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so.*.*.*"))
    return libs[-1].name.removeprefix("libggml-base.so.") if libs else "unknown"


def llamacpp_system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info).strip()


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=repo / "crates/lwm/tests/fixtures/tiny-llama")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiny-llama-gguf"),
                    help="scratch dir for GGUF files (copied into --out when < 1 MB)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    rng = np.random.default_rng(SEED)
    w = make_weights(CONFIG, rng)
    ids = [int(i) for i in rng.integers(0, CONFIG["vocab_size"], N_TOKENS)]

    out: Path = args.out
    hf_dir = out / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})
    os.chmod(hf_dir / "model.safetensors", 0o644)
    (out / "input_ids.json").write_text(json.dumps(ids) + "\n")

    ref = {theta: reference_forward(w, CONFIG, ids, theta) for theta in (1e4, 5e5)}

    results = []  # (file, gguf, theta, max|llama.cpp - numpy|, max|logit|)
    for qtype, logits_name in (("F32", "logits.npy"), ("F16", "logits_f16.npy"), ("Q8_0", "logits_q8_0.npy")):
        gpath = args.work / f"tiny-llama-{qtype.lower()}.gguf"
        write_gguf(gpath, w, CONFIG, qtype)
        runs = [(logits_name, 0.0, 1e4)]
        if qtype == "F32":
            runs.append(("logits_theta5e5.npy", 5e5, 5e5))
        for name, override, theta in runs:
            lg = llamacpp_logits(gpath, ids, override)
            assert lg.shape == (N_TOKENS, CONFIG["vocab_size"]) and np.isfinite(lg).all()
            np.save(out / name, lg)
            diff = float(np.max(np.abs(lg.astype(np.float64) - ref[theta])))
            # Same comparison against the numpy forward of the weights as stored in this GGUF.
            ref_q = ref[theta] if qtype == "F32" else reference_forward(stored_weights(w, qtype), CONFIG, ids, theta)
            diff_q = float(np.max(np.abs(lg.astype(np.float64) - ref_q)))
            results.append((name, gpath.name, theta, diff, diff_q, float(np.max(np.abs(ref[theta])))))
            print(f"{name:22s} {gpath.name:22s} theta={theta:g}: max|llama.cpp - numpy f64| = {diff:.3e}"
                  f" (vs numpy of the stored weights: {diff_q:.3e})")
        size = gpath.stat().st_size
        if size < 1 << 20:
            shutil.copyfile(gpath, out / gpath.name)
        else:
            print(f"not copying {gpath.name}: {size} bytes")

    # The theta variants must really differ, else the theta test proves nothing.
    d_theta = float(np.max(np.abs(np.load(out / "logits.npy") - np.load(out / "logits_theta5e5.npy"))))
    print(f"max |logits(theta 1e4) - logits(theta 5e5)| = {d_theta:.3f}")

    # Negative control: the same GGUF without the q/k permutation must disagree.
    bad = args.work / "tiny-llama-f32-unpermuted.gguf"
    write_gguf(bad, w, CONFIG, "F32", permute=False)
    lg = llamacpp_logits(bad, ids)
    d_unperm = float(np.max(np.abs(lg.astype(np.float64) - ref[1e4])))
    d_unperm_row0 = float(np.max(np.abs(lg[0].astype(np.float64) - ref[1e4][0])))
    print(f"without the q/k permutation: max diff {d_unperm:.3f} (position 0: {d_unperm_row0:.1e})")
    assert d_unperm > 100 * args.tol, "the permutation check is not sensitive"

    f32_diffs = [r[3] for r in results if r[1].endswith("f32.gguf")]
    ok = max(f32_diffs) <= args.tol
    write_readme(out, ids, results, d_theta, d_unperm, d_unperm_row0)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixture size: {total} bytes")
    if not ok:
        print(f"FAIL: F32 llama.cpp logits differ from the numpy reference by more than {args.tol}")
        return 1
    return 0


def write_readme(out: Path, ids: list[int], results, d_theta: float, d_unperm: float, d_unperm_row0: float) -> None:
    from importlib.metadata import version

    gguf_version, st_version = version("gguf"), version("safetensors")

    rows = "\n".join(
        f"| `{name}` | `{g}` | {theta:g} | {diff:.2e} | {dq:.2e} | {mx:.2f} |"
        for name, g, theta, diff, dq, mx in results
    )
    text = f"""# tiny-llama fixture

A tiny random LLaMA (seeded numpy, seed {SEED}) with reference logits computed by **llama.cpp**
(through llama-cpp-python {llamacpp_version()}, which vendors llama.cpp and builds it from source;
ggml {ggml_version()}), not by this project. Regenerate with:

    pip install llama-cpp-python==0.3.36 numpy safetensors gguf
    python3 scripts/make_tiny_llama.py

Built on {platform.machine()} with Python {platform.python_version()}, numpy {np.__version__},
gguf {gguf_version}, safetensors {st_version}; llama-cpp-python was installed with
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36`. llama.cpp system info:
`{llamacpp_system_info()}`.

## Model

vocab 256, hidden 64, intermediate 160, 2 layers, 4 heads, 2 KV heads (GQA), head_dim 16,
rms_norm_eps 1e-5, rope_theta 1e4, max_position_embeddings 512, untied `lm_head`, SiLU.
Dense weights ~ N(0, {INIT_STD}²); norm weights 1 + 0.1·N(0, 1).

## Files

* `hf/config.json`, `hf/model.safetensors`: Hugging Face `LlamaForCausalLM` layout, f32,
  q/k rows in HF rotate-half order.
* `tiny-llama-f32.gguf`: the same weights for llama.cpp (arch `llama`, names `token_embd`,
  `blk.N.attn_q`, ..., `output`), q/k rows permuted to llama.cpp's interleaved pair order
  (rows of each head viewed as (2, D/2) and transposed to (D/2, 2)), `tokenizer.ggml.model =
  "no_vocab"`, `llama.vocab_size = 256`.
* `tiny-llama-f16.gguf`, `tiny-llama-q8_0.gguf`: the same with every 2-D tensor stored as F16 /
  Q8_0 (quantized by the `gguf` Python package); norm weights stay F32.
* `input_ids.json`: {len(ids)} token ids (seeded uniform over the vocab, no BOS), fed at
  positions 0..{len(ids) - 1} in one batch.
* `logits*.npy`: float32, shape ({len(ids)}, 256), the logits of **every** position.
  * `logits.npy`: `tiny-llama-f32.gguf` as written (rope_theta 1e4).
  * `logits_theta5e5.npy`: the same file run with `rope_freq_base = 5e5` (llama.cpp's override);
    the HF directory with `config.theta = 5e5` must reproduce it.
  * `logits_f16.npy`, `logits_q8_0.npy`: the F16 and Q8_0 GGUFs (llama.cpp also rounds/quantizes
    the activations fed to those matmuls, so compare these with a looser tolerance).

llama.cpp ran with `Llama(n_ctx=64, n_batch=64, n_threads=2, logits_all=True, type_k=F32,
type_v=F32, flash_attn=False)`, `reset()`, then one `eval(input_ids)`; the rows were read from
`scores` and spot-checked against `llama_get_logits_ith`.

## Cross-check against an independent numpy forward pass

`make_tiny_llama.py` also runs its own float64 numpy forward of the HF weights (rotate-half RoPE,
GQA, SwiGLU, RMSNorm). Max absolute difference to llama.cpp's logits, against the numpy forward
of the original f32 weights and against the numpy forward of the weights as the GGUF stores them
(f16-rounded / Q8_0-dequantized; what remains there comes from llama.cpp also converting the
activations to f16 / Q8_0 inside those matmuls):

| logits | GGUF | theta | max abs diff vs numpy (f32 weights) | vs numpy (stored weights) | max abs logit |
| --- | --- | --- | --- | --- | --- |
{rows}

The F32 rows agreeing to ~1e-5 shows that the q/k permutation and the GGUF metadata are right.
As a negative control the script also runs llama.cpp on an F32 GGUF written *without* the q/k
permutation: its logits differ by {d_unperm:.2f} (position 0, where RoPE is the identity, still
matches to {d_unperm_row0:.0e}).
Changing theta from 1e4 to 5e5 moves the logits by up to {d_theta:.2f}, so a test that ignores
theta fails.

## Using it from Rust

`candle_core::Tensor::read_npy(path)` reads the logits files (f32, shape (48, 256)); the ids are a
plain JSON array of u32. Run the whole sequence from position 0 (no BOS) and compare every row:

* `hf/` (rotate-half, f32) vs `logits.npy`: max abs diff <= 1e-4.
* `hf/` with `ModelConfig.theta = 5e5` vs `logits_theta5e5.npy`: <= 1e-4.
* `tiny-llama-f32.gguf` (interleaved q/k) vs `logits.npy`: <= 1e-4.
* `tiny-llama-f16.gguf` / `tiny-llama-q8_0.gguf`: how close an engine comes depends on whether
  it converts activations the way llama.cpp does; the table above bounds the gap for one that
  dequantizes the weights and keeps f32 activations (about 0.012 / 0.25).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
