//! The op layer: the [`Backend`] trait the model graph is written against,
//! once, and its two implementations: [`cpu::CpuBackend`] (the reference
//! ops of `backend::cpu`, the test oracle and the fallback without a GPU)
//! and [`cuda`] (the kernels of `kernels/` through `backend::cuda`).
//!
//! Buffers belong to the backend (`Vec<f32>` on the CPU, device memory on
//! a GPU) and know their [`DType`]. Ops return fresh output buffers; the
//! backend decides where memory comes from (the CPU's allocator, the CUDA
//! stream-ordered pool), so the graph holds no arena of its own. Parameter
//! gradients ACCUMULATE (`+=`, shared and tied weights just work), gradients
//! of activations are returned new: the conventions of `backend::cpu`.

pub mod cpu;
pub mod cpu_bf16;
pub mod cuda;
pub mod device_buf;

use crate::backend::cpu::OpError;
use crate::backend::cuda::CudaError;
use crate::backend::desc::{
    AdamWConfig, AttnSpec, PagedShape, PatchGeometry, RopeFreqs, SamplingParams,
};
use std::ops::Range;

/// How a buffer stores its elements.
///
/// Storage rules every backend follows, so the graph, written once, runs
/// in fp32 or in bf16 mixed precision by the weights' dtype alone:
/// - an op computes in f32 on its inputs as they are stored;
/// - a linear layer computes in its weight's dtype: its input (and, in the
///   backward, the output gradient) is rounded to that dtype first;
/// - activations and activation gradients take the dtype of the op's input
///   (the weight's for a linear layer, the table's for an embedding);
/// - statistics stay f32: RMSNorm's `rstd`, attention's `lse`, log-probs,
///   entropies, KL;
/// - parameter gradients accumulate in their own buffers' dtype (f32), and
///   `add_into`, `scatter_rows`, `write` keep the destination's dtype;
/// - bf16 is written round-to-nearest-even (`half::bf16::from_f32`), as
///   the CUDA kernels round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element in storage.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// What a model's weights (and so its activations) are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere (exact parity with the CPU reference).
    Fp32,
    /// bf16 weights and activations over fp32 master weights, fp32
    /// statistics, loss and gradient accumulation.
    Bf16,
}

impl Precision {
    /// The dtype of the weights.
    pub fn dtype(self) -> DType {
        match self {
            Self::Fp32 => DType::F32,
            Self::Bf16 => DType::Bf16,
        }
    }
}

/// What the graph may ask of any buffer.
pub trait Buffer {
    /// Elements (not bytes).
    fn len(&self) -> usize;
    fn dtype(&self) -> DType;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Buffer for Vec<f32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

/// Why an op failed: bad data (token ids, sequence layouts) or the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Device(#[from] CudaError),
    /// A unit's weights could not be gathered from the other ranks.
    #[error("gathering weights: {0}")]
    Gather(String),
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Device(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A projection's weight rows: rows `rows` of a `[*, inp]` weight (and the
/// same entries of its bias), so a fused qkv weight serves q, k and v.
#[derive(Debug, Clone)]
pub struct WeightRows<'w, B: Buffer> {
    pub weight: &'w B,
    pub bias: Option<&'w B>,
    pub rows: Range<usize>,
}

/// Where a projection's weight gradients accumulate.
pub struct WeightGrads<'g, B: Buffer> {
    pub weight: &'g mut B,
    pub bias: Option<&'g mut B>,
    pub rows: Range<usize>,
}

/// The ops of the Qwen2.5-VL graph. Shapes follow `backend::cpu`: rows are
/// tokens, row-major, heads interleaved as `[T, heads, head_dim]`.
pub trait Backend {
    /// An activation, weight or gradient.
    type Buf: Buffer + 'static;
    /// Row indices (`i32`), readable by the ops that gather and scatter.
    type Index;
    /// Token ids (`u32`) with their host copy (ids are validated there).
    type Ids;
    /// The rotary angles of one set of positions.
    type Rope;
    /// Packed-sequence offsets (`cu_seqlens`) with their host copy.
    type Seqlens;
    /// Recorded work, replayed as one launch ([`Backend::capture`]).
    type Graph;

