//! Decode-time attention: one new query per sequence against that
//! sequence's keys and values in a paged KV cache (fixed-size blocks listed
//! in a per-sequence block table). GPU twin: `kernels/paged_attn.cu`
//! (paged_decode_attention_f32).
//!
//! Cache layout per layer: `[blocks, block_size, kv_heads, head_dim]`, the
//! slot of token `i` of a sequence is `(table[i / block_size], i % block_size)`.

pub use crate::backend::desc::{PagedSeq, PagedShape};
use rayon::prelude::*;

/// `o[b, h] = softmax(q[b, h] . K_b^T * scale) V_b` for `q[B, q_heads, head_dim]`,
/// grouped-query heads reading kv head `h / (q_heads / kv_heads)`.
pub fn paged_decode_attention(
    shape: &PagedShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[PagedSeq],
    o: &mut [f32],
) {
    let (hq, hkv, d, bs) = (
        shape.q_heads,
        shape.kv_heads,
        shape.head_dim,
        shape.block_size,
    );
    assert_eq!(
        hq % hkv,
        0,
        "paged attention: q_heads must be a multiple of kv_heads"
    );
    assert_eq!(
        q.len(),
        seqs.len() * hq * d,
        "paged attention: q is not [B, q_heads, head_dim]"
    );
    assert_eq!(o.len(), q.len(), "paged attention: output length");
    let group = hq / hkv;
    let slot = hkv * d;
    o.par_chunks_mut(d).enumerate().for_each(|(bh, out)| {
        let (b, h) = (bh / hq, bh % hq);
        let seq = &seqs[b];
        assert!(
            seq.block_table.len() * bs >= seq.len,
            "paged attention: block table too short"
        );
        let qv = &q[bh * d..(bh + 1) * d];
        let g = h / group;
        let at = |i: usize| (seq.block_table[i / bs] * bs + i % bs) * slot + g * d;
        let scores: Vec<f32> = (0..seq.len)
            .map(|i| {
                let kv = &k_cache[at(i)..at(i) + d];
                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * shape.scale
            })
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f32 = weights.iter().sum();
        out.fill(0.0);
        for (i, w) in weights.iter().enumerate() {
            let vv = &v_cache[at(i)..at(i) + d];
            for (o, v) in out.iter_mut().zip(vv) {
                *o += w / total * v;
            }
        }
    });
}
