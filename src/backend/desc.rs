//! Descriptors the ops take, shared by the CPU reference ops and the CUDA
//! launchers (and the op layer above them): attention shapes, the rotary
//! angle plan, the paged cache shape, AdamW's and the sampler's settings.

/// Shape and masking of one varlen attention call.
#[derive(Debug, Clone, Copy)]
pub struct VarlenAttention<'a> {
    pub cu_seqlens_q: &'a [i32],
    pub cu_seqlens_k: &'a [i32],
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Multiplies the scores, usually `head_dim^-0.5`.
    pub scale: f64,
}

/// Heads and masking of an attention, without the sequence layout (the
/// op layer pairs it with a backend's `cu_seqlens`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Multiplies the scores, usually `head_dim^-0.5`.
    pub scale: f64,
}

impl AttnSpec {
    /// This attention over the spans of `cu_seqlens` (queries and keys alike).
    pub fn over<'a>(&self, cu_seqlens: &'a [i32]) -> VarlenAttention<'a> {
        VarlenAttention {
            cu_seqlens_q: cu_seqlens,
            cu_seqlens_k: cu_seqlens,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: self.scale,
        }
    }
}

/// `inv_freq[j] = 1 / theta^(2j / dim)` for `j < dim / 2`, in f32.
fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0 / (theta as f32).powf(((2 * j) as f64 / dim as f64) as f32))
        .collect()
}

/// The angle plan behind every [`RopeTable`] layout: frequency `j` of token
/// `t` has the angle `positions[stream[j]][t] * inv_freq[j]` (f32 product).
/// The GPU rope kernel takes this plan and the positions instead of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    pub inv_freq: Vec<f32>,
    /// Which position stream each frequency reads.
    pub stream: Vec<i32>,
}

impl RopeFreqs {
    /// The plan of [`RopeTable::text_1d`] (one stream).
    pub fn text_1d(head_dim: usize, theta: f64) -> Self {
        assert!(head_dim % 2 == 0, "rope: head_dim must be even");
        let inv_freq = inv_freq(head_dim, theta);
        let stream = vec![0; inv_freq.len()];
        Self { inv_freq, stream }
    }

    /// The plan of [`RopeTable::mrope`] (streams t, h, w by section).
    pub fn mrope(sections: [usize; 3], head_dim: usize, theta: f64) -> Self {
        assert!(head_dim % 2 == 0, "rope: head_dim must be even");
        assert_eq!(
            sections.iter().sum::<usize>(),
            head_dim / 2,
            "mrope: sections must sum to head_dim/2"
        );
        let stream = (0..3)
            .flat_map(|s| std::iter::repeat_n(s as i32, sections[s]))
            .collect();
        Self {
            inv_freq: inv_freq(head_dim, theta),
            stream,
        }
    }

    /// The plan of [`RopeTable::vision_2d`] (streams rows, cols).
    pub fn vision_2d(head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim % 4 == 0,
            "vision rope: head_dim must be a multiple of 4"
        );
        let f = inv_freq(head_dim / 2, theta);
        let nf = f.len();
        Self {
            inv_freq: f.iter().chain(&f).copied().collect(),
            stream: (0..2 * nf).map(|j| i32::from(j >= nf)).collect(),
        }
    }
}

/// Where one sequence's cached tokens live.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    pub block_table: &'a [usize],
    /// Cached tokens (all visible to the query: it is the newest token).
    pub len: usize,
}

/// Shape of the paged cache and the heads.
#[derive(Debug, Clone, Copy)]
pub struct PagedShape {
    pub block_size: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Hyper-parameters; defaults are the VPPO recipe's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Sampling settings; the defaults are the VPPO recipe's rollout settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass kept (1.0 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 0.99,
            top_k: 0,
        }
    }
}

/// The patch geometry of an image processor, as the patch-embed kernel
/// needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGeometry {
    pub patch: usize,
    pub merge: usize,
    pub temporal: usize,
}

/// The mask seed of image `image` of a sample seeded `seed`: each image of
/// a sequence gets its own draw (the patch-embed kernel runs per image).
pub fn image_mask_seed(seed: u64, image: usize) -> u64 {
    seed ^ (image as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The patch-mask threshold of probability `p`: patch `k` is blackened when
/// its 24-bit hash is below it (so p = 0 never, p = 1 always).
pub fn patch_mask_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).round() as u32
}

/// Counter-based draw for patch `patch` of the sample seeded `seed`
/// (splitmix64 of the pair): the same on the CPU and in the GPU patch-embed
/// kernel (`kernels/patch_embed.cu`), with no generator state to carry.
pub fn patch_is_blackened(seed: u64, patch: u64, threshold: u32) -> bool {
    let mut z = seed.wrapping_add((patch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as u32) < threshold
}

/// Block tables of a decode batch laid out for the paged kernel:
/// `[B, stride]` i32 (rows padded with 0) and the `B` sequence lengths.
pub fn flatten_block_tables(seqs: &[PagedSeq]) -> (Vec<i32>, Vec<i32>, usize) {
    let stride = seqs
        .iter()
        .map(|s| s.block_table.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let (tables, lens) = block_tables_at(seqs, stride);
    (tables, lens, stride)
}

/// [`flatten_block_tables`] at a given `stride`, at least every table's
/// length (a captured decode step keeps its table width).
pub fn block_tables_at(seqs: &[PagedSeq], stride: usize) -> (Vec<i32>, Vec<i32>) {
    let mut tables = vec![0i32; seqs.len() * stride];
    for (row, s) in tables.chunks_mut(stride.max(1)).zip(seqs) {
        assert!(
            s.block_table.len() <= stride,
            "a block table of {} blocks in rows of {stride}",
            s.block_table.len()
        );
        for (t, &b) in row.iter_mut().zip(s.block_table) {
            *t = b as i32;
        }
    }
    let lens = seqs.iter().map(|s| s.len as i32).collect();
    (tables, lens)
}

/// The clip coefficient `cpu::adamw::clip_grad_norm` applies for a global
/// norm: pass it as `grad_scale` to the CUDA `adamw_step` to get the
/// CPU's clip-then-step (1.0 when no clipping is needed or the norm is not
/// finite; the caller skips the step in that case).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if !norm.is_finite() {
        return 1.0;
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        coef
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_coefficient_matches_the_cpu_rule() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(f64::NAN, 1.0), 1.0);
        let c = clip_coefficient(4.0, 1.0);
        assert_eq!(c, (1.0 / (4.0 + 1e-6)) as f32);
    }
}
