//! Hugging Face model directories.
//!
//! Reads, in this order of preference:
//! * `model.safetensors` (one file),
//! * `model.safetensors.index.json` whose `weight_map` names the `model-0000X-of-0000N.safetensors` shards,
//! * `pytorch_model.bin` (a PyTorch zip pickle),
//! * `pytorch_model.bin.index.json` naming `pytorch_model-0000X-of-0000N.bin` shards.
//!
//! Safetensors files are memory-mapped; their headers are checked against the file length
//! before any tensor is touched, so a truncated or corrupt file is an error at `open`, never a
//! panic or a read past the end of the map. Tensor names are the canonical HF LLaMA names
//! already; `load` converts F32/F16/BF16/F64 to a dense f32 tensor on the CPU.

use super::{Weight, WeightSource};
use crate::config::ModelConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

const SINGLE_ST: &str = "model.safetensors";
const INDEX_ST: &str = "model.safetensors.index.json";
const SINGLE_PT: &str = "pytorch_model.bin";
const INDEX_PT: &str = "pytorch_model.bin.index.json";

/// Largest safetensors header we accept (the format's own readers cap it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Read `DIR/config.json` into a [`ModelConfig`] (rotate-half RoPE layout).
pub fn load_hf_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("cannot read model config {}: {e}", path.display()))?;
    ModelConfig::from_hf_json(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// Weights of a Hugging Face model directory.
pub struct HfWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Canonical name -> index into `shards`.
    index: BTreeMap<String, usize>,
}

enum Shard {
    Safetensors(StFile),
    Pth(PthFile),
}

impl Shard {
    fn path(&self) -> &Path {
        match self {
            Shard::Safetensors(f) => &f.path,
            Shard::Pth(f) => &f.path,
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Shard::Safetensors(f) => f.tensors.keys().cloned().collect(),
            Shard::Pth(f) => f.tensors.tensor_infos().keys().cloned().collect(),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Shard::Safetensors(f) => f.tensors.contains_key(name),
            Shard::Pth(f) => f.tensors.tensor_infos().contains_key(name),
        }
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        match self {
            Shard::Safetensors(f) => f.load(name),
            Shard::Pth(f) => f.load(name),
        }
    }
}

impl HfWeights {
    /// Open a Hugging Face model directory (see the module docs for the accepted layouts).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            bail!("model directory {} does not exist", dir.display());
        }
        if !dir.is_dir() {
            bail!(
                "{} is not a directory (expected a Hugging Face model directory)",
                dir.display()
            );
        }
        let shards = if dir.join(SINGLE_ST).is_file() {
            vec![Shard::Safetensors(StFile::open(&dir.join(SINGLE_ST))?)]
        } else if dir.join(INDEX_ST).is_file() {
            open_indexed(dir, INDEX_ST, |p| Ok(Shard::Safetensors(StFile::open(p)?)))?
        } else if dir.join(SINGLE_PT).is_file() {
            vec![Shard::Pth(PthFile::open(&dir.join(SINGLE_PT))?)]
        } else if dir.join(INDEX_PT).is_file() {
            open_indexed(dir, INDEX_PT, |p| Ok(Shard::Pth(PthFile::open(p)?)))?
        } else {
            bail!(
                "no {SINGLE_ST}, {INDEX_ST} or {SINGLE_PT} in {} (not a Hugging Face model directory?)",
                dir.display()
            );
        };
        let mut index = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    bail!(
                        "tensor '{name}' appears in both {} and {}",
                        shards[prev].path().display(),
                        shard.path().display()
                    );
                }
            }
        }
        if index.is_empty() {
            bail!("the weight files in {} hold no tensors", dir.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The weight files that were opened, in order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path().to_path_buf()).collect()
    }

    /// Shape of a tensor without loading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        match shard {
            Shard::Safetensors(f) => f.tensors.get(name).map(|t| t.shape.clone()),
            Shard::Pth(f) => f
                .tensors
                .tensor_infos()
                .get(name)
                .map(|t| t.layout.dims().to_vec()),
        }
    }

    /// Storage dtype name of a tensor as found in the file ("F32", "BF16", "I64", ...).
    pub fn stored_dtype(&self, name: &str) -> Option<String> {
        let shard = &self.shards[*self.index.get(name)?];
        match shard {
            Shard::Safetensors(f) => f.tensors.get(name).map(|t| t.dtype.clone()),
            Shard::Pth(f) => f
                .tensors
                .tensor_infos()
                .get(name)
                .map(|t| format!("{:?}", t.dtype).to_uppercase()),
        }
    }
}

