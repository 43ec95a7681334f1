//! An append-only JSONL log of finished work items (needle cells, RULER samples): each
//! item is pushed to disk before the next starts, so an interrupted run resumes where it
//! stopped and loses at most the item it was writing.

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// An item's identity within its run (each appears at most once in a log).
pub trait Keyed {
    fn key(&self) -> &str;
}

pub struct JsonlLog<T> {
    pub path: PathBuf,
    item: PhantomData<T>,
}

/// What reading a log found.
pub struct Loaded<T> {
    pub results: Vec<T>,
    /// A note when an incomplete last line (an interrupted write) was set aside.
    pub repaired: Option<String>,
}

impl<T: Serialize + DeserializeOwned + Keyed> JsonlLog<T> {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            item: PhantomData,
        }
    }

    /// Read all finished items. An incomplete last line (the process was killed while
    /// writing it) is moved to `<file>.partial` and dropped from the file, so that item is
    /// recomputed; any other unreadable line is an error that changes nothing.
    pub fn load_for_resume(&self) -> Result<Loaded<T>> {
        if !self.path.exists() {
            return Ok(Loaded {
                results: Vec::new(),
                repaired: None,
            });
        }
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("cannot read results {}", self.path.display()))?;
        let (results, bad_tail) = parse(&self.path, &bytes)?;
        let repaired = match bad_tail {
            None => None,
            Some(good_len) => {
                let aside = self.path.with_extension("jsonl.partial");
                std::fs::write(&aside, &bytes[good_len..])
                    .with_context(|| format!("cannot write {}", aside.display()))?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .with_context(|| format!("cannot repair {}", self.path.display()))?;
                f.set_len(good_len as u64)?;
                Some(format!(
                    "{}: the last line was cut off (an interrupted write); it was moved to {} and that item will be run again ({} finished items kept)",
                    self.path.display(),
                    aside.display(),
                    results.len()
                ))
            }
        };
        Ok(Loaded { results, repaired })
    }

    /// Read without changing anything (for reports); an incomplete last line is skipped.
    pub fn load(&self) -> Result<Vec<T>> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("cannot read results {}", self.path.display()))?;
        Ok(parse(&self.path, &bytes)?.0)
    }

    /// Append one finished item and push it to disk before the next one starts.
    pub fn append(&self, r: &T) -> Result<()> {
        let mut line = serde_json::to_vec(r)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

/// Parse a log; returns its items and, when only the last line is broken and lacks its
/// newline, the byte length of the good part.
fn parse<T: DeserializeOwned + Keyed>(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<T>, Option<usize>)> {
    let mut results = Vec::new();
    let mut seen = HashSet::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < bytes.len() {
        line_no += 1;
        let end = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i);
        let line = &bytes[pos..end.unwrap_or(bytes.len())];
        let next = end.map_or(bytes.len(), |e| e + 1);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            pos = next;
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(r) => {
                if !seen.insert(r.key().to_string()) {
                    bail!(
                        "{} line {line_no}: {} appears twice; the file was edited or two runs wrote to it",
                        path.display(),
                        r.key()
                    );
                }
                results.push(r);
            }
            // The last line without its newline: a write that was cut off.
            Err(_) if end.is_none() => return Ok((results, Some(pos))),
            Err(e) => bail!(
                "{} line {line_no} is not a valid result ({e}); the file is corrupted: fix or delete that line (nothing was changed)",
                path.display()
            ),
        }
        pos = next;
    }
    Ok((results, None))
}
