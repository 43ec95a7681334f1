//! Training checkpoints: one directory per save,
//!
//! ```text
//!   OUT/checkpoints/stage{S}-step{N}/model.safetensors      weights, HF names (rotate-half)
//!                                   /config.json            HF config: `lwm` loads the dir
//!                                   /optimizer.safetensors  AdamW moments (mu.*, nu.*)
//!                                   /state.json             step, stage, data position, config
//!   OUT/latest                                              name of the newest good one
//! ```
//!
//! Writes go to a temporary directory that is fsynced and renamed into place, then `latest`
//! is replaced by rename too; a crash or a full disk mid-save leaves the previous checkpoint
//! and `latest` untouched.

use super::model::TrainModel;
use super::optim::AdamW;
use super::packing::PackerState;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lwm_core::config::{ModelConfig, RopeLayout};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Stage index (0-based) and optimizer updates done within it.
    pub stage: usize,
    pub stage_step: u64,
    /// Updates over all stages.
    pub global_step: u64,
    pub tokens_seen: u64,
    pub data: PackerState,
    pub model: ModelConfig,
    /// The training config text this run used (TOML), for the record.
    pub train_config: String,
}

/// Hugging Face `config.json` for a rotate-half model (what `load_hf_config` reads).
pub fn hf_config_json(c: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.theta,
        "max_position_embeddings": c.max_sequence_length,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn save_tensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// A `tokenizer.json` equal to `data::ByteEncoder`: BPE without merges whose byte fallback
/// maps byte b to `<0xBB>` = id b + 3; `<unk>` 0, `<s>` 1, `</s>` 2.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..256u32 {
        vocab.insert(format!("<0x{b:02X}>"), (b + 3).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    })
}

fn write_tokenizer(dir: &Path, spec: &str) -> Result<()> {
    if spec == "bytes" {
        return write_synced(
            &dir.join("tokenizer.json"),
            serde_json::to_string(&byte_tokenizer_json())?.as_bytes(),
        );
    }
    let src = Path::new(spec);
    let name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".json") || name.ends_with(".model") {
        let dst = if name.ends_with(".json") {
            "tokenizer.json"
        } else {
            "tokenizer.model"
        };
        let bytes =
            std::fs::read(src).with_context(|| format!("reading tokenizer {}", src.display()))?;
        write_synced(&dir.join(dst), &bytes)?;
    }
    Ok(())
}

pub fn checkpoint_name(stage: usize, stage_step: u64) -> String {
    format!("stage{stage}-step{stage_step:08}")
}

/// Write a checkpoint atomically and point `OUT/latest` at it. Returns its directory.
///
/// `tokenizer` is the data's tokenizer (`bytes` or a file): a byte tokenizer is written as an
/// equivalent `tokenizer.json`, a tokenizer file is copied, so `lwm` runs the checkpoint as is.
pub fn save(
    out_dir: &Path,
    model: &TrainModel,
    opt: &AdamW,
    state: &TrainState,
    tokenizer: &str,
) -> Result<PathBuf> {
    if model.config.rope_layout != RopeLayout::RotateHalf {
        bail!("checkpoints store rotate-half weights; convert the model first");
    }
    let root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = checkpoint_name(state.stage, state.stage_step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let weights = model
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&tmp.join("model.safetensors"), weights)?;
        save_tensors(
            &tmp.join("optimizer.safetensors"),
            opt.state_tensors(model.params())?,
        )?;
        write_synced(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&hf_config_json(&model.config))?.as_bytes(),
        )?;
        write_synced(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        write_tokenizer(&tmp, tokenizer)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "saving checkpoint {name} failed; the previous checkpoint is kept"
        )));
    }
    let dst = root.join(&name);
    if dst.exists() {
        // A checkpoint of the same step from an earlier run: move it aside, then drop it.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dst, &old)?;
        std::fs::rename(&tmp, &dst)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dst)?;
    }
    std::fs::File::open(&root)?.sync_all()?;
    let latest_tmp = out_dir.join(format!(".latest-{}", std::process::id()));
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, out_dir.join("latest"))?;
    Ok(dst)
}

/// The checkpoint `OUT/latest` names, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let p = out_dir.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p)?;
    let dir = out_dir.join("checkpoints").join(name.trim());
    if !dir.is_dir() {
        bail!(
            "{} names checkpoint {} which does not exist",
            p.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

pub struct Loaded {
    pub model: TrainModel,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
}

/// Read a checkpoint directory, checking that its parts agree with each other.
pub fn load(dir: &Path) -> Result<Loaded> {
    let origin = dir.display().to_string();
    let state_path = dir.join("state.json");
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("checkpoint {origin}: cannot read state.json"))?,
    )
    .with_context(|| format!("checkpoint {origin}: state.json is corrupt"))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {origin}: format version {} (this lwm writes {FORMAT_VERSION})",
            state.format_version
        );
    }
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(file);
        candle_core::safetensors::load(&p, &Device::Cpu)
            .with_context(|| format!("checkpoint {origin}: {file} is missing or corrupt"))
    };
    let weights: BTreeMap<String, Tensor> = read("model.safetensors")?.into_iter().collect();
    let model = TrainModel::from_tensors(
        state.model.clone(),
        &weights,
        &format!("checkpoint {origin}"),
    )?;
    let optimizer = read("optimizer.safetensors")?;
    Ok(Loaded {
        model,
        optimizer,
        state,
    })
}