impl WeightSource for HfWeights {
    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<Weight> {
        let Some(&i) = self.index.get(name) else {
            bail!("tensor '{name}' not found in {}", self.dir.display());
        };
        Ok(Weight::Dense(self.shards[i].load(name)?))
    }
}

/// Read an index file's `weight_map`, open each shard once, and check that every tensor the
/// index names is really in the shard it points to.
fn open_indexed(
    dir: &Path,
    index_name: &str,
    open: impl Fn(&Path) -> Result<Shard>,
) -> Result<Vec<Shard>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index_path = dir.join(index_name);
    let text = std::fs::read_to_string(&index_path)
        .map_err(|e| anyhow!("cannot read {}: {e}", index_path.display()))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not a valid shard index (expected {{\"weight_map\": {{...}}}}): {e}",
            index_path.display()
        )
    })?;
    if index.weight_map.is_empty() {
        bail!("{} has an empty weight_map", index_path.display());
    }
    let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
    let mut shards = Vec::new();
    for file in index.weight_map.values() {
        if shard_of_file.contains_key(file.as_str()) {
            continue;
        }
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if file.is_empty() || !plain {
            bail!(
                "{} names an invalid shard file '{file}'",
                index_path.display()
            );
        }
        let path = dir.join(file);
        if !path.is_file() {
            bail!(
                "{} names shard '{file}', which is missing from {}",
                index_path.display(),
                dir.display()
            );
        }
        shard_of_file.insert(file, shards.len());
        shards.push(open(&path)?);
    }
    for (name, file) in &index.weight_map {
        let shard = &shards[shard_of_file[file.as_str()]];
        if !shard.has(name) {
            bail!(
                "{} maps tensor '{name}' to '{file}', but {} has no such tensor",
                index_path.display(),
                shard.path().display()
            );
        }
    }
    Ok(shards)
}

/// How a stored dtype converts to f32 (None: not a floating-point weight type).
fn float_dtype(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "F64" => Some(DType::F64),
        _ => None,
    }
}

