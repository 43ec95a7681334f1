//! Per-cell results: scoring, and a JSONL file appended one line per finished cell so an
//! interrupted run resumes where it stopped.

use super::set::NeedleCase;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedleScore {
    pub city: String,
    pub number: u32,
    pub depth_percent: u32,
    pub retrieve: bool,
    /// The number appears in the answer (LWM: `str(rnd) in response`).
    pub found: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub id: String,
    pub context_length: usize,
    pub sample: usize,
    pub depth_percent: Option<u32>,
    pub needles: Vec<NeedleScore>,
    /// Every asked-for number appears.
    pub correct: bool,
    /// Fraction of the asked-for numbers that appear.
    pub score: f64,
    pub response: String,
    pub response_ids: Vec<u32>,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the previous cell's cache.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model for this cell.
    pub prefilled_tokens: usize,
    /// The model's trained context length, and whether this cell goes beyond it.
    pub trained_length: usize,
    pub beyond_trained_length: bool,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Score an answer: each needle is found when its number appears as a substring.
pub fn score(case: &NeedleCase, response: &str) -> (Vec<NeedleScore>, bool, f64) {
    let needles: Vec<NeedleScore> = case
        .needles
        .iter()
        .map(|n| NeedleScore {
            city: n.city.clone(),
            number: n.number,
            depth_percent: n.depth_percent,
            retrieve: n.retrieve,
            found: response.contains(&n.number.to_string()),
        })
        .collect();
    let asked: Vec<&NeedleScore> = needles.iter().filter(|n| n.retrieve).collect();
    let found = asked.iter().filter(|n| n.found).count();
    let correct = found == asked.len();
    let score = found as f64 / asked.len().max(1) as f64;
    (needles, correct, score)
}

/// The results file of a run directory.
pub struct ResultsFile {
    pub path: PathBuf,
}

/// What reading a results file found.
pub struct Loaded {
    pub results: Vec<CellResult>,
    /// A note when an incomplete last line (an interrupted write) was set aside.
    pub repaired: Option<String>,
}

impl ResultsFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Read all finished cells. An incomplete last line (the process was killed while
    /// writing it) is moved to `<file>.partial` and dropped from the file, so that cell is
    /// recomputed; any other unreadable line is an error that changes nothing.
    pub fn load_for_resume(&self) -> Result<Loaded> {
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
                    "{}: the last line was cut off (an interrupted write); it was moved to {} and that cell will be run again ({} finished cells kept)",
                    self.path.display(),
                    aside.display(),
                    results.len()
                ))
            }
        };
        Ok(Loaded { results, repaired })
    }

    /// Read without changing anything (for `report`); an incomplete last line is skipped.
    pub fn load(&self) -> Result<Vec<CellResult>> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("cannot read results {}", self.path.display()))?;
        Ok(parse(&self.path, &bytes)?.0)
    }

    /// Append one finished cell and push it to disk before the next cell starts.
    pub fn append(&self, r: &CellResult) -> Result<()> {
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

/// Parse results; returns them and, when only the last line is broken and lacks its
/// newline, the byte length of the good part.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<CellResult>, Option<usize>)> {
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
        match serde_json::from_slice::<CellResult>(line) {
            Ok(r) => {
                if !seen.insert(r.id.clone()) {
                    bail!(
                        "{} line {line_no}: cell {} appears twice; the file was edited or two runs wrote to it",
                        path.display(),
                        r.id
                    );
                }
                results.push(r);
            }
            Err(e) if end.is_none() => {
                // The last line without its newline: a write that was cut off.
                let _ = e;
                return Ok((results, Some(pos)));
            }
            Err(e) => bail!(
                "{} line {line_no} is not a valid result ({e}); the file is corrupted: fix or delete that line (nothing was changed)",
                path.display()
            ),
        }
        pos = next;
    }
    Ok((results, None))
}

/// Check that results belong to the set's cases.
pub fn check_against_set(results: &[CellResult], cases: &[NeedleCase], path: &Path) -> Result<()> {
    let ids: HashSet<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    if let Some(r) = results.iter().find(|r| !ids.contains(r.id.as_str())) {
        bail!(
            "{} holds cell {} which is not in this run's set; the directory belongs to another run (use a new --out)",
            path.display(),
            r.id
        );
    }
    Ok(())
}
