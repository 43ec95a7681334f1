//! `lwm convert`: LWM JAX checkpoints <-> Hugging Face safetensors.
//!
//! JAX -> HF follows tux's `jax2hf.py`: every Dense kernel is transposed from flax's
//! `(in, out)` to PyTorch's `[out, in]`, scanned layers are unstacked, and the q/k rows are
//! permuted from interleaved RoPE pairs to rotate-half (within each head: the even rows, then
//! the odd rows). Values keep their dtype (f32/bf16), so no rounding happens. The vision
//! model's `vte` and `vision_head` are written under `model.vision_embed_tokens.weight` and
//! `vision_head.weight`; the JAX layer layout is recorded in the safetensors metadata.
//!
//! HF -> JAX inverts every step and writes tux's streaming format exactly as tux/flax do
//! (records in sorted key order, msgpack's smallest encodings, flax's chunking of arrays over
//! 1 GiB), so JAX -> HF -> JAX reproduces the original file byte for byte.

use crate::config::{ModelConfig, RopeLayout};
use crate::weights::jax::{
    dtype_name, jax_path_of, JaxLayout, JaxWeights, LAYER_PARAMS, MAX_CHUNK_BYTES, TOP_PARAMS,
    VISION_EMBED, VISION_HEAD,
};
use crate::weights::layer_name;
use crate::weights::msgpack::Writer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Metadata key recording the JAX layer layout in converted safetensors.
const LAYOUT_KEY: &str = "lwm_jax_layout";

/// A tensor as raw little-endian bytes.
#[derive(Clone)]
struct Raw {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> StDtype {
        match self.dtype {
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
            _ => StDtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn tensor_raw(t: &Tensor) -> Result<Raw> {
    let flat = t.flatten_all()?;
    let bytes = match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        d => bail!("cannot convert a {d:?} tensor"),
    };
    Ok(Raw {
        dtype: t.dtype(),
        shape: t.dims().to_vec(),
        bytes,
    })
}

/// Transpose a row-major `rows × cols` matrix of `esize`-byte elements.
fn transpose(bytes: &[u8], rows: usize, cols: usize, esize: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * esize;
            let dst = (c * rows + r) * esize;
            out[dst..dst + esize].copy_from_slice(&bytes[src..src + esize]);
        }
    }
    out
}

/// Reorder the rows of a q/k projection `[heads·D, in]` between RoPE layouts. Interleaved ->
/// rotate-half moves row 2i of each head to i and row 2i+1 to D/2+i; `inverse` undoes it.
fn permute_rope_rows(bytes: &[u8], rows: usize, head_dim: usize, inverse: bool) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for head in 0..rows / head_dim {
        for i in 0..half {
            for (interleaved, rotate_half) in [(2 * i, i), (2 * i + 1, half + i)] {
                let (src, dst) = if inverse {
                    (rotate_half, interleaved)
                } else {
                    (interleaved, rotate_half)
                };
                let s = (head * head_dim + src) * row_bytes;
                let d = (head * head_dim + dst) * row_bytes;
                out[d..d + row_bytes].copy_from_slice(&bytes[s..s + row_bytes]);
            }
        }
    }
    out
}

fn is_rope_projection(name: &str) -> bool {
    name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight")
}

/// HF `config.json` for `config` (what `ModelConfig::from_hf_json` reads back).
pub fn hf_config_json(config: &ModelConfig, dtype: DType) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.theta,
        "rope_scaling": null,
        "max_position_embeddings": config.max_sequence_length,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": 0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
    });
    if config.vision_vocab_size > 0 {
        v["lwm_vision_vocab_size"] = config.vision_vocab_size.into();
    }
    v
}

