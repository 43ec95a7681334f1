//! LWM's JAX checkpoints: tux's `StreamingCheckpointer` files (`params::PATH`).
//!
//! A file is a bare concatenation of msgpack records `[key_path, bin(to_bytes(array))]`, no
//! header, no index. `to_bytes(array)` is flax's encoding: ExtType 1 holding
//! `[shape, dtype_name, raw C-order little-endian bytes]`, or, for arrays over 2^30 bytes, a
//! map `{"__msgpack_chunked_array__": true, "shape": {"0": d0, ..}, "chunks": {"0": Ext1, ..}}`
//! of flat chunks to concatenate.
//!
//! The file is read record by record from a buffered reader (never mapped or read whole);
//! each array is converted to its canonical Hugging Face name and `[out, in]` orientation
//! as it arrives (Flax `Dense` kernels are `(in, out)`), and scanned layers
//! (`h/scan_decoder/...` with a leading layer axis) are split per layer. q/k rows keep the
//! interleaved RoPE pairing of the original, so the config uses `RopeLayout::Interleaved`.
//! Tensors keep the file's dtype (f32 or bf16) until the model takes them; `load` hands each
//! one out once and forgets it, so the weights are never held twice.

use super::msgpack::{Header, Reader};
use super::{layer_name, Weight, WeightSource};
use crate::config::{ModelConfig, RopeLayout, RopeScaling};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Canonical names of the vision-language model's extra tensors (no HF equivalent exists).
pub const VISION_EMBED: &str = "model.vision_embed_tokens.weight";
pub const VISION_HEAD: &str = "vision_head.weight";

/// flax's `MAX_CHUNK_SIZE`: arrays with more bytes than this are stored chunked.
pub const MAX_CHUNK_BYTES: usize = 1 << 30;

/// One per-layer parameter: its JAX path below the layer, its HF suffix, and whether the
/// stored kernel is `(in, out)` (transposed relative to HF).
pub const LAYER_PARAMS: &[(&[&str], &str, bool)] = &[
    (
        &["attention", "wq", "kernel"],
        "self_attn.q_proj.weight",
        true,
    ),
    (
        &["attention", "wk", "kernel"],
        "self_attn.k_proj.weight",
        true,
    ),
    (
        &["attention", "wv", "kernel"],
        "self_attn.v_proj.weight",
        true,
    ),
    (
        &["attention", "wo", "kernel"],
        "self_attn.o_proj.weight",
        true,
    ),
    (
        &["feed_forward", "w1", "kernel"],
        "mlp.gate_proj.weight",
        true,
    ),
    (
        &["feed_forward", "w2", "kernel"],
        "mlp.down_proj.weight",
        true,
    ),
    (
        &["feed_forward", "w3", "kernel"],
        "mlp.up_proj.weight",
        true,
    ),
    (
        &["attention_norm", "kernel"],
        "input_layernorm.weight",
        false,
    ),
    (
        &["ffn_norm", "kernel"],
        "post_attention_layernorm.weight",
        false,
    ),
];

/// Parameters outside the layers: JAX path, canonical name, transposed.
pub const TOP_PARAMS: &[(&[&str], &str, bool)] = &[
    (
        &["transformer", "wte", "embedding"],
        "model.embed_tokens.weight",
        false,
    ),
    (&["transformer", "vte", "embedding"], VISION_EMBED, false),
    (
        &["transformer", "ln_f", "kernel"],
        "model.norm.weight",
        false,
    ),
    (&["lm_head", "kernel"], "lm_head.weight", true),
    (&["vision_head", "kernel"], VISION_HEAD, true),
];

/// How the layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JaxLayout {
    /// `transformer/h/scan_decoder/...` with a leading layer axis (what LWM's scripts load).
    Scanned,
    /// `transformer/h/{i}/...`.
    Unscanned,
}

