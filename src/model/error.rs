//! What the model layer reports instead of panicking: bad checkpoints,
//! configs and inputs, and op or device failures.

use super::checkpoint::LoadError;
use super::config::ConfigError;
use super::positions::PositionError;
use crate::backend::cpu::OpError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("checkpoint directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Positions(#[from] PositionError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("the batch has {tokens} image tokens but the images give {features} features")]
    ImageTokens { tokens: usize, features: usize },
    #[error("pixel_values has {len} values, not a multiple of the patch size {patch_dim}")]
    PixelShape { len: usize, patch_dim: usize },
    #[error("sequence {seq}: prompt length {prompt_len} leaves no response in {len} tokens")]
    NoResponse {
        seq: usize,
        prompt_len: usize,
        len: usize,
    },
    #[error("the two forwards compared by response_kl score different tokens")]
    ForwardsDiffer,
    #[error("loss gradients have {found} entries for {expected} response tokens")]
    GradLength { expected: usize, found: usize },
    #[error("backward called without a training forward before it")]
    NoPendingForward,
    #[error("the fused dual pass needs the image processor on the device (set_image_processor)")]
    NoImageProcessor,
    #[error(
        "the fused dual pass needs the resized image bytes of the input (build it from images)"
    )]
    NoResizedImages,
    #[error(
        "the KV cache has {have} blocks of {block_size} tokens but one sequence needs up to {need}: \
         raise kv_cache_blocks or kv_cache_memory_fraction, or lower max_new_tokens"
    )]
    KvCacheTooSmall {
        need: usize,
        have: usize,
        block_size: usize,
    },
    #[error(
        "max_num_seqs ({seqs}) must be at least 1 and max_num_batched_tokens ({tokens}) at least max_num_seqs"
    )]
    ScheduleLimits { seqs: usize, tokens: usize },
    #[error("CUDA device: {0}")]
    Device(#[from] crate::backend::cuda::CudaError),
    /// A unit's weights could not be gathered (a peer rank failed).
    #[error("gathering weights: {0}")]
    Gather(String),
}

impl From<crate::ops::Error> for ModelError {
    fn from(e: crate::ops::Error) -> Self {
        match e {
            crate::ops::Error::Op(e) => Self::Op(e),
            crate::ops::Error::Device(e) => Self::Device(e),
            crate::ops::Error::Gather(e) => Self::Gather(e),
        }
    }
}

impl From<cudarc::driver::DriverError> for ModelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Device(e.into())
    }
}