/// Bytes per element of every dtype the safetensors format defines (None: unknown name).
fn st_elem_size(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

fn unsupported_dtype(name: &str, dtype: &str, path: &Path) -> anyhow::Error {
    anyhow!(
        "tensor '{name}' in {} has dtype {dtype}, which is not a supported weight type (supported: F32, F16, BF16, F64)",
        path.display()
    )
}

// ---------------------------------------------------------------------------- safetensors

struct StTensor {
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

struct StFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, StTensor>,
}

impl StFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| anyhow!("cannot stat {}: {e}", path.display()))?
            .len();
        if len < 8 {
            bail!(
                "{} is truncated: {len} bytes is too short for a safetensors header",
                path.display()
            );
        }
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not
        // being truncated by another process while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| anyhow!("cannot memory-map {}: {e}", path.display()))?;
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap());
        if header_len > len - 8 {
            bail!(
                "{} is truncated or not a safetensors file: its header claims {header_len} bytes but the file has only {len}",
                path.display()
            );
        }
        if header_len > MAX_HEADER {
            bail!(
                "{}: safetensors header of {header_len} bytes is implausibly large",
                path.display()
            );
        }
        let data_start = 8 + header_len as usize;
        let data_len = mmap.len() - data_start;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| {
                anyhow!(
                    "{} has a corrupt safetensors header (not a JSON object): {e}",
                    path.display()
                )
            })?;

        #[derive(Deserialize)]
        struct Entry {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: [usize; 2],
        }
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let e: Entry = serde_json::from_value(value).map_err(|err| {
                anyhow!(
                    "{} has a corrupt safetensors header: entry for tensor '{name}' is malformed ({err})",
                    path.display()
                )
            })?;
            let [begin, end] = e.data_offsets;
            if begin > end {
                bail!(
                    "{} has a corrupt safetensors header: tensor '{name}' has data_offsets [{begin}, {end}]",
                    path.display()
                );
            }
            if end > data_len {
                bail!(
                    "{} is truncated: tensor '{name}' needs data bytes {begin}..{end} but only {data_len} bytes follow the header",
                    path.display()
                );
            }
            if let Some(size) = st_elem_size(&e.dtype) {
                let bytes = e.shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
                if bytes != Some(end - begin) {
                    bail!(
                        "{} has a corrupt safetensors header: tensor '{name}' of dtype {} and shape {:?} spans {} bytes, not {}",
                        path.display(),
                        e.dtype,
                        e.shape,
                        end - begin,
                        bytes.map_or_else(|| "an overflowing count of".to_string(), |b| b.to_string())
                    );
                }
            }
            tensors.insert(
                name,
                StTensor {
                    dtype: e.dtype,
                    shape: e.shape,
                    start: data_start + begin,
                    end: data_start + end,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' not found in {}", self.path.display()))?;
        let dtype =
            float_dtype(&t.dtype).ok_or_else(|| unsupported_dtype(name, &t.dtype, &self.path))?;
        let bytes = &self.mmap[t.start..t.end];
        // f32 / f16 / bf16 keep the file's type (f16 / bf16 weights stay 2 bytes each in
        // `Linear::Half`); only f64 is narrowed to f32.
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &t.shape, &Device::Cpu)
            .and_then(|t| match dtype {
                DType::F64 => t.to_dtype(DType::F32),
                _ => Ok(t),
            })
            .with_context(|| format!("cannot read tensor '{name}' from {}", self.path.display()))?;
        // The tensor is a copy now: drop the mapped pages from this process, or the whole
        // file would count in its RSS beside the copies (a 13.5 GB bf16 7B model peaked at
        // 24.6 GB). The page cache keeps them, and a later read faults them back in.
        #[cfg(unix)]
        // SAFETY: a read-only file mapping; MADV_DONTNEED only makes later reads fault the
        // same file bytes in again, and no reference into this range outlives this call.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                t.start,
                t.end - t.start,
            );
        }
        Ok(tensor)
    }
}

// ---------------------------------------------------------------------------- PyTorch .bin

struct PthFile {
    path: PathBuf,
    tensors: candle_core::pickle::PthTensors,
}

impl PthFile {
    fn open(path: &Path) -> Result<Self> {
        let tensors = candle_core::pickle::PthTensors::new(path, None).map_err(|e| {
            anyhow!(
                "{} is not a readable PyTorch checkpoint (zip pickle): {e}",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .tensor_infos()
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' not found in {}", self.path.display()))?;
        let stored = format!("{:?}", info.dtype).to_uppercase();
        if float_dtype(&stored).is_none() {
            return Err(unsupported_dtype(name, &stored, &self.path));
        }
        let tensor = self
            .tensors
            .get(name)
            .map_err(|e| {
                anyhow!(
                    "cannot read tensor '{name}' from {}: {e}",
                    self.path.display()
                )
            })?
            .ok_or_else(|| anyhow!("tensor '{name}' not found in {}", self.path.display()))?;
        let keep = matches!(tensor.dtype(), DType::F16 | DType::BF16 | DType::F32);
        (if keep {
            Ok(tensor)
        } else {
            tensor.to_dtype(DType::F32)
        })
        .and_then(|t| t.contiguous())
        .map_err(|e| {
            anyhow!(
                "cannot convert tensor '{name}' from {}: {e}",
                self.path.display()
            )
        })
    }
}