    // Memory.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// The values of `buf` stored as `dtype` (rounded to nearest-even
    /// into bf16; widening is exact).
    fn cast(&self, buf: &Self::Buf, dtype: DType) -> Result<Self::Buf>;
    fn copy(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// The buffers one after the other.
    fn concat(&self, parts: &[&Self::Buf]) -> Result<Self::Buf>;
    /// Sets every element of `buf` to 0 (on the backend: no host copy).
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// Overwrites `dst` with the host values (same length).
    fn write(&self, dst: &mut Self::Buf, host: &[f32]) -> Result<()>;
    fn index(&self, host: &[i32]) -> Result<Self::Index>;
    fn ids(&self, host: &[u32]) -> Result<Self::Ids>;
    fn seqlens(&self, cu: &[i32]) -> Result<Self::Seqlens>;
    /// The rotary table of `freqs` at the position streams `streams` (one
    /// slice per stream, each one entry per token).
    fn rope(&self, freqs: &RopeFreqs, streams: &[&[i32]]) -> Result<Self::Rope>;
    /// Waits for queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;

    // Captured work (CUDA graphs). A captured body reads and writes only
    // buffers made before the capture, which the `write_*` ops and
    // [`Backend::copy_into`] refill in place between replays.
    /// Whether [`Backend::capture`] records graphs here.
    fn captures(&self) -> bool {
        false
    }
    /// Records `body`'s work without running it, for [`Backend::replay`];
    /// `Ok(None)` where the backend has nothing to record with (the CPU),
    /// and the caller runs `body` itself each time.
    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>>;
    /// Runs the captured work once more, on the buffers' current values.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
    /// Gives the memory that dropped graphs reserved for their temporaries
    /// back to the device, for the work that follows (training).
    fn release_graph_memory(&self) -> Result<()> {
        Ok(())
    }
    /// Overwrites `dst` with `host` (same length), host copy included.
    fn write_index(&self, dst: &mut Self::Index, host: &[i32]) -> Result<()>;
    /// Overwrites `dst` with `host` (same length), host copy included.
    fn write_ids(&self, dst: &mut Self::Ids, host: &[u32]) -> Result<()>;
    /// Overwrites `rope`'s positions with `streams` (as many tokens as it
    /// was made for, the same `freqs`).
    fn write_rope(
        &self,
        rope: &mut Self::Rope,
        freqs: &RopeFreqs,
        streams: &[&[i32]],
    ) -> Result<()>;
    /// Overwrites `dst` with `src` (same length and storage).
    fn copy_into(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// Free device memory in bytes, where the backend has a device to ask
    /// (the KV cache is sized from it); `None` on the host.
    fn free_memory(&self) -> Option<usize> {
        None
    }

    // Dense layers.
    /// `y[rows, out] = x[rows, inp] @ W[w.rows]^T (+ b[w.rows])`.
    fn linear_fwd(
        &self,
        x: &Self::Buf,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, Self::Buf>,
    ) -> Result<Self::Buf>;
    /// Backward of [`Self::linear_fwd`]: accumulates `dW`, `db` into `g`;
    /// returns `dx = dy W` when `want_dx`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        rows: usize,
        inp: usize,
        w: &Self::Buf,
        g: WeightGrads<'_, Self::Buf>,
        want_dx: bool,
    ) -> Result<Option<Self::Buf>>;
    /// `(y, rstd)`.
    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Returns `dx`; accumulates `dw`.
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dim: usize,
        dw: &mut Self::Buf,
    ) -> Result<Self::Buf>;
    fn swiglu_fwd(&self, gate: &Self::Buf, up: &Self::Buf) -> Result<Self::Buf>;
    /// `(d_gate, d_up)`.
    fn swiglu_bwd(
        &self,
        d_act: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    fn gelu_fwd(&self, x: &Self::Buf) -> Result<Self::Buf>;
    fn gelu_bwd(&self, dy: &Self::Buf, x: &Self::Buf) -> Result<Self::Buf>;
    /// `acc += x`.
    fn add_into(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()>;

    // Positions and attention.
    /// `x` is `[T, heads, head_dim]`; the inverse rotation with `backward`.
    fn rope_apply(
        &self,
        rope: &Self::Rope,
        x: &Self::Buf,
        heads: usize,
        backward: bool,
    ) -> Result<Self::Buf>;
    /// `(o, lse)` of varlen attention over the spans of `cu`.
    fn attention_fwd(
        &self,
        spec: &AttnSpec,
        cu: &Self::Seqlens,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        spec: &AttnSpec,
        cu: &Self::Seqlens,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        o: &Self::Buf,
        lse: &Self::Buf,
        d_o: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// One query row per sequence against its paged K/V cache: `tables` is
    /// `[B, stride]` block ids, `lens` the cached tokens of each sequence.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        shape: &PagedShape,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        tables: &Self::Index,
        stride: usize,
        lens: &Self::Index,
    ) -> Result<Self::Buf>;

    // Rows and embeddings.
    fn embedding_fwd(&self, ids: &Self::Ids, table: &Self::Buf, dim: usize) -> Result<Self::Buf>;
    /// Scatter-adds `d_out` rows into `d_table` at `ids`.
    fn embedding_bwd(
        &self,
        ids: &Self::Ids,
        d_out: &Self::Buf,
        dim: usize,
        d_table: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[i] = src[idx[i]]`, rows of `width`.
    fn gather_rows(&self, src: &Self::Buf, idx: &Self::Index, width: usize) -> Result<Self::Buf>;
    /// `dst[idx[i]] = src[i]`, rows of `width`.
    fn scatter_rows(
        &self,
        src: &Self::Buf,
        idx: &Self::Index,
        width: usize,
        dst: &mut Self::Buf,
    ) -> Result<()>;

    // The loss head.
    /// `(logp, entropy, lse)` of `targets` under `logits [rows, vocab]`.
    fn token_logprob_fwd(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        targets: &Self::Ids,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// `d logits` from the gradients w.r.t. log-prob and entropy.
    #[allow(clippy::too_many_arguments)]
    fn token_logprob_bwd(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        targets: &Self::Ids,
        lse: &Self::Buf,
        entropy: &Self::Buf,
        d_logp: &Self::Buf,
        d_entropy: &Self::Buf,
    ) -> Result<Self::Buf>;
    /// Exact per-row KL(softmax(a) || softmax(b)).
    fn softmax_kl_fwd(&self, a: &Self::Buf, b: &Self::Buf, vocab: usize) -> Result<Self::Buf>;
    /// One token per row of `logits [rows, vocab]`: `banned` ids never
    /// picked, row `r` drawn with `uniforms[r]` (the host sampler's draw);
    /// the log-prob is of the unmasked distribution.
    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        params: &SamplingParams,
        banned: &[u32],
        uniforms: &[f32],
    ) -> Result<(Vec<u32>, Vec<f32>)>;

    // Images.
    /// Normalises and patchifies a resized `[height, width, 3]` RGB image
    /// into `pixel_values [N, 3*T*P*P]` (`lut` from
    /// `processor::image::normalize_lut`); with `mask = (seed, p)` also a
    /// copy with each patch blackened with probability `p`, patch `k` drawn
    /// by `backend::desc::patch_is_blackened(seed, k, ...)`.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed(
        &self,
        geom: &PatchGeometry,
        lut: &[[f32; 256]; 3],
        image: &[u8],
        width: usize,
        height: usize,
        mask: Option<(u64, f64)>,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;

    // The optimizer.
    /// L2 norm of all gradients together (accumulated in f64).
    fn grad_norm(&self, grads: &[Self::Buf]) -> Result<f64>;
    /// One AdamW step (`step` counts from 1) on every tensor, the gradients
    /// multiplied by `grad_scale` first (global-norm clipping). `params`
    /// are the fp32 (master) weights; with `copies` each also receives its
    /// updated values in its own dtype (the bf16 model weights), in the
    /// same pass.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        params: &mut [Self::Buf],
        grads: &[Self::Buf],
        exp_avg: &mut [Self::Buf],
        exp_avg_sq: &mut [Self::Buf],
        copies: Option<&mut [Self::Buf]>,
    ) -> Result<()>;
}
