//! What a forward keeps for the backward. The vision blocks and the decoder
//! layers are both pre-norm transformer blocks (norm, attention, residual,
//! norm, SwiGLU MLP, residual), so they save the same activations.

use crate::ops::Backend;

/// How much of a forward to keep for a backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Save {
    /// Inference: keep nothing.
    Nothing,
    /// Keep every block's activations.
    All,
    /// Keep only each block's input and recompute the rest in the backward
    /// (activation checkpointing: less memory, one more forward).
    Inputs,
}

/// What one transformer block saw and made (input to its backward).
pub struct BlockActs<B: Backend> {
    pub x_in: B::Buf,
    pub rstd1: B::Buf,
    pub h1: B::Buf,
    /// q, k after RoPE, and v: `[T, heads, head_dim]` / `[T, kv_heads, head_dim]`.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub attn: B::Buf,
    pub lse: B::Buf,
    pub x_mid: B::Buf,
    pub rstd2: B::Buf,
    pub h2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub act: B::Buf,
}

/// What a forward kept of one block.
pub enum SavedBlock<B: Backend> {
    All(Box<BlockActs<B>>),
    /// Only the block input; the backward re-runs the block's forward.
    Input(B::Buf),
}

impl<B: Backend> SavedBlock<B> {
    /// Keeps what `save` asks for (`None` for [`Save::Nothing`]).
    pub fn keep(acts: BlockActs<B>, save: Save) -> Option<Self> {
        match save {
            Save::Nothing => None,
            Save::All => Some(SavedBlock::All(Box::new(acts))),
            Save::Inputs => Some(SavedBlock::Input(acts.x_in)),
        }
    }
}
