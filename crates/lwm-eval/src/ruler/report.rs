//! The summary of a run: per task and length scores (RULER's rounding), the average per
//! length, the effective length, RULER's weighted averages, KV bytes and speed; as JSON,
//! a terminal table and a PNG chart.

use super::run::SampleResult;
use super::score::round2;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// RULER's threshold: Llama-2-7B's average at 4K.
pub const DEFAULT_THRESHOLD: f64 = 85.6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Mean of the samples' scores, rounded to 2 decimals as RULER prints it.
    pub score: f64,
    pub samples: usize,
    /// Empty answers (RULER's "nulls").
    pub nulls: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    pub context_length: usize,
    /// Mean over the tasks, once every task has all its samples at this length (a partial
    /// average would mislead the effective length).
    pub average: Option<f64>,
    /// Tasks of the grid with results at this length.
    pub tasks_done: usize,
    /// Every task has all its samples at this length.
    pub complete: bool,
    pub mean_prompt_tokens: f64,
    /// Mean KV bytes held at the end of an answer.
    pub mean_kv_bytes: f64,
    pub prefill_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub label: String,
    pub tasks: Vec<String>,
    pub context_lengths: Vec<usize>,
    /// task -> context length -> cell.
    pub scores: BTreeMap<String, BTreeMap<usize, Cell>>,
    pub lengths: Vec<LengthStats>,
    pub threshold: f64,
    /// The longest length up to which every length's average stays at or above the
    /// threshold (None: already below at the shortest).
    pub effective_length: Option<usize>,
    /// RULER's weighted averages over lengths: weights growing (inc) or shrinking (dec)
    /// linearly with the length's rank.
    pub weighted_average_inc: Option<f64>,
    pub weighted_average_dec: Option<f64>,
    pub samples_done: usize,
    pub samples_total: usize,
}

pub fn summarize(
    model: &str,
    label: &str,
    tasks: &[String],
    lengths: &[usize],
    samples_per_cell: usize,
    results: &[SampleResult],
    threshold: f64,
) -> Summary {
    let mut scores: BTreeMap<String, BTreeMap<usize, Cell>> = BTreeMap::new();
    let mut done = 0;
    let mut stats = Vec::new();
    for &len in lengths {
        let at: Vec<&SampleResult> = results
            .iter()
            .filter(|r| r.context_length == len && tasks.contains(&r.task))
            .collect();
        done += at.len();
        let mut task_scores = Vec::new();
        let mut complete = true;
        for t in tasks {
            let rs: Vec<&&SampleResult> = at.iter().filter(|r| &r.task == t).collect();
            complete &= rs.len() >= samples_per_cell;
            if rs.is_empty() {
                continue;
            }
            let mean = rs.iter().map(|r| r.score).sum::<f64>() / rs.len() as f64;
            let cell = Cell {
                score: round2(mean),
                samples: rs.len(),
                nulls: rs.iter().filter(|r| r.pred.trim().is_empty()).count(),
            };
            task_scores.push(cell.score);
            scores.entry(t.clone()).or_default().insert(len, cell);
        }
        let n = at.len().max(1) as f64;
        let secs = |f: fn(&SampleResult) -> f64| at.iter().map(|r| f(r)).sum::<f64>();
        let prompt: usize = at.iter().map(|r| r.prompt_tokens).sum();
        let generated: usize = at.iter().map(|r| r.generated_tokens).sum();
        let rate = |tokens: usize, s: f64| if s > 0.0 { tokens as f64 / s } else { 0.0 };
        stats.push(LengthStats {
            context_length: len,
            average: (complete && !task_scores.is_empty())
                .then(|| round2(task_scores.iter().sum::<f64>() / task_scores.len() as f64)),
            tasks_done: task_scores.len(),
            complete,
            mean_prompt_tokens: prompt as f64 / n,
            mean_kv_bytes: at.iter().map(|r| r.kv_bytes as f64).sum::<f64>() / n,
            prefill_tokens_per_sec: rate(prompt, secs(|r| r.prefill_secs)),
            decode_tokens_per_sec: rate(generated, secs(|r| r.decode_secs)),
        });
    }
    let averages: Vec<Option<f64>> = stats.iter().map(|s| s.average).collect();
    let mut effective = None;
    for (s, a) in stats.iter().zip(&averages) {
        match a {
            Some(a) if *a >= threshold => effective = Some(s.context_length),
            _ => break,
        }
    }
    let weighted = |inc: bool| -> Option<f64> {
        let all: Option<Vec<f64>> = averages.iter().copied().collect();
        let all = all?;
        let n = all.len();
        if n == 0 {
            return None;
        }
        let w = |i: usize| if inc { (i + 1) as f64 } else { (n - i) as f64 };
        let total: f64 = (0..n).map(w).sum();
        Some(round2(
            all.iter().enumerate().map(|(i, a)| a * w(i)).sum::<f64>() / total,
        ))
    };
    Summary {
        model: model.to_string(),
        label: label.to_string(),
        tasks: tasks.to_vec(),
        context_lengths: lengths.to_vec(),
        scores,
        lengths: stats,
        threshold,
        effective_length: effective,
        weighted_average_inc: weighted(true),
        weighted_average_dec: weighted(false),
        samples_done: done,
        samples_total: tasks.len() * lengths.len() * samples_per_cell,
    }
}