/// JAX checkpoint `params` -> `out_dir/model.safetensors` + `out_dir/config.json`.
pub fn jax_to_hf(params: &Path, config: &ModelConfig, out_dir: &Path) -> Result<()> {
    if config.rope_layout != RopeLayout::Interleaved {
        bail!("a JAX checkpoint's config must use the interleaved RoPE layout");
    }
    let weights = JaxWeights::open(params, config)?;
    let mut tensors: BTreeMap<String, Raw> = BTreeMap::new();
    let names = crate::weights::WeightSource::names(&weights);
    for name in names {
        let mut raw = tensor_raw(&weights.take(&name)?)?;
        if is_rope_projection(&name) {
            raw.bytes = permute_rope_rows(&raw.bytes, raw.shape[0], config.head_dim, false);
        }
        tensors.insert(name, raw);
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let layout = match weights.layout {
        JaxLayout::Scanned => "scanned",
        JaxLayout::Unscanned => "unscanned",
    };
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (LAYOUT_KEY.to_string(), layout.to_string()),
    ]);
    let st = out_dir.join("model.safetensors");
    let tmp = out_dir.join(".model.safetensors.partial");
    safetensors::tensor::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| anyhow!("writing {}: {e}", st.display()))?;
    std::fs::rename(&tmp, &st)?;
    let cfg = serde_json::to_string_pretty(&hf_config_json(config, weights.dtype))?;
    std::fs::write(out_dir.join("config.json"), cfg + "\n")?;
    Ok(())
}

/// Pieces of one encoded value: small headers built in memory, array data borrowed.
enum Piece<'a> {
    Head(Vec<u8>),
    Data(&'a [u8]),
}

fn pieces_len(p: &[Piece]) -> usize {
    p.iter()
        .map(|x| match x {
            Piece::Head(h) => h.len(),
            Piece::Data(d) => d.len(),
        })
        .sum()
}

/// `msgpack.packb((shape, dtype_name, raw))` wrapped in ExtType 1, as flax's `_ndarray_to_bytes`.
fn ext_array<'a>(shape: &[usize], dtype: DType, raw: &'a [u8]) -> Result<Vec<Piece<'a>>> {
    let mut inner = Writer::new(Vec::new());
    inner.array(3)?;
    inner.array(shape.len())?;
    for &d in shape {
        inner.uint(d as u64)?;
    }
    inner.str(dtype_name(dtype))?;
    inner.bin_header(raw.len())?;
    let mut head = Writer::new(Vec::new());
    head.ext_header(1, inner.inner.len() + raw.len())?;
    head.inner.extend(inner.inner);
    Ok(vec![Piece::Head(head.inner), Piece::Data(raw)])
}

/// `flax.serialization.to_bytes(array)`: the Ext form, or the chunked map for arrays over
/// `chunk_bytes` (flax's `MAX_CHUNK_SIZE`).
fn flax_to_bytes<'a>(
    shape: &[usize],
    dtype: DType,
    raw: &'a [u8],
    chunk_bytes: usize,
) -> Result<Vec<Piece<'a>>> {
    if raw.len() <= chunk_bytes {
        return ext_array(shape, dtype, raw);
    }
    let esize = dtype.size_in_bytes();
    let chunk_elems = (chunk_bytes / esize).max(1);
    let mut w = Writer::new(Vec::new());
    w.map(3)?;
    w.str("__msgpack_chunked_array__")?;
    w.bool(true)?;
    w.str("shape")?;
    w.map(shape.len())?;
    for (i, &d) in shape.iter().enumerate() {
        w.str(&i.to_string())?;
        w.uint(d as u64)?;
    }
    w.str("chunks")?;
    let chunks: Vec<&[u8]> = raw.chunks(chunk_elems * esize).collect();
    w.map(chunks.len())?;
    let mut out = vec![Piece::Head(w.inner)];
    for (i, c) in chunks.into_iter().enumerate() {
        let mut k = Writer::new(Vec::new());
        k.str(&i.to_string())?;
        out.push(Piece::Head(k.inner));
        out.extend(ext_array(&[c.len() / esize], dtype, c)?);
    }
    Ok(out)
}

/// Write one tux record `[key_path, bin(value)]`.
fn write_record(out: &mut impl Write, key: &[String], value: &[Piece]) -> Result<()> {
    let mut w = Writer::new(Vec::new());
    w.array(2)?;
    w.array(key.len())?;
    for k in key {
        w.str(k)?;
    }
    w.bin_header(pieces_len(value))?;
    out.write_all(&w.inner)?;
    for p in value {
        match p {
            Piece::Head(h) => out.write_all(h)?,
            Piece::Data(d) => out.write_all(d)?,
        }
    }
    Ok(())
}