/// Where one record goes.
#[derive(Debug, Clone)]
enum Slot {
    Top {
        name: &'static str,
        transposed: bool,
    },
    Layer {
        /// `None` for the scanned (stacked) form.
        layer: Option<usize>,
        suffix: &'static str,
        transposed: bool,
    },
}

fn classify(path: &[String]) -> Option<Slot> {
    for (p, name, transposed) in TOP_PARAMS {
        if path.iter().map(String::as_str).eq(p.iter().copied()) {
            return Some(Slot::Top {
                name,
                transposed: *transposed,
            });
        }
    }
    if path.len() < 4 || path[0] != "transformer" || path[1] != "h" {
        return None;
    }
    let layer = if path[2] == "scan_decoder" {
        None
    } else {
        // Plain decimal only ("01" is not a layer name flax writes).
        let i: usize = path[2].parse().ok()?;
        if i.to_string() != path[2] {
            return None;
        }
        Some(i)
    };
    for (p, suffix, transposed) in LAYER_PARAMS {
        if path[3..].iter().map(String::as_str).eq(p.iter().copied()) {
            return Some(Slot::Layer {
                layer,
                suffix,
                transposed: *transposed,
            });
        }
    }
    None
}

/// Expected shape of a canonical tensor (HF orientation) under `c`, if the name belongs to it.
fn expected_hf_shape(c: &ModelConfig, name: &str) -> Option<Vec<usize>> {
    let h = c.hidden_size;
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let f = c.intermediate_size;
    let s = |v: &[usize]| Some(v.to_vec());
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => s(&[c.vocab_size, h]),
        "model.norm.weight" => s(&[h]),
        VISION_EMBED | VISION_HEAD if c.vision_vocab_size > 0 => s(&[c.vision_vocab_size, h]),
        "self_attn.q_proj.weight" => s(&[q, h]),
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => s(&[kv, h]),
        "self_attn.o_proj.weight" => s(&[h, q]),
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => s(&[f, h]),
        "mlp.down_proj.weight" => s(&[h, f]),
        "input_layernorm.weight" | "post_attention_layernorm.weight" => s(&[h]),
        _ => None,
    }
}

/// The stored (JAX) shape a record must have under `c`.
fn expected_jax_shape(c: &ModelConfig, slot: &Slot) -> Option<Vec<usize>> {
    let (name, transposed, stacked) = match slot {
        Slot::Top { name, transposed } => (*name, *transposed, false),
        Slot::Layer {
            layer,
            suffix,
            transposed,
        } => (*suffix, *transposed, layer.is_none()),
    };
    let mut shape = expected_hf_shape(c, name)?;
    if transposed {
        shape.reverse();
    }
    if stacked {
        shape.insert(0, c.num_hidden_layers);
    }
    Some(shape)
}

/// The JAX dtype names flax writes, and ours.
fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => bail!(
            "array dtype '{other}' is not a supported weight type (float32, bfloat16, float16)"
        ),
    })
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "unsupported",
    }
}

/// Typed storage filled straight from the stream.
enum Buf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Buf {
    fn new(dtype: DType, cap: usize) -> Self {
        match dtype {
            DType::BF16 => Buf::BF16(Vec::with_capacity(cap)),
            DType::F16 => Buf::F16(Vec::with_capacity(cap)),
            _ => Buf::F32(Vec::with_capacity(cap)),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::BF16(_) => DType::BF16,
            Buf::F16(_) => DType::F16,
        }
    }

    fn reserve_total(&mut self, total: usize) {
        let extra = total.saturating_sub(self.len());
        match self {
            Buf::F32(v) => v.reserve_exact(extra),
            Buf::BF16(v) => v.reserve_exact(extra),
            Buf::F16(v) => v.reserve_exact(extra),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::BF16(v) => v.len(),
            Buf::F16(v) => v.len(),
        }
    }

