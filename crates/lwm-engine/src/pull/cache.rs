//! What is cached (`lwm list`) and taking it away (`lwm rm`): the models directory under
//! `$LWM_HOME` (the default model) and the hub cache's model repos.

use super::hub::{gguf_groups, gguf_quant, labels, match_quant, snapshot_dir, walk_files, HubSpec};
use super::pypi::DEFAULT_WHEEL;
use super::PullSpec;
use crate::location::DEFAULT_MODEL_FILE;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Everything cached.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub models_dir: PathBuf,
    pub hub_cache: PathBuf,
    /// GGUF files in the models directory (the default model among them).
    pub models: Vec<LocalModel>,
    /// Model repos in the hub cache.
    pub repos: Vec<CachedRepo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LocalModel {
    /// What `--model` takes for it: `default`, or the path.
    pub spec: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub quant: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedRepo {
    /// `hf:ORG/NAME`.
    pub spec: String,
    pub repo: String,
    /// The commit `refs/main` names.
    pub commit: Option<String>,
    pub snapshot: Option<PathBuf>,
    /// `gguf`, `hf` (config.json + weights) or `other`.
    pub kind: String,
    /// Bytes of the snapshot's files.
    pub bytes: u64,
    /// The GGUF quants cached (`hf:ORG/NAME:QUANT` for each).
    pub quants: Vec<String>,
    pub files: Vec<CachedFile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedFile {
    pub path: String,
    pub bytes: u64,
    pub quant: Option<String>,
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// List the models directory and the hub cache (missing directories list as empty).
pub fn list(models_dir: &Path, hub_cache: &Path) -> Listing {
    let mut models: Vec<LocalModel> = std::fs::read_dir(models_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "gguf"))
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            LocalModel {
                spec: if name == DEFAULT_MODEL_FILE {
                    "default".into()
                } else {
                    p.display().to_string()
                },
                bytes: len(&p),
                quant: gguf_quant(&name),
                path: p,
            }
        })
        .collect();
    models.sort_by(|a, b| a.path.cmp(&b.path));
    let mut repos: Vec<CachedRepo> = std::fs::read_dir(hub_cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let name = dir.file_name()?.to_str()?.to_string();
            let (org, repo) = name.strip_prefix("models--")?.split_once("--")?;
            dir.is_dir().then(|| repo_entry(&dir, org, repo))
        })
        .collect();
    repos.sort_by(|a, b| a.repo.cmp(&b.repo));
    Listing {
        models_dir: models_dir.to_path_buf(),
        hub_cache: hub_cache.to_path_buf(),
        models,
        repos,
    }
}

fn repo_entry(dir: &Path, org: &str, name: &str) -> CachedRepo {
    let snapshot = snapshot_dir(dir);
    let names = snapshot.as_deref().map(walk_files).unwrap_or_default();
    let files: Vec<CachedFile> = names
        .iter()
        .map(|f| CachedFile {
            bytes: snapshot.as_deref().map(|s| len(&s.join(f))).unwrap_or(0),
            quant: gguf_quant(f),
            path: f.clone(),
        })
        .collect();
    let groups = gguf_groups(&names);
    let mut quants: Vec<String> = Vec::new();
    for g in &groups {
        if let Some(q) = &g.quant {
            if !quants.contains(q) {
                quants.push(q.clone());
            }
        }
    }
    let kind = if !groups.is_empty() {
        "gguf"
    } else if names.iter().any(|f| f == "config.json") {
        "hf"
    } else {
        "other"
    };
    CachedRepo {
        spec: format!("hf:{org}/{name}"),
        repo: format!("{org}/{name}"),
        commit: snapshot
            .as_ref()
            .and_then(|s| s.file_name())
            .map(|c| c.to_string_lossy().into_owned()),
        bytes: files.iter().map(|f| f.bytes).sum(),
        snapshot,
        kind: kind.into(),
        quants,
        files,
    }
}

/// Remove a cached model: the default model (and any partial download of it), a whole hub
/// repo, or one GGUF quant of a repo (its snapshot links, and the blobs no other link uses).
/// Returns what was removed; a model that is not cached is an error.
pub fn remove(spec: &PullSpec, models_dir: &Path, hub_cache: &Path) -> Result<Vec<PathBuf>> {
    match spec {
        PullSpec::Default => {
            let dest = models_dir.join(DEFAULT_MODEL_FILE);
            let wheel = models_dir.join(DEFAULT_WHEEL.filename);
            let mut removed = Vec::new();
            for p in [
                dest.clone(),
                with_suffix(&dest, ".part"),
                wheel.clone(),
                with_suffix(&wheel, ".part"),
            ] {
                if p.is_file() {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("cannot remove {}", p.display()))?;
                    removed.push(p);
                }
            }
            if removed.is_empty() {
                bail!(
                    "the default model is not cached ({} does not exist)",
                    dest.display()
                );
            }
            Ok(removed)
        }
        PullSpec::Hub(h) => {
            let dir = h.repo_dir(hub_cache);
            if !dir.is_dir() {
                bail!(
                    "{} is not in the local hub cache ({} does not exist)",
                    h.without_quant(),
                    dir.display()
                );
            }
            match &h.quant {
                None => {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("cannot remove {}", dir.display()))?;
                    Ok(vec![dir])
                }
                Some(q) => remove_quant(h, &dir, q),
            }
        }
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn snapshots(repo_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo_dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

fn remove_quant(h: &HubSpec, dir: &Path, q: &str) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut blobs = Vec::new();
    let mut cached = Vec::new();
    for snap in snapshots(dir) {
        let groups = gguf_groups(&walk_files(&snap));
        cached.push(labels(&groups));
        for g in match_quant(&groups, q) {
            for part in &g.parts {
                let link = snap.join(part);
                if let Ok(blob) = std::fs::canonicalize(&link) {
                    if blob != link {
                        blobs.push(blob);
                    }
                }
                std::fs::remove_file(&link)
                    .with_context(|| format!("cannot remove {}", link.display()))?;
                removed.push(link);
            }
        }
        remove_empty_dirs(&snap);
    }
    if removed.is_empty() {
        cached.retain(|c| !c.is_empty());
        bail!(
            "{}: no cached GGUF for quant {q}; cached: {}",
            h.without_quant(),
            if cached.is_empty() {
                "none".into()
            } else {
                cached.join(", ")
            }
        );
    }
    // Blobs no remaining link points at go too.
    let still_used: Vec<PathBuf> = snapshots(dir)
        .iter()
        .flat_map(|s| {
            walk_files(s)
                .into_iter()
                .filter_map(|f| std::fs::canonicalize(s.join(f)).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    blobs.sort();
    blobs.dedup();
    let canon_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    for b in blobs {
        if !still_used.contains(&b) && b.starts_with(&canon_dir) {
            std::fs::remove_file(&b).with_context(|| format!("cannot remove {}", b.display()))?;
            removed.push(b);
        }
    }
    if snapshots(dir).iter().all(|s| walk_files(s).is_empty()) {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        removed.push(dir.to_path_buf());
    }
    Ok(removed)
}

/// Remove the empty directories under `dir` (not `dir` itself).
fn remove_empty_dirs(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&p);
            let _ = std::fs::remove_dir(&p);
        }
    }
}
