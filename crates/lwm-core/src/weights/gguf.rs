//! GGUF model files: metadata -> `ModelConfig`, tensor names -> canonical HF names.
//!
//! The whole tensor table is checked against the file length when the file is opened, so a
//! truncated download fails at once with the tensor and byte counts, not halfway through a
//! forward pass.

use super::{Weight, WeightSource};
use crate::config::{ModelConfig, RopeLayout, RopeScaling};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Tensors are read through the file, not a mapping: every tensor is copied into the
    /// engine's own buffers anyway, and mapped pages would count in the process's peak
    /// RSS on top of those copies (≈ the file size) until the file is dropped.
    file: std::sync::Mutex<std::fs::File>,
    file_len: u64,
    /// canonical HF name -> GGUF tensor name
    names: HashMap<String, String>,
}

/// GGUF tensor name -> canonical Hugging Face LLaMA name.
pub fn canonical_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Quantization types the engine runs (checked when a file is opened).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// The metadata and tensor table of a GGUF file (the one place they are parsed; a
/// tokenizer taken from a `.gguf` reads them here too, without the tensor checks).
pub fn read_content(path: &Path) -> Result<(Content, std::fs::File, u64)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open model file {}", path.display()))?;
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot stat model file {}", path.display()))?
        .len();
    let mut reader = std::io::BufReader::new(&file);
    // candle's reader divides by `general.alignment` without checking it: a 0 there would
    // panic inside candle, so the metadata is walked once first to find it.
    if general_alignment(&mut reader, file_len) == Some(0) {
        bail!(
            "{}: not a readable GGUF file: general.alignment is 0 (it must be a positive power of two)",
            path.display()
        );
    }
    reader
        .seek(std::io::SeekFrom::Start(0))
        .with_context(|| format!("cannot read model file {}", path.display()))?;
    let content = Content::read(&mut reader)
        .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
    Ok((content, file, file_len))
}

