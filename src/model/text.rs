//! The Qwen2 decoder with M-RoPE over packed sequences, and the lm_head.
//! Each layer's forward returns the activations its backward will need.

use super::acts::{Save, SavedBlock};
use super::block::{block_bwd, block_fwd, mlp_fwd, o_residual, qkv_fwd, BlockWiring, Qkv};
use super::config::TextConfig;
use super::params::{Tensors, TextParams};
use crate::backend::cpu::gemm::{matmul, Trans};
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cpu::OpError;

/// Activations of a whole decoder forward (kept only when training).
pub struct TextActs {
    pub layers: Vec<SavedBlock>,
    pub final_in: Vec<f32>,
    pub final_rstd: Vec<f32>,
}

/// Receives `(layer, keys [T, kv_heads * head_dim], values)` after RoPE.
pub type KvSink<'a> = &'a mut dyn FnMut(usize, &[f32], &[f32]);

/// Runs the decoder on input embeddings `x[T, hidden]` (packed sequences
/// delimited by `cu_seqlens`), returning the final-norm hidden states.
/// `kv_sink` receives each layer's post-RoPE keys and values (prefill into
/// a KV cache).
#[allow(clippy::too_many_arguments)]
pub fn decoder_fwd(
    cfg: &TextConfig,
    p: &TextParams,
    w: &Tensors,
    mut x: Vec<f32>,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    save: Save,
    mut kv_sink: Option<KvSink>,
) -> Result<(Vec<f32>, Option<TextActs>), OpError> {
    let h = cfg.hidden_size;
    let t = x.len() / h;
    let mut layers = Vec::new();
    for (l, lp) in p.layers.iter().enumerate() {
        let acts = block_fwd(&BlockWiring::text(cfg, lp), w, &mut x, rope, cu_seqlens)?;
        if let Some(sink) = kv_sink.as_mut() {
            sink(l, &acts.k, &acts.v);
        }
        layers.extend(SavedBlock::keep(acts, save));
    }
    let (mut out, mut rstd) = (vec![0.0; t * h], vec![0.0; t]);
    rmsnorm_fwd(
        &x,
        w.get(p.norm),
        h,
        cfg.rms_norm_eps as f32,
        &mut out,
        &mut rstd,
    );
    let acts = (save != Save::Nothing).then_some(TextActs {
        layers,
        final_in: x,
        final_rstd: rstd,
    });
    Ok((out, acts))
}

/// Backward of [`decoder_fwd`] from the gradient w.r.t. the final-norm
/// hidden states; returns the gradient w.r.t. the input embeddings.
#[allow(clippy::too_many_arguments)]
pub fn decoder_bwd(
    cfg: &TextConfig,
    p: &TextParams,
    w: &Tensors,
    acts: &TextActs,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    d_hidden: &[f32],
    g: &mut Tensors,
) -> Result<Vec<f32>, OpError> {
    let h = cfg.hidden_size;
    let mut dx = vec![0.0; d_hidden.len()];
    rmsnorm_bwd(
        d_hidden,
        &acts.final_in,
        w.get(p.norm),
        &acts.final_rstd,
        h,
        &mut dx,
        g.get_mut(p.norm),
    );
    for (lp, saved) in p.layers.iter().zip(&acts.layers).rev() {
        let wiring = BlockWiring::text(cfg, lp);
        let recomputed;
        let layer_acts = match saved {
            SavedBlock::All(a) => a,
            SavedBlock::Input(x_in) => {
                let mut x = x_in.clone();
                recomputed = block_fwd(&wiring, w, &mut x, rope, cu_seqlens)?;
                &recomputed
            }
        };
        block_bwd(&wiring, w, layer_acts, rope, cu_seqlens, &mut dx, g)?;
    }
    Ok(dx)
}

/// Logits `[rows.len(), vocab]` of the selected rows of `hidden[T, hidden]`
/// (the tied embedding serves as the head when there is no lm_head).
pub fn lm_head_rows(
    cfg: &TextConfig,
    p: &TextParams,
    w: &Tensors,
    hidden: &[f32],
    rows: &[usize],
) -> Vec<f32> {
    let h = cfg.hidden_size;
    let mut selected = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        selected.extend_from_slice(&hidden[r * h..(r + 1) * h]);
    }
    let head = w.get(p.lm_head.unwrap_or(p.embed));
    let mut logits = vec![0.0; rows.len() * cfg.vocab_size];
    matmul(
        rows.len(),
        h,
        cfg.vocab_size,
        1.0,
        &selected,
        Trans::No,
        head,
        Trans::Yes,
        0.0,
        &mut logits,
    );
    logits
}

/// One decode step for `B` sequences, one new token each: `x[B, hidden]` are
/// the new tokens' embeddings, `rope` their positions, `slots` the cache
/// slots reserved for them (already counted in `seqs[b].len`). Writes the
/// new keys/values into the cache, attends over each sequence's cache and
/// returns the final-norm hidden states `[B, hidden]`.
#[allow(clippy::too_many_arguments)]
pub fn decode_step(
    cfg: &TextConfig,
    p: &TextParams,
    w: &Tensors,
    mut x: Vec<f32>,
    rope: &RopeTable<f32>,
    cache: &mut crate::rollout::kv_cache::PagedKvCache,
    seqs: &[crate::rollout::kv_cache::SeqCache],
    slots: &[usize],
) -> Vec<f32> {
    use crate::backend::cpu::paged_attention::{paged_decode_attention, PagedSeq, PagedShape};
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let b = slots.len();
    let eps = cfg.rms_norm_eps as f32;
    let shape = PagedShape {
        block_size: cache.block_size,
        q_heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let paged: Vec<PagedSeq> = seqs
        .iter()
        .map(|s| PagedSeq {
            block_table: &s.blocks,
            len: s.len,
        })
        .collect();
    for (l, lp) in p.layers.iter().enumerate() {
        let wiring = BlockWiring::text(cfg, lp);
        let Qkv { q, k, v, .. } = qkv_fwd(&wiring, w, &x, rope);
        for (i, &slot) in slots.iter().enumerate() {
            cache.write(
                l,
                slot,
                &k[i * kv_out..(i + 1) * kv_out],
                &v[i * kv_out..(i + 1) * kv_out],
            );
        }
        let mut attn = vec![0.0; b * q_out];
        paged_decode_attention(&shape, &q, &cache.k[l], &cache.v[l], &paged, &mut attn);
        o_residual(&wiring, w, &attn, &mut x);
        mlp_fwd(&wiring, w, &mut x);
    }
    let mut rstd = vec![0.0; b];
    let mut out = vec![0.0; b * h];
    rmsnorm_fwd(&x, w.get(p.norm), h, eps, &mut out, &mut rstd);
    out
}
