//! RULER's own data files: one JSON object a line with `index`, `input`, `outputs` (and
//! usually `length`, `answer_prefix`), as its `prepare.py` writes them. Each line is run
//! as `input + answer_prefix` and written back with a `pred` field (every other field
//! kept), the file RULER's `evaluate.py` reads, so a set made by RULER scores the same
//! through lwm as through RULER.

use super::score::{round2, score};
use super::tasks::metric_for_name;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of a RULER task file.
#[derive(Debug, Clone)]
pub struct InputLine {
    pub index: i64,
    pub input: String,
    pub answer_prefix: String,
    pub outputs: Vec<String>,
    /// The whole object, written back with `pred`.
    pub raw: Map<String, Value>,
}

/// The task a file holds: RULER writes `<save_dir>/<task>/validation.jsonl`; any other
/// file is named after itself.
pub fn task_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if matches!(stem.as_str(), "validation" | "test") {
        if let Some(dir) = path.parent().and_then(|p| p.file_name()) {
            return dir.to_string_lossy().into_owned();
        }
    }
    stem
}

pub fn read(path: &Path) -> Result<Vec<InputLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read RULER file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{} is not JSON", at()))?;
        let Value::Object(raw) = v else {
            bail!("{} is not a JSON object", at());
        };
        let index = raw
            .get("index")
            .and_then(Value::as_i64)
            .with_context(|| format!("{} has no integer 'index'", at()))?;
        let input = raw
            .get("input")
            .and_then(Value::as_str)
            .with_context(|| format!("{} has no string 'input'", at()))?
            .to_string();
        let outputs = match raw.get("outputs") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{}: 'outputs' must be a list of strings", at()))?,
            _ => bail!("{} has no 'outputs' list", at()),
        };
        let answer_prefix = match raw.get("answer_prefix") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => bail!("{}: 'answer_prefix' must be a string", at()),
        };
        out.push(InputLine {
            index,
            input,
            answer_prefix,
            outputs,
            raw,
        });
    }
    if out.is_empty() {
        bail!("{} holds no samples", path.display());
    }
    Ok(out)
}

/// The prediction file of `task` in `out_dir` (`<task>.jsonl`, as RULER's call_api.py
/// names it).
pub fn pred_path(out_dir: &Path, task: &str) -> PathBuf {
    out_dir.join(format!("{task}.jsonl"))
}

/// How many of `lines` the prediction file already answers. Predictions are written in
/// the input's order, so they are its first lines; each must carry its line's `index`
/// (RULER's generators may repeat an index, so the position is what identifies a line).
/// A cut-off last line (an interrupted write) is dropped from the file and rerun; any
/// other unreadable or foreign line is an error that changes nothing.
pub fn done_count(path: &Path, lines: &[InputLine]) -> Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut good, mut done) = (0, 0);
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Value>(line) {
            Ok(v) if v.get("pred").is_some() => {
                let idx = v.get("index").and_then(Value::as_i64);
                if lines.get(done).map(|l| l.index) != idx {
                    bail!(
                        "{} line {} answers index {idx:?}, not the input's line {} (index {:?}); it belongs to another input file: use another --out",
                        path.display(),
                        i + 1,
                        done + 1,
                        lines.get(done).map(|l| l.index)
                    );
                }
                done += 1;
                good += line.len();
            }
            _ if !complete => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(good as u64)?;
                break;
            }
            _ => bail!(
                "{} line {} is not a prediction (no 'pred'); the file is corrupted: fix or delete that line (nothing was changed)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(done)
}

/// Append one prediction line.
pub fn append_pred(path: &Path, line: &InputLine, pred: &str) -> Result<()> {
    let mut obj = line.raw.clone();
    obj.insert("pred".into(), Value::String(pred.to_string()));
    let mut bytes = serde_json::to_vec(&Value::Object(obj))?;
    bytes.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_data())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// RULER's score of a prediction file: (score rounded to 2 decimals, nulls, samples).
pub fn score_file(path: &Path, task: &str) -> Result<(f64, usize, usize)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let metric = metric_for_name(task);
    let (mut sum, mut nulls, mut n) = (0.0, 0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        let pred = v.get("pred").and_then(Value::as_str).unwrap_or("");
        let refs: Vec<String> = v
            .get("outputs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        sum += score(metric, pred, &refs);
        nulls += super::score::postprocess(pred).is_empty() as usize;
        n += 1;
    }
    Ok((round2(sum / n.max(1) as f64), nulls, n))
}
