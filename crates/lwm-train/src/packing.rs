//! Masked sequence packing: several documents per row, each its own segment (attention never
//! crosses a boundary) with positions restarting at 0, so a packed row computes exactly what
//! its documents compute one by one.
//!
//! A document of n tokens gives n − 1 (input, target) pairs. Rows take pairs in order; with
//! `split_documents` a document that does not fit continues in the next row as a new
//! segment (positions restart); without it the rest of the row is padding (loss 0, its own
//! segment) and the document starts the next row (cut to one row if longer).

pub use super::batch::Batch;

use super::batch::BatchInput;
use super::data::{DataPosition, Document, DocumentReader};
use super::loss::Targets;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Segment id of padding slots.
pub const PAD_SEGMENT: u32 = u32::MAX;

/// Packer state beyond the reader's position: the unfinished document (saved in checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PackerState {
    pub reader: DataPosition,
    pub pending: Option<(Document, usize)>,
}

pub struct Packer {
    pub seq_len: usize,
    pub batch: usize,
    pub split_documents: bool,
    /// Emit vision masks on every batch (vision models: the loss is 0.5·(vision + text)
    /// even when a batch holds no vision token).
    pub vision: bool,
    pending: Option<(Document, usize)>,
}

/// Row under construction.
#[derive(Default)]
struct Row {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
    in_vision: Vec<bool>,
    targets: Vec<u32>,
    loss: Vec<f32>,
    out_vision: Vec<bool>,
}

impl Row {
    /// Append pairs `from..to` of `doc` as segment `seg`.
    fn put(&mut self, doc: &Document, from: usize, to: usize, seg: u32) {
        for (p, i) in (from..to).enumerate() {
            self.tokens.push(doc.tokens[i]);
            self.positions.push(p as u32);
            self.segments.push(seg);
            self.in_vision.push(doc.vision[i]);
            self.targets.push(doc.tokens[i + 1]);
            self.loss.push(doc.loss[i + 1]);
            self.out_vision.push(doc.vision[i + 1]);
        }
    }

    fn pad_to(&mut self, len: usize) {
        while self.tokens.len() < len {
            self.tokens.push(0);
            self.positions.push(0);
            self.segments.push(PAD_SEGMENT);
            self.in_vision.push(false);
            self.targets.push(0);
            self.loss.push(0.0);
            self.out_vision.push(false);
        }
    }
}

impl Packer {
    pub fn new(seq_len: usize, batch: usize, split_documents: bool) -> Self {
        Self {
            seq_len: seq_len.max(1),
            batch: batch.max(1),
            split_documents,
            vision: false,
            pending: None,
        }
    }

    pub fn state(&self, reader: &DocumentReader) -> PackerState {
        PackerState {
            reader: reader.position(),
            pending: self.pending.clone(),
        }
    }

    pub fn restore(&mut self, reader: &mut DocumentReader, state: PackerState) -> Result<()> {
        reader.seek(state.reader)?;
        self.pending = state.pending;
        Ok(())
    }

    fn next_doc(&mut self, reader: &mut DocumentReader) -> Result<(Document, usize)> {
        if let Some(p) = self.pending.take() {
            return Ok(p);
        }
        loop {
            let doc = reader.next_document()?;
            if doc.len() >= 2 {
                return Ok((doc, 0));
            }
        }
    }

    /// The next batch of `batch` rows × `seq_len` from `reader`.
    pub fn next_batch(&mut self, reader: &mut DocumentReader) -> Result<Batch> {
        let l = self.seq_len;
        let mut rows = Vec::with_capacity(self.batch);
        for _ in 0..self.batch {
            let mut row = Row::default();
            let mut seg = 0u32;
            while row.tokens.len() < l {
                let (doc, from) = self.next_doc(reader)?;
                let pairs = doc.len() - 1;
                let room = l - row.tokens.len();
                let left = pairs - from;
                if left <= room {
                    row.put(&doc, from, pairs, seg);
                } else if self.split_documents || row.tokens.is_empty() {
                    row.put(&doc, from, from + room, seg);
                    if self.split_documents {
                        self.pending = Some((doc, from + room));
                    }
                } else {
                    // Does not fit and must not be split: pad, start the next row with it.
                    self.pending = Some((doc, from));
                    row.pad_to(l);
                }
                seg += 1;
            }
            rows.push(row);
        }
        let b = self.batch;
        let cat = |f: &dyn Fn(&Row) -> Vec<u32>| -> Vec<u32> { rows.iter().flat_map(f).collect() };
        let any_vision = self.vision
            || rows
                .iter()
                .any(|r| r.in_vision.iter().chain(&r.out_vision).any(|&v| v));
        let input = BatchInput {
            batch: b,
            len: l,
            tokens: cat(&|r| r.tokens.clone()),
            positions: cat(&|r| r.positions.clone()),
            segment_ids: Some(cat(&|r| r.segments.clone())),
            vision_mask: any_vision
                .then(|| rows.iter().flat_map(|r| r.in_vision.clone()).collect()),
            shard: None,
        };
        let targets = Targets {
            tokens: cat(&|r| r.targets.clone()),
            loss_mask: rows.iter().flat_map(|r| r.loss.clone()).collect(),
            vision_mask: any_vision
                .then(|| rows.iter().flat_map(|r| r.out_vision.clone()).collect()),
        };
        Ok(Batch { input, targets })
    }
}