    /// Append `nbytes` little-endian values from `r`, converting 1 MiB at a time.
    fn append<R: Read>(&mut self, r: &mut Reader<R>, nbytes: usize) -> Result<()> {
        let mut chunk = vec![0u8; nbytes.min(1 << 20)];
        let mut left = nbytes;
        while left > 0 {
            let n = left.min(chunk.len());
            let bytes = &mut chunk[..n];
            r.read_exact(bytes)?;
            match self {
                Buf::F32(v) => v.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Buf::BF16(v) => v.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
                ),
                Buf::F16(v) => v.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
                ),
            }
            left -= n;
        }
        Ok(())
    }

    /// Split a `[n, ...]` array into its n leading slices, from the last: each slice is
    /// copied out and the buffer shrunk behind it (a large allocation shrinks in place), so
    /// a scanned array of every layer never exists twice (it did: +2.9 GB transient for
    /// LWM-7B's FFN weights).
    fn split_leading(self, n: usize) -> Vec<Buf> {
        fn split<T>(mut v: Vec<T>, n: usize) -> Vec<Vec<T>> {
            if n == 0 {
                return Vec::new();
            }
            let per = v.len() / n;
            let mut parts = Vec::with_capacity(n);
            for i in (1..n).rev() {
                parts.push(v.split_off(i * per));
                v.shrink_to_fit();
            }
            parts.push(v);
            parts.reverse();
            parts
        }
        match self {
            Buf::F32(v) => split(v, n).into_iter().map(Buf::F32).collect(),
            Buf::BF16(v) => split(v, n).into_iter().map(Buf::BF16).collect(),
            Buf::F16(v) => split(v, n).into_iter().map(Buf::F16).collect(),
        }
    }

    fn into_tensor(self, shape: &[usize]) -> Result<Tensor> {
        let dev = &Device::Cpu;
        Ok(match self {
            Buf::F32(v) => Tensor::from_vec(v, shape, dev)?,
            Buf::BF16(v) => Tensor::from_vec(v, shape, dev)?,
            Buf::F16(v) => Tensor::from_vec(v, shape, dev)?,
        })
    }
}

/// What to do with an array's raw bytes.
enum Body {
    /// Read them into a tensor.
    Load,
    /// Seek past them (header scans).
    Skip,
}

/// One decoded `to_bytes` payload: shape, dtype and (when loaded) the data.
struct Array {
    shape: Vec<usize>,
    dtype: DType,
    data: Option<Buf>,
}

fn read_shape<R: Read>(r: &mut Reader<R>, what: &str) -> Result<Vec<usize>> {
    let n = r.expect_array(what)?;
    (0..n)
        .map(|_| {
            let d = r.expect_int(what)?;
            usize::try_from(d).map_err(|_| anyhow!("{what}: negative dimension {d}"))
        })
        .collect()
}

/// Ext type 1 body: `[shape, dtype, raw]`. `check` sees shape and dtype before any data is read.
fn read_ext_array<R: Read + std::io::Seek>(
    r: &mut Reader<R>,
    ext_len: usize,
    body: &Body,
    into: Option<&mut Buf>,
    check: &mut dyn FnMut(&[usize], DType) -> Result<()>,
) -> Result<(Vec<usize>, DType, Option<Buf>)> {
    let start = r.pos;
    if r.expect_array("array")? != 3 {
        bail!("flax array: expected [shape, dtype, data]");
    }
    let shape = read_shape(r, "array shape")?;
    let dtype = parse_dtype(&r.expect_str("array dtype")?)?;
    check(&shape, dtype)?;
    let nbytes = r.expect_bin("array data")?;
    let numel: usize = shape.iter().product();
    if numel.checked_mul(dtype.size_in_bytes()) != Some(nbytes) {
        bail!(
            "flax array of shape {shape:?} {} holds {nbytes} bytes, expected {}",
            dtype_name(dtype),
            numel * dtype.size_in_bytes()
        );
    }
    let mut own = None;
    match body {
        Body::Skip => r.skip(nbytes)?,
        Body::Load => match into {
            Some(buf) => {
                if buf.dtype() != dtype {
                    bail!("chunked array mixes dtypes");
                }
                buf.append(r, nbytes)?
            }
            None => {
                let mut buf = Buf::new(dtype, numel);
                buf.append(r, nbytes)?;
                own = Some(buf);
            }
        },
    }
    if r.pos - start != ext_len as u64 {
        bail!(
            "flax array: ext payload declares {ext_len} bytes but holds {}",
            r.pos - start
        );
    }
    Ok((shape, dtype, own))
}