/// The integer value of `general.alignment` in a GGUF header (its last occurrence, as
/// candle reads it), found by skipping over the metadata without keeping it; None where
/// the key is absent or not an integer, or the header is malformed (candle's reader then
/// names the problem).
fn general_alignment(r: &mut impl Read, file_len: u64) -> Option<u64> {
    fn u32_(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip(r: &mut impl Read, n: u64) -> Option<()> {
        (std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()? == n).then_some(())
    }
    // Skip one value of type `t`; returns its integer value for the integer types.
    fn value(r: &mut impl Read, t: u32, v1: bool, depth: usize) -> Option<Option<u64>> {
        let len = |r: &mut dyn Read| -> Option<u64> {
            let mut r = r;
            if v1 {
                u32_(&mut r).map(u64::from)
            } else {
                u64_(&mut r)
            }
        };
        let fixed = |n: u64, r: &mut dyn Read| -> Option<Option<u64>> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b[..n as usize]).ok()?;
            Some(Some(u64::from_le_bytes(b)))
        };
        match t {
            0 | 1 | 7 => fixed(1, r),
            2 | 3 => fixed(2, r),
            4 | 5 => fixed(4, r),
            10 | 11 => fixed(8, r),
            6 => skip(r, 4).map(|_| None),
            12 => skip(r, 8).map(|_| None),
            8 => {
                let n = len(r)?;
                skip(r, n).map(|_| None)
            }
            9 if depth < 64 => {
                let et = u32_(r)?;
                let n = len(r)?;
                for _ in 0..n {
                    value(r, et, v1, depth + 1)?;
                }
                Some(None)
            }
            _ => None,
        }
    }
    let mut r = r.take(file_len);
    if u32_(&mut r)? != 0x4655_4747 {
        return None;
    }
    let v1 = u32_(&mut r)? == 1;
    let count = |r: &mut std::io::Take<&mut _>| if v1 { u32_(r).map(u64::from) } else { u64_(r) };
    let _tensors = count(&mut r)?;
    let kvs = count(&mut r)?;
    // candle keeps the metadata in a map, so of a key given twice the last one counts.
    let mut alignment = None;
    for _ in 0..kvs {
        let n = count(&mut r)?;
        let mut key = Vec::new();
        (&mut r).take(n).read_to_end(&mut key).ok()?;
        if key.len() as u64 != n {
            return None;
        }
        let t = u32_(&mut r)?;
        let v = value(&mut r, t, v1, 0)?;
        // candle drops a key's trailing NULs ("general.alignment\0\0\0" is the key too;
        // found by the gguf fuzzer).
        while key.last() == Some(&0) {
            key.pop();
        }
        if key == b"general.alignment" {
            // candle reads 8-bit to 32-bit integers (signed ones when not negative) here.
            alignment = match t {
                0..=5 => v,
                _ => None,
            };
        }
    }
    alignment
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let (content, file, file_len) = read_content(path)?;
        let mut names = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            if !SUPPORTED_TYPES.contains(&dtype) {
                bail!(
                    "{}: tensor '{name}' has quantization {dtype:?}, which lwm does not support",
                    path.display()
                );
            }
            let dims = info.shape.dims();
            let Some(elems) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
                bail!(
                    "{}: tensor '{name}' has shape {dims:?}, whose element count overflows",
                    path.display()
                );
            };
            // candle views a tensor's bytes as a slice of its blocks; an empty buffer has
            // no aligned address, which trips the slice's precondition (undefined behaviour).
            if elems == 0 {
                bail!(
                    "{}: tensor '{name}' has shape {dims:?}, which holds no elements",
                    path.display()
                );
            }
            if !elems.is_multiple_of(dtype.block_size()) {
                bail!("{}: tensor '{name}' has {elems} elements, not a multiple of the {dtype:?} block size", path.display());
            }
            let bytes = (elems / dtype.block_size()).checked_mul(dtype.type_size());
            let start = content.tensor_data_offset.checked_add(info.offset);
            let end = match (start, bytes) {
                (Some(s), Some(b)) => s.checked_add(b as u64),
                _ => None,
            };
            match (start, end) {
                (Some(start), Some(end)) if end > file_len => bail!(
                    "{}: file is truncated or corrupt: tensor '{name}' needs bytes {start}..{end} but the file has {file_len} bytes",
                    path.display()
                ),
                (_, None) => bail!(
                    "{}: file is corrupt: tensor '{name}' ({elems} elements of {dtype:?} at offset {} of the data section) ends past any possible file size",
                    path.display(),
                    info.offset
                ),
                _ => {}
            }
            if let Some(c) = canonical_name(name) {
                names.insert(c, name.clone());
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: std::sync::Mutex::new(file),
            file_len,
            names,
        })
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(|v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => other
                .to_u64()
                .ok()
                .map(|x| x as f64)
                .or_else(|| other.to_u32().ok().map(|x| x as f64)),
        })
    }

    fn meta_usize(&self, key: &str) -> Option<usize> {
        self.meta(key).and_then(|v| match v {
            Value::U8(x) => Some(*x as usize),
            Value::U16(x) => Some(*x as usize),
            Value::U32(x) => Some(*x as usize),
            Value::U64(x) => Some(*x as usize),
            Value::I32(x) if *x >= 0 => Some(*x as usize),
            Value::I64(x) if *x >= 0 => Some(*x as usize),
            _ => None,
        })
    }

    /// Build the model config from `general.architecture` and `{arch}.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let p = self.path.display();
        let arch = self.meta_str("general.architecture").unwrap_or_default();
        if arch != "llama" {
            bail!(
                "{p}: architecture '{arch}' is not supported (lwm runs LLaMA-architecture models)"
            );
        }
        let need = |k: &str| -> Result<usize> {
            self.meta_usize(&format!("{arch}.{k}"))
                .with_context(|| format!("{p}: metadata key '{arch}.{k}' is missing"))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = self
            .meta_usize(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(heads);
        let head_dim = self
            .meta_usize(&format!("{arch}.attention.key_length"))
            .or_else(|| self.meta_usize(&format!("{arch}.rope.dimension_count")))
            .unwrap_or(hidden / heads.max(1));
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .with_context(|| format!("{p}: tensor 'token_embd.weight' is missing"))?;
        let vocab = self
            .meta_usize(&format!("{arch}.vocab_size"))
            .or(embd.shape.dims().first().copied())
            .with_context(|| format!("{p}: tensor 'token_embd.weight' has no dimensions"))?;
        let rope_scaling = match self
            .meta_str(&format!("{arch}.rope.scaling.type"))
            .as_deref()
        {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self
                    .meta_f64(&format!("{arch}.rope.scaling.factor"))
                    .unwrap_or(1.0),
            },
            Some("yarn") => {
                let key = |k: &str| self.meta_f64(&format!("{arch}.rope.scaling.{k}"));
                RopeScaling::Yarn {
                    factor: key("factor").unwrap_or(1.0),
                    original_max_position: self
                        .meta_usize(&format!("{arch}.rope.scaling.original_context_length"))
                        .or_else(|| self.meta_usize(&format!("{arch}.context_length")))
                        .unwrap_or(2048),
                    beta_fast: key("yarn_beta_fast").unwrap_or(32.0),
                    beta_slow: key("yarn_beta_slow").unwrap_or(1.0),
                    attention_factor: key("attn_factor").filter(|&a| a > 0.0),
                }
            }
            Some(other) => {
                bail!("{p}: RoPE scaling '{other}' is not supported (supported: linear, yarn)")
            }
        };
        let cfg = ModelConfig {
            architecture: arch.clone(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self
                .meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            theta: self
                .meta_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10_000.0),
            rope_layout: RopeLayout::Interleaved,
            rope_scaling,
            max_sequence_length: self
                .meta_usize(&format!("{arch}.context_length"))
                .unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self
                .meta_usize("tokenizer.ggml.bos_token_id")
                .map(|x| x as u32),
            eos_token_id: self
                .meta_usize("tokenizer.ggml.eos_token_id")
                .map(|x| x as u32),
            vision_vocab_size: 0,
        };
        cfg.validate()
            .with_context(|| format!("{p}: invalid model metadata"))?;
        Ok(cfg)
    }

    /// The dominant quantization of the 2-D weights (for `lwm info`).
    pub fn quantization_summary(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += info.shape.elem_count();
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.iter()
            .map(|(t, n)| format!("{t} ({:.1}M)", *n as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn file_bytes(&self) -> u64 {
        self.file_len
    }
}

/// Every metadata key of a GGUF file with its value as JSON, sorted by key (`lwm info
/// --metadata`). Arrays longer than `max_items` keep their first items and their length.
pub fn metadata_json(content: &Content, max_items: usize) -> Vec<(String, serde_json::Value)> {
    let mut v: Vec<_> = content
        .metadata
        .iter()
        .map(|(k, val)| (k.clone(), value_json(val, max_items)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every tensor of a GGUF file: (name, type, shape, offset in the data section), in file
/// order.
pub fn tensor_table(content: &Content) -> Vec<(String, String, Vec<usize>, u64)> {
    let mut v: Vec<_> = content
        .tensor_infos
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                format!("{:?}", t.ggml_dtype),
                t.shape.dims().to_vec(),
                t.offset,
            )
        })
        .collect();
    v.sort_by_key(|t| t.3);
    v
}

fn value_json(v: &Value, max_items: usize) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(items) if items.len() > max_items => json!({
            "len": items.len(),
            "first": items.iter().take(max_items).map(|i| value_json(i, max_items)).collect::<Vec<_>>(),
        }),
        Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|i| value_json(i, max_items)).collect())
        }
    }
}

impl WeightSource for GgufFile {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<Weight> {
        let gguf_name = self
            .names
            .get(name)
            .with_context(|| format!("{}: tensor '{name}' is missing", self.path.display()))?;
        // A poisoned lock only means another load failed; the file handle is still valid.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let q = self
            .content
            .tensor(&mut *file, gguf_name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor '{gguf_name}': {e}", self.path.display()))?;
        // F16 / BF16 stay as the file's 2-byte values (`Linear::Half` takes their bytes);
        // `Weight::to_dense` widens them where f32 is wanted.
        Ok(match q.dtype() {
            GgmlDType::F32 => Weight::Dense(q.dequantize(&Device::Cpu)?),
            _ => Weight::Quant(Arc::new(q)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            canonical_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            canonical_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(canonical_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(canonical_name("blk.x.attn_q.weight"), None);
        assert_eq!(canonical_name("rope_freqs.weight"), None);
    }
}
