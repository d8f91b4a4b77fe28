//! CPU reference ops. Each op mirrors one CUDA kernel contract: inputs and
//! explicit output buffers, shapes spelled out, and what is saved for the
//! backward named in the docs. Compute is generic over [`Real`] (f32 for
//! running, f64 for gradient checks); bf16 storage converts at the edges
//! ([`cast`]).
//!
//! Backward conventions: gradients of *parameters* (weights, biases, the
//! embedding table) accumulate (`+=`), so shared and tied weights just work;
//! gradients of *activations* are overwritten.

pub mod activations;
pub mod adamw;
pub mod cast;
pub mod embedding;
pub mod flash_attn;
pub mod gemm;
pub mod linear;
pub mod logprob;
pub mod paged_attn;
pub mod patch_embed;
pub mod real;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod sampling;
pub mod softmax_kl;
pub mod topk_select;

pub use real::Real;

/// Errors an op reports instead of panicking, because they come from data
/// (token ids, sequence layouts) rather than from the code's own shapes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error(
        "cu_seqlens must start at 0, never decrease and end at {expected_total}; got {found:?}"
    )]
    BadSeqlens {
        expected_total: usize,
        found: Vec<i32>,
    },
    #[error(
        "the fp32 CPU backend stores f32 only; bf16 buffers live on its bf16 twin \
         (ops::cpu_bf16::CpuBf16Backend, precision = \"bf16\")"
    )]
    Bf16OnFp32Backend,
}

/// A raw pointer handed to parallel tasks that each write a disjoint part of
/// one buffer (columns of a matrix, say), where `split_at_mut` cannot express
/// the split.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<R>(pub(crate) *mut R);

impl<R> SharedMut<R> {
    /// Going through a method makes closures capture the whole wrapper (which
    /// is Send) rather than the bare pointer field.
    pub(crate) fn get(self) -> *mut R {
        self.0
    }
}

// SAFETY: users write disjoint elements from each task and the buffer
// outlives the parallel section; see each use site.
unsafe impl<R> Send for SharedMut<R> {}
// SAFETY: as above.
unsafe impl<R> Sync for SharedMut<R> {}

/// Checks a packed-sequence boundary array and returns it as usize offsets.
pub fn check_cu_seqlens(cu_seqlens: &[i32], total: usize) -> Result<Vec<usize>, OpError> {
    let bad = || OpError::BadSeqlens {
        expected_total: total,
        found: cu_seqlens.to_vec(),
    };
    if cu_seqlens.first() != Some(&0) || cu_seqlens.last().copied() != i32::try_from(total).ok() {
        return Err(bad());
    }
    if cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
        return Err(bad());
    }
    Ok(cu_seqlens.iter().map(|&c| c as usize).collect())
}
