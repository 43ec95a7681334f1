//! Per-cell results: scoring, and a JSONL file appended one line per finished cell so an
//! interrupted run resumes where it stopped.

use super::set::NeedleCase;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

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

/// The results file of a run directory: one JSON line per finished cell.
pub type ResultsFile = crate::jsonl::JsonlLog<CellResult>;
pub type Loaded = crate::jsonl::Loaded<CellResult>;

impl crate::jsonl::Keyed for CellResult {
    fn key(&self) -> &str {
        &self.id
    }
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
