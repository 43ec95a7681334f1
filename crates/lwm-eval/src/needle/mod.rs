//! Needle-in-a-haystack evaluation (LWM's `scripts/eval_needle.py` and
//! `eval_needle_multi.py`): build a reproducible set of long prompts with "magic number"
//! needles hidden at given depths of real prose, run them greedily through a model, score
//! whether each asked-for number appears in the answer, and draw a length x depth heatmap.
//!
//! - [`haystack`]: the prose (a bundled public-domain default, or the user's files).
//! - [`set`]: needles, depth placement at sentence boundaries, exact token counts, prompts.
//! - [`results`]: per-cell results as JSONL, appended one line per cell, resumable.
//! - [`run`]: the evaluation loop, ordered so consecutive prompts share their KV prefix.
//! - [`report`]: the summary (JSON), the terminal table and [`heatmap`] (PNG).

pub mod haystack;
pub mod heatmap;
pub mod report;
pub mod results;
pub mod run;
pub mod set;

use anyhow::{Context, Result};
use std::path::Path;

/// Files of a run directory.
pub const SET_FILE: &str = "set.jsonl";
pub const RESULTS_FILE: &str = "results.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const HEATMAP_FILE: &str = "heatmap.png";

/// The heatmap's title for a set.
pub fn title(header: &set::SetHeader) -> String {
    let model = Path::new(&header.model)
        .file_name()
        .map_or(header.model.clone(), |f| f.to_string_lossy().into_owned());
    let p = &header.needle_set;
    if p.is_multi() {
        format!(
            "Needle in a haystack: {model}, {} needles, {} asked ({} samples)",
            p.needles, p.retrieve, p.samples
        )
    } else {
        format!(
            "Needle in a haystack: {model}, single needle ({} sample{})",
            p.samples,
            if p.samples == 1 { "" } else { "s" }
        )
    }
}

/// Re-read a run directory's set and results; write `summary.json` and `heatmap.png`.
pub fn write_report(dir: &Path) -> Result<report::Summary> {
    let set_path = dir.join(SET_FILE);
    if !set_path.exists() {
        anyhow::bail!(
            "{} has no {SET_FILE}: not a needle run directory (made by `lwm needle run --out DIR`)",
            dir.display()
        );
    }
    let set = set::NeedleSet::read(&set_path)?;
    let results_path = dir.join(RESULTS_FILE);
    let results = if results_path.exists() {
        results::ResultsFile::new(&results_path).load()?
    } else {
        Vec::new()
    };
    results::check_against_set(&results, &set.cases, &results_path)?;
    let summary = report::summarize(&set.header, set.cases.len(), &results);
    let json = serde_json::to_string_pretty(&summary)?;
    let summary_path = dir.join(SUMMARY_FILE);
    std::fs::write(&summary_path, json + "\n")
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    heatmap::write_png(&summary, &title(&set.header), &dir.join(HEATMAP_FILE))?;
    Ok(summary)
}
