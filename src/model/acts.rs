//! What a forward keeps for the backward. The vision blocks and the decoder
//! layers are both pre-norm transformer blocks (norm, attention, residual,
//! norm, SwiGLU MLP, residual), so they save the same activations.

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
pub struct BlockActs {
    pub x_in: Vec<f32>,
    pub rstd1: Vec<f32>,
    pub h1: Vec<f32>,
    /// q, k after RoPE, and v: `[T, heads, head_dim]` / `[T, kv_heads, head_dim]`.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub lse: Vec<f32>,
    pub x_mid: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub h2: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub act: Vec<f32>,
}

/// What a forward kept of one block.
pub enum SavedBlock {
    All(Box<BlockActs>),
    /// Only the block input; the backward re-runs the block's forward.
    Input(Vec<f32>),
}

impl SavedBlock {
    /// Keeps what `save` asks for (`None` for [`Save::Nothing`]).
    pub fn keep(acts: BlockActs, save: Save) -> Option<Self> {
        match save {
            Save::Nothing => None,
            Save::All => Some(SavedBlock::All(Box::new(acts))),
            Save::Inputs => Some(SavedBlock::Input(acts.x_in)),
        }
    }
}
