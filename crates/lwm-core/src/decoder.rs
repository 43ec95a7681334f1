//! The LLaMA decoder layer, written once.
//!
//! ```text
//! x  = x + W_o · attend(rope(W_q · rmsnorm(x)), rope(W_k · rmsnorm(x)), W_v · rmsnorm(x))
//! x  = x + W_down · (silu(W_gate · rmsnorm'(x)) ⊙ (W_up · rmsnorm'(x)))     (per token)
//! ```
//!
//! Every driver runs [`decoder_layer`]: inference (`Model::forward_layers`: f32 rows over the
//! stored, possibly quantized weights, attention through the local KV cache or a ring
//! shard) and training (`lwm-train`'s `TrainModel`: candle autograd tensors, attention
//! through the blockwise tape whose backward recomputes tiles). What differs between them
//! is only the arithmetic behind each step, which [`DecoderOps`] names.

use anyhow::Result;

/// Which of a layer's two RMSNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSite {
    /// `input_layernorm`, before attention.
    Attention,
    /// `post_attention_layernorm`, before the feed-forward.
    FeedForward,
}

/// The arithmetic of one decoder layer's steps over activations `Rows` (the hidden states
/// of the rows being run).
pub trait DecoderOps {
    type Rows;

    /// RMSNorm of layer `layer` at `site`.
    fn norm(&mut self, layer: usize, site: NormSite, x: &Self::Rows) -> Result<Self::Rows>;

    /// The query, key and value projections (fused where the weights allow).
    fn qkv(&mut self, layer: usize, x: &Self::Rows)
        -> Result<(Self::Rows, Self::Rows, Self::Rows)>;

    /// RoPE on the queries and keys at the rows' positions.
    fn rope(&mut self, q: Self::Rows, k: Self::Rows) -> Result<(Self::Rows, Self::Rows)>;

    /// The attention backend: store the keys and values where this driver keeps them (a
    /// KV cache, a ring shard, the training tape) and attend the queries to them.
    fn attend(
        &mut self,
        layer: usize,
        q: Self::Rows,
        k: Self::Rows,
        v: Self::Rows,
    ) -> Result<Self::Rows>;

    /// `W_o` on the attention output.
    fn out_proj(&mut self, layer: usize, attn: &Self::Rows) -> Result<Self::Rows>;

    /// `W_gate` and `W_up` (fused where the weights allow).
    fn gate_up(&mut self, layer: usize, x: &Self::Rows) -> Result<(Self::Rows, Self::Rows)>;

    /// `silu(gate) ⊙ up`.
    fn swiglu(&mut self, gate: Self::Rows, up: Self::Rows) -> Result<Self::Rows>;

    /// `W_down`.
    fn down(&mut self, layer: usize, act: &Self::Rows) -> Result<Self::Rows>;

    /// The residual connection `x + y`.
    fn residual(&mut self, x: Self::Rows, y: Self::Rows) -> Result<Self::Rows>;

    /// Whether `x` holds no rows (a ring worker owning none of a step's positions): it
    /// still takes part in the layer's attention, and does nothing else.
    fn is_empty(&self, x: &Self::Rows) -> bool;

    /// Run `block` over `x` in independent pieces of rows (the feed-forward is per token,
    /// so inference bounds its activation memory this way) and join the results.
    fn per_token_blocks(
        &mut self,
        x: Self::Rows,
        block: &mut RowBlock<'_, Self>,
    ) -> Result<Self::Rows>
    where
        Self: Sized;
}

/// A step over some rows, for [`DecoderOps::per_token_blocks`].
pub type RowBlock<'a, O> =
    dyn FnMut(&mut O, <O as DecoderOps>::Rows) -> Result<<O as DecoderOps>::Rows> + 'a;

/// One decoder layer on `x` (see the module comment for the math).
pub fn decoder_layer<O: DecoderOps>(ops: &mut O, layer: usize, x: O::Rows) -> Result<O::Rows> {
    if ops.is_empty(&x) {
        let (q, k, v) = ops.qkv(layer, &x)?;
        ops.attend(layer, q, k, v)?;
        return Ok(x);
    }
    let hn = ops.norm(layer, NormSite::Attention, &x)?;
    let (q, k, v) = ops.qkv(layer, &hn)?;
    let (q, k) = ops.rope(q, k)?;
    let attn = ops.attend(layer, q, k, v)?;
    let o = ops.out_proj(layer, &attn)?;
    let x = ops.residual(x, o)?;
    ops.per_token_blocks(x, &mut |ops, xs| {
        let hn = ops.norm(layer, NormSite::FeedForward, &xs)?;
        let (gate, up) = ops.gate_up(layer, &hn)?;
        let act = ops.swiglu(gate, up)?;
        let down = ops.down(layer, &act)?;
        ops.residual(xs, down)
    })
}
