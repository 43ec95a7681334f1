//! Aggregation of cell results into the length x depth grid: summary JSON and the
//! terminal table.

use super::results::CellResult;
use super::set::SetHeader;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Accuracy of one (length, depth) cell over its samples (and, multi-needle, over the
/// asked-for needles that sat at that depth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridCell {
    pub context_length: usize,
    pub depth_percent: u32,
    pub asked: usize,
    pub found: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthRow {
    pub context_length: usize,
    pub asked: usize,
    pub found: usize,
    pub accuracy: f64,
    pub beyond_trained_length: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub chat_format: String,
    pub haystack: String,
    pub needles: usize,
    pub retrieve: usize,
    pub samples: usize,
    pub seed: u64,
    pub context_lengths: Vec<usize>,
    pub depths: Vec<u32>,
    pub trained_length: Option<usize>,
    pub cells_total: usize,
    pub cells_done: usize,
    /// Fraction of prompts whose every asked-for number appeared.
    pub prompts_correct: f64,
    /// Fraction of asked-for needles found.
    pub accuracy: f64,
    pub per_length: Vec<LengthRow>,
    pub grid: Vec<GridCell>,
    /// Prompt tokens over all cells, and those actually run through the model (the rest
    /// came from the shared-prefix KV cache).
    pub tokens_evaluated: usize,
    pub tokens_prefilled: usize,
    pub tokens_generated: usize,
    /// Model time summed over cells (prefill + decode).
    pub model_secs: f64,
}

pub fn summarize(header: &SetHeader, cells_total: usize, results: &[CellResult]) -> Summary {
    let p = &header.needle_set;
    let mut grid: BTreeMap<(usize, u32), (usize, usize)> = BTreeMap::new();
    let mut lengths: BTreeMap<usize, (usize, usize, bool)> = BTreeMap::new();
    for r in results {
        for n in r.needles.iter().filter(|n| n.retrieve) {
            let g = grid.entry((r.context_length, n.depth_percent)).or_default();
            g.0 += 1;
            g.1 += n.found as usize;
            let l = lengths.entry(r.context_length).or_default();
            l.0 += 1;
            l.1 += n.found as usize;
            l.2 |= r.beyond_trained_length;
        }
    }
    let ratio = |f: usize, a: usize| if a == 0 { 0.0 } else { f as f64 / a as f64 };
    let asked: usize = lengths.values().map(|l| l.0).sum();
    let found: usize = lengths.values().map(|l| l.1).sum();
    Summary {
        model: header.model.clone(),
        chat_format: header.chat_format.clone(),
        haystack: p.haystack.clone(),
        needles: p.needles,
        retrieve: p.retrieve,
        samples: p.samples,
        seed: p.seed,
        context_lengths: p.context_lengths.clone(),
        depths: p.depths.clone(),
        trained_length: results.first().map(|r| r.trained_length),
        cells_total,
        cells_done: results.len(),
        prompts_correct: ratio(results.iter().filter(|r| r.correct).count(), results.len()),
        accuracy: ratio(found, asked),
        per_length: lengths
            .iter()
            .map(|(&context_length, &(a, f, beyond))| LengthRow {
                context_length,
                asked: a,
                found: f,
                accuracy: ratio(f, a),
                beyond_trained_length: beyond,
            })
            .collect(),
        grid: grid
            .iter()
            .map(|(&(context_length, depth_percent), &(a, f))| GridCell {
                context_length,
                depth_percent,
                asked: a,
                found: f,
                accuracy: ratio(f, a),
            })
            .collect(),
        tokens_evaluated: results.iter().map(|r| r.prompt_tokens).sum(),
        tokens_prefilled: results.iter().map(|r| r.prefilled_tokens).sum(),
        tokens_generated: results.iter().map(|r| r.response_ids.len()).sum(),
        model_secs: results.iter().map(|r| r.prefill_secs + r.decode_secs).sum(),
    }
}

impl Summary {
    pub fn cell(&self, length: usize, depth: u32) -> Option<&GridCell> {
        self.grid
            .iter()
            .find(|g| g.context_length == length && g.depth_percent == depth)
    }

    fn beyond(&self, length: usize) -> bool {
        self.trained_length.is_some_and(|t| length > t)
    }

    /// Depth rows x length columns of accuracy in percent; `-` where nothing was asked,
    /// `*` marks lengths beyond the trained context.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "{:>9} |", "depth %");
        for &l in &self.context_lengths {
            let mark = if self.beyond(l) { "*" } else { "" };
            let _ = write!(s, " {:>7}", format!("{l}{mark}"));
        }
        s.push('\n');
        let _ = writeln!(s, "{}", "-".repeat(11 + 8 * self.context_lengths.len()));
        for &d in &self.depths {
            let _ = write!(s, "{d:>9} |");
            for &l in &self.context_lengths {
                match self.cell(l, d) {
                    Some(g) => {
                        let _ = write!(s, " {:>7.0}", g.accuracy * 100.0);
                    }
                    None => {
                        let _ = write!(s, " {:>7}", "-");
                    }
                }
            }
            s.push('\n');
        }
        let _ = write!(s, "{:>9} |", "all");
        for &l in &self.context_lengths {
            match self.per_length.iter().find(|r| r.context_length == l) {
                Some(r) => {
                    let _ = write!(s, " {:>7.0}", r.accuracy * 100.0);
                }
                None => {
                    let _ = write!(s, " {:>7}", "-");
                }
            }
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "accuracy {:.1}% of asked needles ({} of {} cells done); tokens: {} evaluated, {} prefilled ({:.0}% reused from the shared-prefix cache), {} generated",
            self.accuracy * 100.0,
            self.cells_done,
            self.cells_total,
            self.tokens_evaluated,
            self.tokens_prefilled,
            if self.tokens_evaluated == 0 {
                0.0
            } else {
                100.0 * (1.0 - self.tokens_prefilled as f64 / self.tokens_evaluated as f64)
            },
            self.tokens_generated
        );
        if let Some(t) = self.trained_length {
            if self.context_lengths.iter().any(|&l| l > t) {
                let _ = writeln!(s, "* beyond the model's trained context ({t} tokens)");
            }
        }
        s
    }
}
