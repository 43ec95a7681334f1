//! The haystack: real prose the needles hide in.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The bundled default: Genesis and Exodus of the King James Version (public domain; see
/// `crates/lwm/assets/README.md` for its source and license).
pub const DEFAULT_HAYSTACK: &str = include_str!("../../assets/haystack/kjv-genesis-exodus.txt");

/// Name recorded in sets and summaries for the default haystack.
pub const DEFAULT_HAYSTACK_NAME: &str = "default (KJV Genesis + Exodus, public domain)";

/// Loaded haystack text and a description of where it came from.
#[derive(Debug, Clone)]
pub struct Haystack {
    pub name: String,
    pub text: String,
}

impl Haystack {
    pub fn default_text() -> Self {
        Self {
            name: DEFAULT_HAYSTACK_NAME.to_string(),
            text: DEFAULT_HAYSTACK.to_string(),
        }
    }

    /// Concatenate the given files; a directory contributes its regular files in name
    /// order (like LWM concatenating consecutive PG-19 books). Empty `paths` gives the
    /// default haystack.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Ok(Self::default_text());
        }
        let mut files = Vec::new();
        for p in paths {
            if !p.exists() {
                bail!("haystack {} does not exist", p.display());
            }
            if p.is_dir() {
                let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                    .with_context(|| format!("cannot list haystack directory {}", p.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.is_file())
                    .collect();
                inner.sort();
                if inner.is_empty() {
                    bail!("haystack directory {} holds no files", p.display());
                }
                files.extend(inner);
            } else {
                files.push(p.clone());
            }
        }
        let mut parts = Vec::with_capacity(files.len());
        for f in &files {
            parts.push(read_text(f)?);
        }
        let text = parts.join("\n\n");
        if text.trim().is_empty() {
            bail!("the haystack ({}) is empty", describe(&files));
        }
        Ok(Self {
            name: describe(&files),
            text,
        })
    }
}

fn read_text(p: &Path) -> Result<String> {
    let bytes =
        std::fs::read(p).with_context(|| format!("cannot read haystack {}", p.display()))?;
    String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("haystack {} is not UTF-8 text: {e}", p.display()))
}

fn describe(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, ..] => format!("{} and {} more files", first.display(), files.len() - 1),
        [] => String::new(),
    }
}
