//! A RULER-style long-context suite (Hsieh et al. 2024, NVIDIA/RULER): its synthetic
//! tasks — needle retrieval (single, multi-key, multi-value, multi-query; noise, prose and
//! distractor-needle haystacks), variable tracking, common- and frequent-words extraction
//! — generated for the model's tokenizer and chat format, run greedily, scored as RULER
//! scores them, and summarized per task and length with the average, the effective
//! length and RULER's weighted averages.
//!
//! - [`tasks`]: the 13 tasks, templates, answer budgets and metrics.
//! - [`synth`]: seeded sample generation cut to a token length.
//! - [`score`]: RULER's post-processing and string-match metrics.
//! - [`run`]: the greedy loop; results appended one line per sample (resumable).
//! - [`report`]: summary JSON, terminal table, comparison table, chart.
//! - [`input`]: RULER's own task files in, predictions (`pred`) out.

pub mod input;
pub mod report;
pub mod run;
pub mod score;
pub mod synth;
pub mod tasks;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Files of a run directory.
pub const PARAMS_FILE: &str = "params.json";
pub const SAMPLES_FILE: &str = "samples.jsonl";
pub const RESULTS_FILE: &str = "results.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const CHART_FILE: &str = "scores.png";

/// What makes a run: its grid and everything that changes a sample or an answer. A run
/// directory resumes only with the same identity; the grid (tasks, lengths, samples) may
/// grow, since every sample is drawn from its own (seed, task, length, index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunParams {
    pub model: String,
    pub tasks: Vec<String>,
    pub context_lengths: Vec<usize>,
    pub samples: usize,
    pub seed: u64,
    pub haystack: String,
    pub chat_format: String,
    /// KV element types and policy, e.g. "f16" and "full".
    pub kv_type: String,
    pub kv_policy: String,
    pub threshold: f64,
}

impl RunParams {
    /// The run's label in comparison tables.
    pub fn label(&self) -> String {
        format!("kv {} / {}", self.kv_type, self.kv_policy)
    }

    fn identity(&self) -> impl PartialEq + '_ {
        (
            &self.model,
            self.seed,
            &self.haystack,
            &self.chat_format,
            &self.kv_type,
            &self.kv_policy,
        )
    }

    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(PARAMS_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let v = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a RULER run's parameters (corrupt or from another tool)",
                p.display()
            )
        })?;
        Ok(Some(v))
    }

    /// Write the parameters, or check them against the run already in `dir`.
    pub fn write_or_check(&self, dir: &Path) -> Result<()> {
        if let Some(old) = Self::read(dir)? {
            if old.identity() != self.identity() {
                bail!(
                    "{} holds a run with other settings ({}); repeat its model, --seed, --haystack, chat format, --kv-type and --kv-policy to resume it, or use a new --out",
                    dir.display(),
                    serde_json::to_string(&old)?
                );
            }
        }
        let p = dir.join(PARAMS_FILE);
        std::fs::write(&p, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", p.display()))
    }
}

pub type SamplesFile = crate::jsonl::JsonlLog<synth::Sample>;
pub type ResultsFile = crate::jsonl::JsonlLog<run::SampleResult>;

/// Re-read a run directory; write `summary.json` and `scores.png`.
pub fn write_report(dir: &Path) -> Result<report::Summary> {
    let Some(p) = RunParams::read(dir)? else {
        bail!(
            "{} has no {PARAMS_FILE}: not a RULER run directory (made by `lwm eval ruler --out DIR`)",
            dir.display()
        );
    };
    let rp = dir.join(RESULTS_FILE);
    let results = if rp.exists() {
        ResultsFile::new(&rp).load()?
    } else {
        Vec::new()
    };
    let s = report::summarize(
        &p.model,
        &p.label(),
        &p.tasks,
        &p.context_lengths,
        p.samples,
        &results,
        p.threshold,
    );
    let path = dir.join(SUMMARY_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&s)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    let model = Path::new(&p.model)
        .file_name()
        .map_or(p.model.clone(), |f| f.to_string_lossy().into_owned());
    report::write_png(
        &s,
        &format!(
            "RULER: {model}, {} ({} samples per cell)",
            p.label(),
            p.samples
        ),
        &dir.join(CHART_FILE),
    )?;
    Ok(s)
}