/// Read one `to_bytes(array)` value: the plain Ext form or the chunked map form.
fn read_array<R: Read + std::io::Seek>(
    r: &mut Reader<R>,
    body: Body,
    check: &mut dyn FnMut(&[usize], DType) -> Result<()>,
) -> Result<Array> {
    match r.header()? {
        Header::Ext(1, n) => {
            let (shape, dtype, data) = read_ext_array(r, n, &body, None, check)?;
            Ok(Array { shape, dtype, data })
        }
        Header::Ext(t, _) => bail!("msgpack ext type {t} is not a flax array (type 1)"),
        Header::Map(n) => {
            let mut flagged = false;
            let mut shape: Option<Vec<usize>> = None;
            let mut buf: Option<Buf> = None;
            let mut dtype = None;
            let mut numel_read = 0usize;
            for _ in 0..n {
                let key = r.expect_str("chunked array key")?;
                match key.as_str() {
                    "__msgpack_chunked_array__" => {
                        flagged = r.header()? == Header::Bool(true);
                    }
                    "shape" => {
                        let m = r.expect_map("chunked array shape")?;
                        let mut dims = BTreeMap::new();
                        for _ in 0..m {
                            let k = r.expect_str("shape key")?;
                            let i: usize = k
                                .parse()
                                .map_err(|_| anyhow!("chunked array shape key '{k}'"))?;
                            let d = r.expect_int("shape value")?;
                            dims.insert(i, usize::try_from(d)?);
                        }
                        if dims.keys().copied().ne(0..dims.len()) {
                            bail!("chunked array shape keys are not 0..{}", dims.len());
                        }
                        let s: Vec<usize> = dims.into_values().collect();
                        // The real shape is known: check it before any chunk is read.
                        if let Some(d) = dtype {
                            check(&s, d)?;
                        }
                        shape = Some(s);
                    }
                    "chunks" => {
                        let m = r.expect_map("chunked array chunks")?;
                        for ci in 0..m {
                            let k = r.expect_str("chunk key")?;
                            if k != ci.to_string() {
                                bail!("chunk {ci} is stored under key '{k}' (out of order)");
                            }
                            let Header::Ext(1, len) = r.header()? else {
                                bail!("chunk {ci} is not a flax array");
                            };
                            let mut chunk_check = |s: &[usize], d: DType| -> Result<()> {
                                if s.len() != 1 {
                                    bail!("chunk {ci} has shape {s:?}, expected a flat array");
                                }
                                if dtype.is_none() {
                                    if let Some(full) = &shape {
                                        check(full, d)?;
                                    }
                                }
                                Ok(())
                            };
                            let (s, d, own) = match (&body, buf.as_mut()) {
                                (Body::Load, Some(b)) => {
                                    read_ext_array(r, len, &body, Some(b), &mut chunk_check)?
                                }
                                // First chunk (or a skip): allocates with its own dtype.
                                _ => read_ext_array(r, len, &body, None, &mut chunk_check)?,
                            };
                            if let Some(mut b) = own {
                                // Reserve the whole array once, not by doubling.
                                let total: usize = shape.as_ref().map_or(0, |s| s.iter().product());
                                b.reserve_total(total);
                                buf = Some(b);
                            }
                            dtype = Some(d);
                            numel_read += s[0];
                        }
                    }
                    other => bail!("unexpected key '{other}' in a chunked array"),
                }
            }
            if !flagged {
                bail!(
                    "msgpack map is not a flax chunked array (no __msgpack_chunked_array__ flag)"
                );
            }
            let shape = shape.context("chunked array without a shape")?;
            let dtype = dtype.context("chunked array without chunks")?;
            let numel: usize = shape.iter().product();
            if numel != numel_read {
                bail!("chunked array of shape {shape:?} holds {numel_read} elements in its chunks");
            }
            Ok(Array {
                shape,
                dtype,
                data: buf,
            })
        }
        h => bail!(
            "expected a flax array (ext 1 or chunked map), found {}",
            h.kind()
        ),
    }
}

