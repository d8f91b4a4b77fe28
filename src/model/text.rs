//! The Qwen2 decoder with M-RoPE over packed sequences, and the lm_head.
//! Each layer's forward returns the activations its backward will need.

use super::acts::{BlockActs, Save, SavedBlock};
use super::config::TextConfig;
use super::grad_util::{add_into, attention_rope_bwd, linear_bwd_acc};
use super::params::{Tensors, TextLayerParams, TextParams};
use crate::backend::cpu::activations::{swiglu_bwd, swiglu_fwd};
use crate::backend::cpu::attention::{attention_fwd, VarlenAttention};
use crate::backend::cpu::gemm::{matmul, Trans};
use crate::backend::cpu::linear::{linear_bwd, linear_fwd};
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::{rope_fwd, RopeTable};
use crate::backend::cpu::OpError;

/// Causal GQA over the packed sequences.
fn attention_shape<'a>(cfg: &TextConfig, cu_seqlens: &'a [i32]) -> VarlenAttention<'a> {
    VarlenAttention {
        cu_seqlens_q: cu_seqlens,
        cu_seqlens_k: cu_seqlens,
        q_heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        causal: true,
        scale: 1.0 / (cfg.head_dim as f64).sqrt(),
    }
}

/// The attention half's inputs: the normed layer input and q, k (after
/// RoPE) and v, shared by the full forward and the decode step.
struct Qkv {
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn qkv_fwd(
    cfg: &TextConfig,
    p: &TextLayerParams,
    w: &Tensors,
    x: &[f32],
    rope: &RopeTable<f32>,
) -> Qkv {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let t = x.len() / h;
    let (mut h1, mut rstd1) = (vec![0.0; t * h], vec![0.0; t]);
    rmsnorm_fwd(
        x,
        w.get(p.input_norm),
        h,
        cfg.rms_norm_eps as f32,
        &mut h1,
        &mut rstd1,
    );
    let project = |wid, bid, out: usize| {
        let mut y = vec![0.0; t * out];
        linear_fwd(&h1, w.get(wid), Some(w.get(bid)), t, h, out, &mut y);
        y
    };
    let (q_raw, k_raw, v) = (
        project(p.q_w, p.q_b, q_out),
        project(p.k_w, p.k_b, kv_out),
        project(p.v_w, p.v_b, kv_out),
    );
    let (mut q, mut k) = (vec![0.0; t * q_out], vec![0.0; t * kv_out]);
    rope_fwd(rope, &q_raw, cfg.num_heads, &mut q);
    rope_fwd(rope, &k_raw, cfg.num_kv_heads, &mut k);
    Qkv { rstd1, h1, q, k, v }
}

/// The MLP half's activations.
struct Mlp {
    rstd2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// `x += o_proj(attn)`.
fn o_proj_residual(
    cfg: &TextConfig,
    p: &TextLayerParams,
    w: &Tensors,
    attn: &[f32],
    x: &mut [f32],
) {
    let h = cfg.hidden_size;
    let t = x.len() / h;
    let mut o = vec![0.0; t * h];
    linear_fwd(
        attn,
        w.get(p.o_w),
        None,
        t,
        cfg.num_heads * cfg.head_dim,
        h,
        &mut o,
    );
    add_into(x, &o);
}

/// `x += down(silu(gate(h2)) * up(h2))` with `h2 = rmsnorm(x)`.
fn mlp_fwd(cfg: &TextConfig, p: &TextLayerParams, w: &Tensors, x: &mut [f32]) -> Mlp {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let t = x.len() / h;
    let (mut h2, mut rstd2) = (vec![0.0; t * h], vec![0.0; t]);
    rmsnorm_fwd(
        x,
        w.get(p.post_norm),
        h,
        cfg.rms_norm_eps as f32,
        &mut h2,
        &mut rstd2,
    );
    let (mut gate, mut up, mut act) = (
        vec![0.0; t * inter],
        vec![0.0; t * inter],
        vec![0.0; t * inter],
    );
    linear_fwd(&h2, w.get(p.gate_w), None, t, h, inter, &mut gate);
    linear_fwd(&h2, w.get(p.up_w), None, t, h, inter, &mut up);
    swiglu_fwd(&gate, &up, &mut act);
    let mut down = vec![0.0; t * h];
    linear_fwd(&act, w.get(p.down_w), None, t, inter, h, &mut down);
    add_into(x, &down);
    Mlp {
        rstd2,
        h2,
        gate,
        up,
        act,
    }
}

/// One layer: `x += o_proj(attn(rmsnorm(x)))`, `x += down(silu(gate) * up)`.
pub fn text_layer_fwd(
    cfg: &TextConfig,
    p: &TextLayerParams,
    w: &Tensors,
    x: &mut [f32],
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
) -> Result<BlockActs, OpError> {
    let t = x.len() / cfg.hidden_size;
    let x_in = x.to_vec();
    let Qkv { rstd1, h1, q, k, v } = qkv_fwd(cfg, p, w, x, rope);
    let (mut attn, mut lse) = (
        vec![0.0; t * cfg.num_heads * cfg.head_dim],
        vec![0.0; t * cfg.num_heads],
    );
    attention_fwd(
        &attention_shape(cfg, cu_seqlens),
        &q,
        &k,
        &v,
        &mut attn,
        &mut lse,
    )?;
    o_proj_residual(cfg, p, w, &attn, x);
    let x_mid = x.to_vec();
    let mlp = mlp_fwd(cfg, p, w, x);
    Ok(BlockActs {
        x_in,
        rstd1,
        h1,
        q,
        k,
        v,
        attn,
        lse,
        x_mid,
        rstd2: mlp.rstd2,
        h2: mlp.h2,
        gate: mlp.gate,
        up: mlp.up,
        act: mlp.act,
    })
}

/// Backward of [`text_layer_fwd`]: `dx` holds the gradient w.r.t. the
/// layer's output on entry and w.r.t. its input on return; weight gradients
/// accumulate into `g`.
#[allow(clippy::too_many_arguments)]
pub fn text_layer_bwd(
    cfg: &TextConfig,
    p: &TextLayerParams,
    w: &Tensors,
    acts: &BlockActs,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    dx: &mut [f32],
    g: &mut Tensors,
) -> Result<(), OpError> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let t = dx.len() / h;
    // MLP branch: x_out = x_mid + down(silu(gate(h2)) * up(h2)).
    let mut d_act = vec![0.0; t * inter];
    linear_bwd(
        dx,
        &acts.act,
        w.get(p.down_w),
        t,
        inter,
        h,
        Some(&mut d_act),
        g.get_mut(p.down_w),
        None,
    );
    let (mut d_gate, mut d_up) = (vec![0.0; t * inter], vec![0.0; t * inter]);
    swiglu_bwd(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up);
    let mut d_h2 = vec![0.0; t * h];
    linear_bwd_acc(
        &d_gate,
        &acts.h2,
        w.get(p.gate_w),
        t,
        h,
        inter,
        &mut d_h2,
        g.get_mut(p.gate_w),
        None,
    );
    linear_bwd_acc(
        &d_up,
        &acts.h2,
        w.get(p.up_w),
        t,
        h,
        inter,
        &mut d_h2,
        g.get_mut(p.up_w),
        None,
    );
    let mut d_norm = vec![0.0; t * h];
    rmsnorm_bwd(
        &d_h2,
        &acts.x_mid,
        w.get(p.post_norm),
        &acts.rstd2,
        h,
        &mut d_norm,
        g.get_mut(p.post_norm),
    );
    add_into(dx, &d_norm);
    // Attention branch: x_mid = x_in + o_proj(attn(rope(q), rope(k), v)).
    let mut d_attn = vec![0.0; t * q_out];
    linear_bwd(
        dx,
        &acts.attn,
        w.get(p.o_w),
        t,
        q_out,
        h,
        Some(&mut d_attn),
        g.get_mut(p.o_w),
        None,
    );
    let (dq_raw, dk_raw, dv) =
        attention_rope_bwd(&attention_shape(cfg, cu_seqlens), acts, rope, &d_attn)?;
    let mut d_h1 = vec![0.0; t * h];
    for (dy, out, wid, bid) in [
        (&dq_raw, q_out, p.q_w, p.q_b),
        (&dk_raw, kv_out, p.k_w, p.k_b),
        (&dv, kv_out, p.v_w, p.v_b),
    ] {
        let (dw, db) = g.pair_mut(wid, bid);
        linear_bwd_acc(dy, &acts.h1, w.get(wid), t, h, out, &mut d_h1, dw, Some(db));
    }
    rmsnorm_bwd(
        &d_h1,
        &acts.x_in,
        w.get(p.input_norm),
        &acts.rstd1,
        h,
        &mut d_norm,
        g.get_mut(p.input_norm),
    );
    add_into(dx, &d_norm);
    Ok(())
}

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
        let acts = text_layer_fwd(cfg, lp, w, &mut x, rope, cu_seqlens)?;
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
        let recomputed;
        let layer_acts = match saved {
            SavedBlock::All(a) => a,
            SavedBlock::Input(x_in) => {
                let mut x = x_in.clone();
                recomputed = text_layer_fwd(cfg, lp, w, &mut x, rope, cu_seqlens)?;
                &recomputed
            }
        };
        text_layer_bwd(cfg, lp, w, layer_acts, rope, cu_seqlens, &mut dx, g)?;
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
        let Qkv { q, k, v, .. } = qkv_fwd(cfg, lp, w, &x, rope);
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
        o_proj_residual(cfg, lp, w, &attn, &mut x);
        mlp_fwd(cfg, lp, w, &mut x);
    }
    let mut rstd = vec![0.0; b];
    let mut out = vec![0.0; b * h];
    rmsnorm_fwd(&x, w.get(p.norm), h, eps, &mut out, &mut rstd);
    out
}