impl Summary {
    pub fn effective_length_text(&self) -> String {
        match (self.effective_length, self.context_lengths.first()) {
            (Some(l), _) => l.to_string(),
            (None, Some(first)) => format!("< {first}"),
            (None, None) => "-".into(),
        }
    }

    /// The terminal table: tasks by lengths, the average, then the one-line verdict.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = self
            .tasks
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(4)
            .max(16);
        out += &format!("{:w$}", "task");
        for l in &self.context_lengths {
            out += &format!(" {l:>9}");
        }
        out += "\n";
        for t in &self.tasks {
            out += &format!("{t:w$}");
            for l in &self.context_lengths {
                match self.scores.get(t).and_then(|m| m.get(l)) {
                    Some(c) => out += &format!(" {:>9.2}", c.score),
                    None => out += &format!(" {:>9}", "-"),
                }
            }
            out += "\n";
        }
        out += &format!("{:w$}", "average");
        for s in &self.lengths {
            match s.average {
                Some(a) => out += &format!(" {a:>9.2}"),
                None => out += &format!(" {:>9}", "-"),
            }
        }
        out += "\n";
        out += &format!("{:w$}", "KV MiB (mean)");
        for s in &self.lengths {
            out += &format!(" {:>9.1}", s.mean_kv_bytes / 1048576.0);
        }
        out += "\n";
        out += &format!("{:w$}", "prefill tok/s");
        for s in &self.lengths {
            out += &format!(" {:>9.1}", s.prefill_tokens_per_sec);
        }
        out += "\n";
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        out += &format!(
            "effective length {} (average >= {}); weighted average inc {} dec {}; {}/{} samples\n",
            self.effective_length_text(),
            self.threshold,
            f(self.weighted_average_inc),
            f(self.weighted_average_dec),
            self.samples_done,
            self.samples_total
        );
        out
    }
}

/// One row per run of the comparison table (`lwm eval ruler-compare`): label, averages
/// per length, effective length, KV bytes at the longest length and speed.
pub fn compare_table(runs: &[Summary]) -> String {
    let mut lengths: Vec<usize> = runs
        .iter()
        .flat_map(|s| s.context_lengths.iter().copied())
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut out = String::from("| run |");
    for l in &lengths {
        out += &format!(" avg {l} |");
    }
    out += " effective length | wAvg inc / dec | KV MiB at longest complete length | prefill tok/s | decode tok/s |\n|---|";
    for _ in &lengths {
        out += "---|";
    }
    out += "---|---|---|---|---|\n";
    for s in runs {
        out += &format!("| {} |", s.label);
        for l in &lengths {
            let a = s
                .lengths
                .iter()
                .find(|x| x.context_length == *l)
                .and_then(|x| x.average);
            out += &a.map_or(" - |".to_string(), |a| format!(" {a:.1} |"));
        }
        let last = s.lengths.iter().rev().find(|x| x.complete);
        let mean = |f: fn(&LengthStats) -> f64| {
            let v: Vec<f64> = s.lengths.iter().filter(|x| x.complete).map(f).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        out += &format!(
            " {} | {} / {} | {:.1} | {:.1} | {:.1} |\n",
            s.effective_length_text(),
            f(s.weighted_average_inc),
            f(s.weighted_average_dec),
            last.map_or(0.0, |x| x.mean_kv_bytes / 1048576.0),
            mean(|x| x.prefill_tokens_per_sec),
            mean(|x| x.decode_tokens_per_sec),
        );
    }
    out
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 640;

/// Scores by length, one line per task, the average in black and the threshold dashed.
pub fn write_png(s: &Summary, title: &str, path: &Path) -> Result<()> {
    crate::plot::register_font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(s, title, &mut buf).map_err(|e| anyhow!("drawing the RULER chart: {e}"))?;
    crate::plot::write_rgb_png(path, &buf, WIDTH, HEIGHT)
}

fn draw(s: &Summary, title: &str, buf: &mut [u8]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = s.context_lengths.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0f64..101f64)?;
    let lengths = s.context_lengths.clone();
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                lengths
                    .get(i as usize)
                    .map_or(String::new(), |l| l.to_string())
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE)
        .x_desc("context length (tokens)")
        .y_desc("score (%)")
        .draw()?;
    for (k, t) in s.tasks.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = s
            .context_lengths
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                s.scores
                    .get(t)
                    .and_then(|m| m.get(l))
                    .map(|c| (i as f64, c.score))
            })
            .collect();
        chart
            .draw_series(std::iter::once(PathElement::new(
                pts.clone(),
                color.stroke_width(2),
            )))?
            .label(t.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    let avg: Vec<(f64, f64)> = s
        .lengths
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.average.map(|a| (i as f64, a)))
        .collect();
    chart
        .draw_series(std::iter::once(PathElement::new(
            avg,
            BLACK.stroke_width(4),
        )))?
        .label("average")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(4)));
    let th = s.threshold;
    let dashes: Vec<PathElement<(f64, f64)>> = (0..(n * 20))
        .map(|i| {
            let x0 = -0.3 + i as f64 * (n as f64 - 0.4) / (n * 20) as f64;
            let x1 = x0 + 0.5 * (n as f64 - 0.4) / (n * 20) as f64;
            PathElement::new(vec![(x0, th), (x1, th)], RED.stroke_width(1))
        })
        .collect();
    chart
        .draw_series(dashes)?
        .label(format!("threshold {th}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
