//! Training documents from the original's data formats.
//!
//! * `json` (LWM `TextProcessor`): one JSON object per line; `fields` is a comma list such as
//!   `[question],answer`: each field is tokenized in order, `a+b` joins sub-fields with a
//!   space, a field in brackets gets loss weight 0, `<|bos|>`/`<|eos|>` insert those tokens.
//!   The document is `BOS (loss 0) … EOS (loss 1)`.
//! * `json_vision` (LWM `VisionTextProcessor`): as above, but a field whose name contains
//!   `vision` holds a flat list of VQGAN codes, 256 per frame, laid out as
//!   `tok("<vision>")`, per frame 256 codes then `8192` (end of frame) or `8193` (end of
//!   vision, last frame), then `tok("</vision>")`; codes and eof/eov are vision tokens.
//! * `text`: every file is one plain-text document, `BOS … EOS`, all tokens weighted 1.
//!
//! Reading loops over the files forever (epochs), like the original's JSON loader, and its
//! position (file, byte offset, line, epoch) is saved in checkpoints for exact resume.
//! A malformed line is reported as `FILE:LINE: problem`; the policy skips it or stops.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

/// End-of-frame and end-of-vision codes of the vision vocabulary.
pub const EOF_TOKEN: u32 = 8192;
pub const EOV_TOKEN: u32 = 8193;
const CODES_PER_FRAME: usize = 256;

/// What turns text into ids (the model's tokenizer; tests use a byte tokenizer).
pub trait TextEncoder: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    fn bos(&self) -> u32;
    fn eos(&self) -> u32;
}

impl TextEncoder for lwm_core::tokenizer::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // No BOS: LWM's trained (Init) layout adds it once, explicitly.
        lwm_core::tokenizer::Tokenizer::encode(self, text, false, false)
    }
    fn bos(&self) -> u32 {
        self.bos_id().unwrap_or(1)
    }
    fn eos(&self) -> u32 {
        self.eos_id().unwrap_or(2)
    }
}

/// Bytes as tokens: id = byte + 3, BOS 1, EOS 2 (vocabulary 259). For synthetic tasks and tests.
pub struct ByteEncoder;

impl TextEncoder for ByteEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(|b| b as u32 + 3).collect())
    }
    fn bos(&self) -> u32 {
        1
    }
    fn eos(&self) -> u32 {
        2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Json,
    JsonVision,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    Skip,
    Stop,
}

/// One tokenized document: per token its id, the loss weight of predicting it, and whether
/// it is a vision code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub tokens: Vec<u32>,
    pub loss: Vec<f32>,
    pub vision: Vec<bool>,
}