/// `dir/model.safetensors` (HF layout, as written by `jax_to_hf` or any LLaMA HF export) ->
/// a tux streaming checkpoint at `out`. `layout` defaults to the one recorded in the file,
/// else scanned (what LWM's scripts load). `chunk_bytes` is flax's chunking limit (1 GiB).
pub fn hf_to_jax(
    dir: &Path,
    out: &Path,
    layout: Option<JaxLayout>,
    chunk_bytes: usize,
) -> Result<()> {
    let config = crate::weights::hf::load_hf_config(dir)?;
    let st_path = dir.join("model.safetensors");
    let file = std::fs::File::open(&st_path)
        .with_context(|| format!("cannot open {}", st_path.display()))?;
    // SAFETY: read-only map of a file we do not modify; safetensors validates the header
    // against the length before any tensor is touched.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let st = SafeTensors::deserialize(&map).map_err(|e| anyhow!("{}: {e}", st_path.display()))?;
    let (_, meta) =
        SafeTensors::read_metadata(&map).map_err(|e| anyhow!("{}: {e}", st_path.display()))?;
    let layout = layout.unwrap_or_else(|| {
        match meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(LAYOUT_KEY))
            .map(String::as_str)
        {
            Some("unscanned") => JaxLayout::Unscanned,
            _ => JaxLayout::Scanned,
        }
    });
    let get = |name: &str| -> Result<Raw> {
        let t = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: no tensor '{name}'", st_path.display()))?;
        let dtype = match t.dtype() {
            StDtype::F32 => DType::F32,
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            d => bail!(
                "{}: tensor '{name}' has dtype {d:?} (f32/bf16/f16 only)",
                st_path.display()
            ),
        };
        Ok(Raw {
            dtype,
            shape: t.shape().to_vec(),
            bytes: t.data().to_vec(),
        })
    };
    // HF [out, in] (rotate-half q/k) -> JAX orientation (interleaved q/k).
    let to_jax = |name: &str, transposed: bool| -> Result<Raw> {
        let mut r = get(name)?;
        if is_rope_projection(name) {
            r.bytes = permute_rope_rows(&r.bytes, r.shape[0], config.head_dim, true);
        }
        if transposed {
            let (rows, cols) = (r.shape[0], r.shape[1]);
            r.bytes = transpose(&r.bytes, rows, cols, r.dtype.size_in_bytes());
            r.shape = vec![cols, rows];
        }
        Ok(r)
    };
    // Every JAX record: key path -> (canonical names stacked in it, transposed).
    let mut records: BTreeMap<Vec<String>, (Vec<String>, bool)> = BTreeMap::new();
    for (_, name, transposed) in TOP_PARAMS {
        if (*name == VISION_EMBED || *name == VISION_HEAD) && st.tensor(name).is_err() {
            continue;
        }
        records.insert(
            jax_path_of(name, layout),
            (vec![name.to_string()], *transposed),
        );
    }
    for (_, suffix, transposed) in LAYER_PARAMS {
        let names: Vec<String> = (0..config.num_hidden_layers)
            .map(|i| layer_name(i, suffix))
            .collect();
        match layout {
            JaxLayout::Scanned => {
                records.insert(jax_path_of(&names[0], layout), (names, *transposed));
            }
            JaxLayout::Unscanned => {
                for n in names {
                    records.insert(jax_path_of(&n, layout), (vec![n], *transposed));
                }
            }
        }
    }
    let tmp = out.with_extension("partial");
    let mut w = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let result = (|| -> Result<()> {
        for (key, (names, transposed)) in &records {
            let parts: Vec<Raw> = names
                .iter()
                .map(|n| to_jax(n, *transposed))
                .collect::<Result<_>>()?;
            let dtype = parts[0].dtype;
            let mut shape = parts[0].shape.clone();
            let raw: Vec<u8> = if layout == JaxLayout::Scanned && key[1] == "h" {
                shape.insert(0, parts.len());
                parts.iter().flat_map(|p| p.bytes.iter().copied()).collect()
            } else {
                parts
                    .into_iter()
                    .next()
                    .map(|p| p.bytes)
                    .unwrap_or_default()
            };
            write_record(
                &mut w,
                key,
                &flax_to_bytes(&shape, dtype, &raw, chunk_bytes)?,
            )?;
        }
        w.flush()?;
        Ok(())
    })();
    drop(w);
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, out)?;
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Default chunking limit for `hf_to_jax` (flax's).
pub const DEFAULT_CHUNK_BYTES: usize = MAX_CHUNK_BYTES;