/// One record's header: key path, stored shape and dtype.
#[derive(Debug, Clone)]
pub struct RecordInfo {
    pub path: Vec<String>,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Sees each record's key path, shape and dtype before its data is read.
type RecordCheck<'a> = dyn FnMut(&[String], &[usize], DType) -> Result<()> + 'a;

/// Walk every record of a streaming checkpoint. `visit` gets each record's path and array;
/// with `Body::Skip` only headers are read (the data is seeked over).
fn walk(
    path: &Path,
    body_mode: fn() -> Body,
    check: &mut RecordCheck,
    visit: &mut dyn FnMut(Vec<String>, Array) -> Result<()>,
) -> Result<()> {
    let file = File::open(path)
        .with_context(|| format!("cannot open JAX checkpoint {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut r = Reader::new(BufReader::with_capacity(1 << 20, file), Some(len));
    let mut n = 0usize;
    loop {
        let at = r.pos;
        let Some(marker) = r.peek_end()? else {
            break;
        };
        let mut key: Vec<String> = Vec::new();
        let res = (|| -> Result<()> {
            if r.header_after(marker)? != Header::Array(2) {
                bail!("not a tux streaming checkpoint record ([key_path, value])");
            }
            let depth = r.expect_array("key path")?;
            for _ in 0..depth {
                key.push(r.expect_str("key path")?);
            }
            let payload = r.expect_bin("record value")?;
            let start = r.pos;
            let mut c = |s: &[usize], d: DType| check(&key, s, d);
            let arr = read_array(&mut r, body_mode(), &mut c)?;
            if r.pos - start != payload as u64 {
                bail!(
                    "record value declares {payload} bytes but its array used {}",
                    r.pos - start
                );
            }
            visit(key.clone(), arr)
        })();
        if let Err(e) = res {
            let truncated = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
            });
            let what = if key.is_empty() {
                String::new()
            } else {
                format!(" ('{}')", key.join("/"))
            };
            if truncated {
                bail!(
                    "{}: truncated checkpoint: the stream ends inside record {n}{what} that starts at byte {at} (file has {len} bytes); the file is incomplete",
                    path.display()
                );
            }
            return Err(e.context(format!("{}: record {n}{what} at byte {at}", path.display())));
        }
        n += 1;
    }
    if n == 0 {
        bail!("{}: empty checkpoint (no records)", path.display());
    }
    Ok(())
}

/// Every record's path, shape and dtype, read without loading any array data.
pub fn scan_records(path: &Path) -> Result<Vec<RecordInfo>> {
    let mut out = Vec::new();
    walk(path, || Body::Skip, &mut |_, _, _| Ok(()), &mut |p, a| {
        out.push(RecordInfo {
            path: p,
            shape: a.shape,
            dtype: a.dtype,
        });
        Ok(())
    })?;
    Ok(out)
}

/// `(hidden, heads, max_sequence_length, rms_norm_eps)` of the original's LLaMA presets
/// (`LLAMA_STANDARD_CONFIGS`), for checkpoints without a config file.
const LLAMA_PRESETS: &[(usize, usize, usize, f64)] = &[
    (1024, 8, 2048, 1e-6),
    (2048, 16, 2048, 1e-6),
    (3200, 32, 2048, 1e-6),
    (4096, 32, 4096, 1e-6),
    (5120, 40, 2048, 1e-6),
    (6656, 52, 2048, 1e-6),
    (8192, 64, 2048, 1e-5),
];

/// The config of a JAX checkpoint: `config.json` (HF-style) next to the params file when
/// present, else the shapes of the tree matched to the original's LLaMA presets (the head
/// count is not visible in the shapes). Theta defaults to LLaMAConfig's 10000: use
/// `--preset`/`--theta` for the released LWM models.
pub fn load_config(params: &Path) -> Result<ModelConfig> {
    let dir = params.parent().unwrap_or(Path::new("."));
    let records = scan_records(params)?;
    let shape_of = |p: &[&str]| {
        records
            .iter()
            .find(|r| r.path.iter().map(String::as_str).eq(p.iter().copied()))
            .map(|r| r.shape.clone())
    };
    let vision = shape_of(&["transformer", "vte", "embedding"]).map(|s| s[0]);
    let cfg_path = dir.join("config.json");
    let mut config = if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path)?;
        let mut c = ModelConfig::from_hf_json(&text)
            .map_err(|e| anyhow!("{}: {e:#}", cfg_path.display()))?;
        // The file describes the shapes; the JAX q/k rows are in interleaved order.
        c.rope_layout = RopeLayout::Interleaved;
        // LWM's scripts set bos/eos from the LLaMA tokenizer (1, 2).
        c.bos_token_id.get_or_insert(1);
        c.eos_token_id.get_or_insert(2);
        c
    } else {
        let wte = shape_of(&["transformer", "wte", "embedding"]).with_context(|| {
            format!(
                "{}: no transformer/wte/embedding record: not an LWM LLaMA checkpoint",
                params.display()
            )
        })?;
        let (vocab, hidden) = (wte[0], *wte.get(1).unwrap_or(&0));
        let layers = match shape_of(&[
            "transformer",
            "h",
            "scan_decoder",
            "attention",
            "wq",
            "kernel",
        ]) {
            Some(s) => s[0],
            None => records
                .iter()
                .filter(|r| {
                    r.path.len() > 3
                        && r.path[1] == "h"
                        && r.path[3..] == ["attention", "wq", "kernel"]
                })
                .count(),
        };
        let inter = records
            .iter()
            .find(|r| {
                r.path
                    .ends_with(&["feed_forward".into(), "w1".into(), "kernel".into()])
            })
            .map(|r| *r.shape.last().unwrap_or(&0))
            .unwrap_or(0);
        let Some(&(_, heads, max_seq, eps)) = LLAMA_PRESETS.iter().find(|p| p.0 == hidden) else {
            bail!(
                "{}: hidden size {hidden} matches none of the original's LLaMA presets, so the head count is unknown; put a config.json (Hugging Face style) next to the params file",
                params.display()
            );
        };
        ModelConfig {
            architecture: "llama".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: hidden / heads,
            rms_norm_eps: eps,
            theta: 10_000.0,
            rope_layout: RopeLayout::Interleaved,
            rope_scaling: RopeScaling::None,
            max_sequence_length: max_seq,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            vision_vocab_size: 0,
        }
    };
    if let Some(v) = vision {
        config.vision_vocab_size = v;
    }
    config.validate()?;
    Ok(config)
}

