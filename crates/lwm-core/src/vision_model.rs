//! LWM's vision-language model (`lwm/vision_llama.py`): a second embedding table `vte` and a
//! second head `vision_head` (both `vision_vocab_size` = 8448 rows) around the shared
//! transformer. Per position, the vision mask picks the table:
//! `emb = wte(id)·(1−m) + vte(id)·m`, and both heads can be read at every position.
//!
//! Vision ids are a separate id space: 0..8191 VQGAN codes (no offset), 8192 end of frame,
//! 8193 end of vision. A frame is its 16×16 codes row-major plus one of those two markers.

use crate::kv::KvCache;
use crate::model::{split_rows, Model, SeqInput};
use anyhow::{bail, Context, Result};

/// End of frame (`eof_token` in data.py).
pub const END_OF_FRAME: u32 = 8192;
/// End of the vision block (`eov_token`).
pub const END_OF_VISION: u32 = 8193;
/// Codes in a frame (16×16) and tokens per frame (codes + end marker).
pub const FRAME_CODES: usize = 256;
pub const FRAME_TOKENS: usize = FRAME_CODES + 1;

/// Which heads to evaluate (the original's `sample_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    Text,
    Vision,
    Both,
}

/// Logits of a mixed forward: either may be empty when not requested.
pub struct MixedLogits {
    pub text: Vec<f32>,
    pub vision: Vec<f32>,
}

/// Set in the ids a KV cache records for vision positions, so a vision code never matches
/// a text token with the same number in prefix reuse (no vocabulary comes near 2³¹).
pub const VISION_KEY: u32 = 1 << 31;

/// The id a KV cache records for a prompt position (what prefix reuse compares).
pub fn cache_key(id: u32, vision: bool) -> u32 {
    if vision {
        VISION_KEY | id
    } else {
        id
    }
}

/// `cache_key` of every position of `ids` under `vision_mask`.
pub fn cache_keys(ids: &[u32], vision_mask: &[bool]) -> Vec<u32> {
    ids.iter()
        .zip(vision_mask)
        .map(|(&id, &m)| cache_key(id, m))
        .collect()
}

impl Model {
    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    /// Embedding rows of `ids`: `vte` where `vision_mask` is set, `wte` elsewhere (an id
    /// outside its table's vocabulary is an error naming its position).
    pub(crate) fn embed_mixed(&self, ids: &[u32], vision_mask: &[bool]) -> Result<Vec<f32>> {
        let vision = self.vision.as_ref().context(
            "this model has no vision embedding/head (not an LWM vision-language checkpoint)",
        )?;
        if ids.len() != vision_mask.len() {
            bail!(
                "{} ids but {} vision-mask entries",
                ids.len(),
                vision_mask.len()
            );
        }
        let c = &self.config;
        let h = c.hidden_size;
        let mut x = vec![0.0f32; ids.len() * h];
        for (i, (&id, &m)) in ids.iter().zip(vision_mask).enumerate() {
            let (table, limit) = if m {
                (&vision.embed, c.vision_vocab_size)
            } else {
                (self.embed_table(), c.vocab_size)
            };
            if id as usize >= limit {
                bail!(
                    "{} id {id} at position {i} is outside the {} vocabulary of {limit}",
                    if m { "vision" } else { "text" },
                    if m { "vision" } else { "text" }
                );
            }
            x[i * h..(i + 1) * h].copy_from_slice(&table.rows(&[id])?);
        }
        Ok(x)
    }

    /// Forward `ids` with per-position `vision_mask` (true: a vision id, embedded with `vte`),
    /// returning the requested heads' logits for the last position or every position.
    pub fn forward_mixed(
        &self,
        ids: &[u32],
        vision_mask: &[bool],
        cache: &mut KvCache,
        heads: Heads,
        all_logits: bool,
    ) -> Result<MixedLogits> {
        let mut out = self.forward_mixed_batch(
            &mut [SeqInput {
                ids,
                cache,
                all_logits,
                vision: Some(vision_mask),
            }],
            heads,
        )?;
        out.pop().context("forward_mixed: no output")
    }

    /// `forward_mixed` for several sequences in one step (`forward_batch`: every weight
    /// product once over all their rows, each row's result as if run alone), e.g. the
    /// conditional and unconditional rows of classifier-free guidance. A sequence without a
    /// mask is all text. On an error no cache keeps rows of this step.
    pub fn forward_mixed_batch(
        &self,
        seqs: &mut [SeqInput<'_>],
        heads: Heads,
    ) -> Result<Vec<MixedLogits>> {
        let vision = self.vision.as_ref().context(
            "this model has no vision embedding/head (not an LWM vision-language checkpoint)",
        )?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let pos0: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        let normed = self.hidden_batch(seqs)?;
        let head = |want: bool, linear| -> Result<Vec<Vec<f32>>> {
            if !want {
                return Ok(vec![Vec::new(); seqs.len()]);
            }
            let rows = self.apply_head(linear, &normed)?;
            Ok(split_rows(&rows, seqs, linear.out_dim()))
        };
        let out = head(heads != Heads::Vision, self.lm_head_linear()).and_then(|text| {
            let vision = head(heads != Heads::Text, &vision.head)?;
            Ok(text
                .into_iter()
                .zip(vision)
                .map(|(text, vision)| MixedLogits { text, vision })
                .collect())
        });
        if out.is_err() {
            for (s, p) in seqs.iter_mut().zip(pos0) {
                s.cache.truncate(p);
            }
        }
        out
    }
}

/// The token layout of frames in a prompt: each frame's codes, then END_OF_FRAME, except
/// the last frame which ends in END_OF_VISION. Returns (ids, vision mask = all true).
pub fn frame_tokens(frames: &[Vec<u32>]) -> Vec<u32> {
    let mut out = Vec::with_capacity(frames.iter().map(|f| f.len() + 1).sum());
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(f);
        out.push(if i + 1 == frames.len() {
            END_OF_VISION
        } else {
            END_OF_FRAME
        });
    }
    out
}
