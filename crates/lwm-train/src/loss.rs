//! LWM's training loss (train.py + tux `cross_entropy_loss_and_accuracy`).
//!
//! ```text
//!   nll_t      = logsumexp(logits_t) − logits_t[target_t]
//!   row_loss_b = Σ_t w_bt · nll_bt / max(Σ_t w_bt, 1e-10)     (normalised per sequence)
//!   loss       = mean_b row_loss_b                             (empty rows count as 0)
//! ```
//!
//! Vision-text batches score vision targets with the vision head and text targets with the
//! text head (the head is chosen by the *target's* modality) and weight them equally:
//! `loss = 0.5 · (vision_loss + text_loss)`, as the original.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

/// Targets of one batch (batch × len, row-major).
#[derive(Debug, Clone)]
pub struct Targets {
    pub tokens: Vec<u32>,
    /// Loss weight per target (0 for prompts, padding and document starts of a packed row).
    pub loss_mask: Vec<f32>,
    /// Which targets are vision codes (vision models only).
    pub vision_mask: Option<Vec<bool>>,
}

/// Per-token negative log-likelihood (batch, len) of `targets` under `logits` (batch, len, V).
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    if targets.len() != b * l {
        bail!("{} targets for a {b} × {l} batch", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("target token {bad} is outside the vocabulary of {v}");
    }
    // Stable log-sum-exp: the max is a constant for the gradient.
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &m)?;
    let idx = Tensor::from_vec(targets.to_vec(), (b, l, 1), &Device::Cpu)?;
    let picked = logits.gather(&idx, 2)?;
    Ok((lse - picked)?.squeeze(2)?)
}

/// Per-sequence-normalised weighted mean of `nll` (batch, len) with weights `w`, each row
/// divided by the total weight of the whole row `full_w` (batch × full_len): `w` itself
/// for a whole batch, the full rows for one rank's shard of them.
fn weighted_mean(nll: &Tensor, w: Vec<f32>, full_w: &[f32]) -> Result<Tensor> {
    let (b, l) = nll.dims2()?;
    if w.len() != b * l || !full_w.len().is_multiple_of(b.max(1)) {
        bail!(
            "loss weights of {} / {} values for a {b} × {l} batch",
            w.len(),
            full_w.len()
        );
    }
    let counts: Vec<f32> = full_w
        .chunks(full_w.len() / b.max(1))
        .map(|r| r.iter().sum::<f32>().max(1e-10))
        .collect();
    let w = Tensor::from_vec(w, (b, l), &Device::Cpu)?;
    let counts = Tensor::from_vec(counts, (b, 1), &Device::Cpu)?;
    Ok((nll * w)?
        .sum_keepdim(1)?
        .broadcast_div(&counts)?
        .mean_all()?)
}

/// The training loss of one batch.
pub fn lwm_loss(
    text_logits: &Tensor,
    vision_logits: Option<&Tensor>,
    t: &Targets,
) -> Result<Tensor> {
    lwm_loss_shard(text_logits, vision_logits, t, t)
}

/// One rank's part of the loss when the batch's rows are split across ranks
/// (`seq_parallel`): `t` are this rank's columns, `full` the whole batch's targets, which
/// set each row's normalisation. The ranks' parts add up to `lwm_loss` of the whole batch.
pub fn lwm_loss_shard(
    text_logits: &Tensor,
    vision_logits: Option<&Tensor>,
    t: &Targets,
    full: &Targets,
) -> Result<Tensor> {
    // The weights of targets of one modality (the other's weights become 0).
    let modality = |t: &Targets, vision: bool| -> Vec<f32> {
        match &t.vision_mask {
            None => t.loss_mask.clone(),
            Some(vm) => t
                .loss_mask
                .iter()
                .zip(vm)
                .map(|(&w, &m)| if m == vision { w } else { 0.0 })
                .collect(),
        }
    };
    if t.vision_mask.is_some() != full.vision_mask.is_some() {
        bail!("a shard's targets and the whole batch's disagree on having vision targets");
    }
    match (&t.vision_mask, vision_logits) {
        (None, _) => weighted_mean(
            &token_nll(text_logits, &t.tokens)?,
            t.loss_mask.clone(),
            &full.loss_mask,
        ),
        (Some(vm), Some(vl)) => {
            // Each head sees its own modality's targets; others become 0 with weight 0.
            let pick = |vision: bool| -> Vec<u32> {
                t.tokens
                    .iter()
                    .zip(vm)
                    .map(|(&tok, &m)| if m == vision { tok } else { 0 })
                    .collect()
            };
            let vision_loss = weighted_mean(
                &token_nll(vl, &pick(true))?,
                modality(t, true),
                &modality(full, true),
            )?;
            let text_loss = weighted_mean(
                &token_nll(text_logits, &pick(false))?,
                modality(t, false),
                &modality(full, false),
            )?;
            Ok(((vision_loss + text_loss)? * 0.5)?)
        }
        (Some(_), None) => bail!("vision targets given but the model has no vision head"),
    }
}