/// A loaded JAX checkpoint in canonical naming.
pub struct JaxWeights {
    origin: String,
    pub layout: JaxLayout,
    /// The file's float dtype (all tensors share it).
    pub dtype: DType,
    shapes: BTreeMap<String, Vec<usize>>,
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl JaxWeights {
    /// Stream `path`, checking every record against `config` before its data is read.
    pub fn open(path: &Path, config: &ModelConfig) -> Result<Self> {
        Self::open_with_progress(path, config, &mut |_, _| {})
    }

    /// As `open`, calling `progress(bytes_done, bytes_total)` after each record.
    pub fn open_with_progress(
        path: &Path,
        config: &ModelConfig,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let total = std::fs::metadata(path)
            .with_context(|| format!("cannot open JAX checkpoint {}", path.display()))?
            .len();
        let mut layout: Option<JaxLayout> = None;
        let mut dtype: Option<DType> = None;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut done = 0u64;
        let mismatch = |key: &[String], why: String| {
            anyhow!(
                "checkpoint tree does not match the model config: '{}' {why}",
                key.join("/")
            )
        };
        let mut check = |key: &[String], shape: &[usize], d: DType| -> Result<()> {
            let slot = classify(key)
                .ok_or_else(|| mismatch(key, "is not a parameter of an LWM LLaMA model".into()))?;
            if let Slot::Layer { layer: Some(i), .. } = slot {
                if i >= config.num_hidden_layers {
                    return Err(mismatch(
                        key,
                        format!(
                            "is layer {i} but the config has {} layers",
                            config.num_hidden_layers
                        ),
                    ));
                }
            }
            let want = expected_jax_shape(config, &slot).ok_or_else(|| {
                mismatch(
                    key,
                    "belongs to a vision model but the config has no vision vocabulary".into(),
                )
            })?;
            if shape != want.as_slice() {
                return Err(mismatch(
                    key,
                    format!("has shape {shape:?}, the config implies {want:?}"),
                ));
            }
            match dtype {
                Some(prev) if prev != d => {
                    bail!(
                        "checkpoint mixes {} and {} arrays",
                        dtype_name(prev),
                        dtype_name(d)
                    )
                }
                _ => dtype = Some(d),
            }
            Ok(())
        };
        let mut visit = |key: Vec<String>, arr: Array| -> Result<()> {
            let slot = classify(&key).expect("checked");
            let data = arr.data.expect("loaded");
            let orient = |t: Tensor, transposed: bool| -> Result<Tensor> {
                Ok(if transposed { t.t()?.contiguous()? } else { t })
            };
            match slot {
                Slot::Top { name, transposed } => {
                    let t = orient(data.into_tensor(&arr.shape)?, transposed)?;
                    insert(&mut tensors, name.to_string(), t, &key)?;
                }
                Slot::Layer {
                    layer,
                    suffix,
                    transposed,
                } => {
                    let this = if layer.is_some() {
                        JaxLayout::Unscanned
                    } else {
                        JaxLayout::Scanned
                    };
                    if *layout.get_or_insert(this) != this {
                        bail!(
                            "checkpoint mixes scanned (h/scan_decoder) and unscanned (h/N) layers"
                        );
                    }
                    match layer {
                        Some(i) => {
                            let t = orient(data.into_tensor(&arr.shape)?, transposed)?;
                            insert(&mut tensors, layer_name(i, suffix), t, &key)?;
                        }
                        // Scanned: one array holds every layer; split it as it is consumed.
                        None => {
                            let parts = data.split_leading(arr.shape[0]);
                            for (i, part) in parts.into_iter().enumerate() {
                                let t = orient(part.into_tensor(&arr.shape[1..])?, transposed)?;
                                insert(&mut tensors, layer_name(i, suffix), t, &key)?;
                            }
                        }
                    }
                }
            }
            done = total.min(
                done + arr.shape.iter().product::<usize>() as u64
                    * arr.dtype.size_in_bytes() as u64,
            );
            progress(done, total);
            Ok(())
        };
        walk(path, || Body::Load, &mut check, &mut visit)?;
        // Every tensor the config needs must be there.
        let mut wanted: Vec<String> = vec![
            "model.embed_tokens.weight".into(),
            "model.norm.weight".into(),
            "lm_head.weight".into(),
        ];
        if config.vision_vocab_size > 0 {
            wanted.push(VISION_EMBED.into());
            wanted.push(VISION_HEAD.into());
        }
        for i in 0..config.num_hidden_layers {
            for (_, suffix, _) in LAYER_PARAMS {
                wanted.push(layer_name(i, suffix));
            }
        }
        for w in &wanted {
            if !tensors.contains_key(w) {
                bail!(
                    "checkpoint tree does not match the model config: {} has no tensor for '{}' ({})",
                    path.display(),
                    jax_path_of(w, layout.unwrap_or(JaxLayout::Scanned)).join("/"),
                    w
                );
            }
        }
        Ok(Self {
            origin: path.display().to_string(),
            layout: layout.unwrap_or(JaxLayout::Scanned),
            dtype: dtype.unwrap_or(DType::F32),
            shapes: tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect(),
            tensors: Mutex::new(tensors),
        })
    }

    /// Take a tensor out (each is handed out once, so memory is not held twice).
    pub fn take(&self, name: &str) -> Result<Tensor> {
        let mut map = self
            .tensors
            .lock()
            .map_err(|_| anyhow!("weights lock poisoned"))?;
        map.remove(name).ok_or_else(|| {
            if self.shapes.contains_key(name) {
                anyhow!("{}: tensor '{name}' was already taken", self.origin)
            } else {
                anyhow!("{}: no tensor '{name}'", self.origin)
            }
        })
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(|s| s.as_slice())
    }
}

fn insert(
    map: &mut HashMap<String, Tensor>,
    name: String,
    t: Tensor,
    key: &[String],
) -> Result<()> {
    if map.insert(name.clone(), t).is_some() {
        bail!("checkpoint holds '{}' twice ({name})", key.join("/"));
    }
    Ok(())
}

/// The JAX key path of a canonical name, in `layout`; for a scanned layer the path of the
/// stacked array.
pub fn jax_path_of(name: &str, layout: JaxLayout) -> Vec<String> {
    for (p, n, _) in TOP_PARAMS {
        if *n == name {
            return p.iter().map(|s| s.to_string()).collect();
        }
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((i, suffix)) = rest.split_once('.') {
            if let Some((p, _, _)) = LAYER_PARAMS.iter().find(|(_, s, _)| *s == suffix) {
                let mid = match layout {
                    JaxLayout::Scanned => "scan_decoder".to_string(),
                    JaxLayout::Unscanned => i.to_string(),
                };
                let mut v = vec!["transformer".to_string(), "h".to_string(), mid];
                v.extend(p.iter().map(|s| s.to_string()));
                return v;
            }
        }
    }
    vec![name.to_string()]
}

impl WeightSource for JaxWeights {
    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn load(&self, name: &str) -> Result<Weight> {
        Ok(Weight::Dense(self.take(name)?))
    }

    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// A `--model` value naming a JAX checkpoint: `params::PATH`, or a directory holding `params`
/// (the layout of the published `LWM-*-Jax` repos: `params`, `tokenizer.model`, `vqgan`).
pub fn params_path(spec: &str) -> Option<PathBuf> {
    if let Some(p) = spec.strip_prefix("params::") {
        return Some(PathBuf::from(p));
    }
    let dir = Path::new(spec);
    (dir.is_dir() && dir.join("params").is_file()).then(|| dir.join("params"))
}

/// The tokenizer file next to a JAX params file: `tokenizer.model` (the released layout),
/// else a `tokenizer.json`.
pub fn tokenizer_next_to(params: &Path) -> Option<std::path::PathBuf> {
    let dir = params.parent().unwrap_or(Path::new("."));
    ["tokenizer.model", "tokenizer.json"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// Config, weights and (when one sits next to the params, `tokenizer_next_to`) tokenizer of
/// a JAX checkpoint, as `--model` loads it.
pub fn open_model(
    params: &Path,
) -> Result<(ModelConfig, JaxWeights, Option<crate::tokenizer::Tokenizer>)> {
    let config = load_config(params)?;
    let weights = JaxWeights::open(params, &config)?;
    let tok = tokenizer_next_to(params)
        .map(|p| crate::tokenizer::Tokenizer::from_file(&p))
        .transpose()?;
    Ok((config, weights, tok))
}
