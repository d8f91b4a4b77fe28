//! Token-level gradient filtering: per response, keep the `k` tokens with the
//! largest visual-dependency score, `k = ceil(len * ratio)`.
//! GPU twin: kernels/topk_select.cu (topk_select_mask_f32).

use super::{check_cu_seqlens, OpError, Real};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Tokens kept out of `len`: `ceil(len * ratio)` computed in f32, as the
/// reference code does (`torch.ceil(num_valid_tokens * top_p)` on an f32
/// tensor): 50 * 0.3 rounds to 15.000001 in f32 and keeps 16 tokens, where
/// an f64 product would keep 15.
pub fn topk_count(len: usize, ratio: f32) -> usize {
    ((len as f32) * ratio).ceil().max(0.0) as usize
}

/// Orders scores for selection: larger first, NaN as -inf, then earlier
/// position first (a deterministic rule every backend can follow).
fn selection_order<R: Real>(a: (usize, R), b: (usize, R)) -> Ordering {
    let key = |v: R| if v.is_nan() { R::neg_infinity() } else { v };
    key(b.1)
        .partial_cmp(&key(a.1))
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Writes `mask[i] = 1` for the selected tokens of each packed response
/// (`cu_seqlens` delimits them), `0` elsewhere.
pub fn topk_select_mask<R: Real>(
    scores: &[R],
    cu_seqlens: &[i32],
    ratio: f32,
    mask: &mut [R],
) -> Result<(), OpError> {
    let starts = check_cu_seqlens(cu_seqlens, scores.len())?;
    assert_eq!(mask.len(), scores.len(), "topk: mask length");
    let mut rows: Vec<&mut [R]> = Vec::with_capacity(starts.len().saturating_sub(1));
    let mut rest = mask;
    for w in starts.windows(2) {
        let (row, tail) = rest.split_at_mut(w[1] - w[0]);
        rows.push(row);
        rest = tail;
    }
    rows.into_par_iter()
        .zip(starts.par_windows(2))
        .for_each(|(row, w)| {
            let s = &scores[w[0]..w[1]];
            let mut order: Vec<(usize, R)> = s.iter().copied().enumerate().collect();
            order.sort_by(|&a, &b| selection_order(a, b));
            row.fill(R::zero());
            for &(i, _) in order.iter().take(topk_count(s.len(), ratio)) {
                row[i] = R::one();
            }
        });
    Ok(())
}