impl Document {
    fn push(&mut self, ids: &[u32], loss: f32, vision: bool) {
        self.tokens.extend_from_slice(ids);
        self.loss.extend(std::iter::repeat_n(loss, ids.len()));
        self.vision.extend(std::iter::repeat_n(vision, ids.len()));
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Where reading stands (saved in checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub file_index: usize,
    pub byte_offset: u64,
    /// 1-based number of the last line read in the current file.
    pub line: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSpec {
    pub files: Vec<PathBuf>,
    pub format: DataFormat,
    /// `TextProcessor.fields` (json formats), e.g. `text` or `[question],answer`.
    #[serde(default = "default_fields")]
    pub fields: String,
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
}

fn default_fields() -> String {
    "text".into()
}

fn default_on_error() -> OnError {
    OnError::Stop
}

/// Turn one JSON record into a document (`TextProcessor` / `VisionTextProcessor`).
pub fn process_record(
    record: &serde_json::Value,
    fields: &str,
    vision: bool,
    enc: &dyn TextEncoder,
) -> Result<Document> {
    let obj = record
        .as_object()
        .ok_or_else(|| anyhow!("line is not a JSON object"))?;
    // A record may choose its own fields (vision format: "fields" key), else the spec's.
    let fields = match obj.get("fields") {
        Some(serde_json::Value::String(s)) if vision => s.clone(),
        _ => fields.to_string(),
    };
    let mut doc = Document::default();
    doc.push(&[enc.bos()], 0.0, false);
    for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (name, loss) = match field.strip_prefix('[').and_then(|f| f.strip_suffix(']')) {
            Some(inner) => (inner, 0.0),
            None => (field, 1.0),
        };
        match name {
            "<|bos|>" => doc.push(&[enc.bos()], loss, false),
            "<|eos|>" => doc.push(&[enc.eos()], loss, false),
            _ if vision && name.contains("vision") => {
                let codes = obj
                    .get(name)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| anyhow!("vision field '{name}' is missing or not a list"))?;
                let codes: Vec<u32> = codes
                    .iter()
                    .map(|c| {
                        c.as_u64()
                            .filter(|&c| c < EOF_TOKEN as u64)
                            .map(|c| c as u32)
                            .ok_or_else(|| {
                                anyhow!("vision field '{name}': {c} is not a code in 0..8192")
                            })
                    })
                    .collect::<Result<_>>()?;
                if codes.is_empty() || !codes.len().is_multiple_of(CODES_PER_FRAME) {
                    bail!(
                        "vision field '{name}' has {} codes, not a positive multiple of {CODES_PER_FRAME}",
                        codes.len()
                    );
                }
                doc.push(&enc.encode("<vision>")?, loss, false);
                let frames = codes.len() / CODES_PER_FRAME;
                for (j, frame) in codes.chunks(CODES_PER_FRAME).enumerate() {
                    doc.push(frame, loss, true);
                    let end = if j + 1 == frames {
                        EOV_TOKEN
                    } else {
                        EOF_TOKEN
                    };
                    doc.push(&[end], loss, true);
                }
                doc.push(&enc.encode("</vision>")?, loss, false);
            }
            _ => {
                let mut parts = Vec::new();
                for sub in name.split('+') {
                    let v = obj
                        .get(sub)
                        .ok_or_else(|| anyhow!("field '{sub}' is missing"))?;
                    parts.push(
                        v.as_str()
                            .ok_or_else(|| anyhow!("field '{sub}' is not a string"))?
                            .to_string(),
                    );
                }
                doc.push(&enc.encode(&parts.join(" "))?, loss, false);
            }
        }
    }
    doc.push(&[enc.eos()], 1.0, false);
    Ok(doc)
}

/// Endless document stream over the spec's files.
pub struct DocumentReader {
    spec: DataSpec,
    enc: Arc<dyn TextEncoder>,
    pos: DataPosition,
    reader: Option<BufReader<std::fs::File>>,
    /// Lines skipped as malformed (policy `skip`), with their `FILE:LINE: problem`.
    pub skipped: Vec<String>,
}

impl DocumentReader {
    pub fn new(spec: DataSpec, enc: Arc<dyn TextEncoder>) -> Result<Self> {
        if spec.files.is_empty() {
            bail!("no data files given");
        }
        for f in &spec.files {
            if !f.is_file() {
                bail!("data file {} does not exist", f.display());
            }
        }
        Ok(Self {
            spec,
            enc,
            pos: DataPosition::default(),
            reader: None,
            skipped: Vec::new(),
        })
    }

    pub fn position(&self) -> DataPosition {
        self.pos.clone()
    }

    /// Continue from a saved position.
    pub fn seek(&mut self, pos: DataPosition) -> Result<()> {
        if pos.file_index >= self.spec.files.len() {
            bail!(
                "saved data position names file #{} but only {} data files are configured",
                pos.file_index,
                self.spec.files.len()
            );
        }
        self.pos = pos;
        self.reader = None;
        Ok(())
    }

    fn file(&self) -> &PathBuf {
        &self.spec.files[self.pos.file_index]
    }

