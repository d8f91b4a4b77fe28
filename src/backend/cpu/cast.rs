//! bf16 storage at the edges of f32 compute: weights and activations may be
//! stored as bf16 (half's round-to-nearest-even) and widened for the CPU ops.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Widens bf16 values to f32 (exact).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "cast: lengths differ");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// Rounds f32 values to bf16 (nearest, ties to even).
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "cast: lengths differ");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.convert_from_f32_slice(s));
}
