//! What one training step reads: the model's input rows (`BatchInput`), where a rank's
//! columns sit in the whole rows when the sequence is split over processes (`SeqShard`),
//! and a batch with its targets (`Batch`, as `packing` builds it).

use super::loss::Targets;
use std::sync::Arc;

/// One training batch row-major (batch × len): tokens, their positions and segment ids,
/// and which input tokens are vision codes (ids in the vision vocabulary).
#[derive(Debug, Clone)]
pub struct BatchInput {
    pub batch: usize,
    pub len: usize,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub segment_ids: Option<Vec<u32>>,
    pub vision_mask: Option<Vec<bool>>,
    /// Set when these are one rank's columns of longer rows (`seq_parallel::shard_batch`).
    pub shard: Option<SeqShard>,
}

impl BatchInput {
    /// One unpacked sequence per row: positions 0..len, one segment.
    pub fn plain(batch: usize, len: usize, tokens: Vec<u32>) -> Self {
        let positions = (0..batch * len).map(|i| (i % len) as u32).collect();
        Self {
            batch,
            len,
            tokens,
            positions,
            segment_ids: None,
            vision_mask: None,
            shard: None,
        }
    }
}

/// Where a sharded batch's columns sit in the whole rows, and what attention needs of them.
#[derive(Debug, Clone)]
pub struct SeqShard {
    /// First column of this shard (rank · S).
    pub offset: usize,
    /// Columns of the whole rows (S · sp).
    pub full_len: usize,
    /// Segment ids of the whole rows (batch × full_len): key blocks from other ranks are
    /// masked by them.
    pub full_segment_ids: Option<Arc<Vec<u32>>>,
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub input: BatchInput,
    pub targets: Targets,
}

impl Batch {
    /// Positions with a non-zero loss weight.
    pub fn loss_tokens(&self) -> usize {
        self.targets.loss_mask.iter().filter(|&&w| w > 0.0).count()
    }
}