    fn next_file(&mut self) {
        self.reader = None;
        self.pos.file_index += 1;
        self.pos.byte_offset = 0;
        self.pos.line = 0;
        if self.pos.file_index == self.spec.files.len() {
            self.pos.file_index = 0;
            self.pos.epoch += 1;
        }
    }

    /// The next document (skipping empty and, by policy, malformed lines).
    pub fn next_document(&mut self) -> Result<Document> {
        let mut empty_files = 0;
        loop {
            if self.spec.format == DataFormat::Text {
                let path = self.file().clone();
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                self.next_file();
                if text.trim().is_empty() {
                    empty_files += 1;
                    if empty_files > self.spec.files.len() {
                        bail!("every data file is empty");
                    }
                    continue;
                }
                let mut doc = Document::default();
                doc.push(&[self.enc.bos()], 0.0, false);
                doc.push(&self.enc.encode(&text)?, 1.0, false);
                doc.push(&[self.enc.eos()], 1.0, false);
                return Ok(doc);
            }
            if self.reader.is_none() {
                let path = self.file().clone();
                let mut f = std::fs::File::open(&path)
                    .with_context(|| format!("opening data file {}", path.display()))?;
                f.seek(SeekFrom::Start(self.pos.byte_offset))?;
                self.reader = Some(BufReader::new(f));
            }
            let mut line = String::new();
            let n = self
                .reader
                .as_mut()
                .expect("opened above")
                .read_line(&mut line)
                .with_context(|| {
                    format!(
                        "{}:{}: cannot read line",
                        self.file().display(),
                        self.pos.line + 1
                    )
                })?;
            if n == 0 {
                if self.pos.line == 0 {
                    empty_files += 1;
                    if empty_files >= self.spec.files.len() {
                        bail!("the data files contain no records");
                    }
                }
                self.next_file();
                continue;
            }
            self.pos.byte_offset += n as u64;
            self.pos.line += 1;
            if line.trim().is_empty() {
                continue;
            }
            let vision = self.spec.format == DataFormat::JsonVision;
            let parsed = serde_json::from_str::<serde_json::Value>(&line)
                .map_err(|e| anyhow!("invalid JSON: {e}"))
                .and_then(|rec| process_record(&rec, &self.spec.fields, vision, self.enc.as_ref()));
            match parsed {
                Ok(doc) => return Ok(doc),
                Err(e) => {
                    let msg = format!("{}:{}: {e:#}", self.file().display(), self.pos.line);
                    match self.spec.on_error {
                        OnError::Stop => bail!("malformed data line {msg}"),
                        OnError::Skip => {
                            if self.skipped.len() < 1000 {
                                self.skipped.push(msg);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_follow_the_text_processor() {
        let rec = serde_json::json!({"q": "ab", "c": "d", "a": "x"});
        let doc = process_record(&rec, "[q+c],a", false, &ByteEncoder).unwrap();
        // BOS, "ab d" (loss 0), "x" (loss 1), EOS (loss 1).
        assert_eq!(doc.tokens, vec![1, 100, 101, 35, 103, 123, 2]);
        assert_eq!(doc.loss, vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn vision_frames_end_in_eof_and_eov() {
        let codes: Vec<u32> = (0..512).collect();
        let rec =
            serde_json::json!({"fields": "[vision],caption", "vision": codes, "caption": "c"});
        let doc = process_record(&rec, "", true, &ByteEncoder).unwrap();
        let open = "<vision>".len();
        let start = 1 + open;
        assert_eq!(doc.tokens[start + 256], EOF_TOKEN);
        assert_eq!(doc.tokens[start + 513], EOV_TOKEN);
        assert_eq!(doc.vision.iter().filter(|&&v| v).count(), 514);
        assert!(!doc.vision[start - 1] && doc.vision[start] && !doc.vision[start + 514]);
        let bad = serde_json::json!({"fields": "vision", "vision": [1, 2, 3]});
        let e = process_record(&bad, "", true, &ByteEncoder)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 256"), "{e}");
    }
}
