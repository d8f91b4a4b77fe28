//! The Qwen2 decoder with M-RoPE over packed sequences, and the lm_head.
//! Each layer's forward returns the activations its backward will need.

use super::config::TextConfig;
use super::params::{Tensors, TextLayerParams, TextParams};
use crate::backend::cpu::activations::swiglu_fwd;
use crate::backend::cpu::attention::{attention_fwd, VarlenAttention};
use crate::backend::cpu::gemm::{matmul, Trans};
use crate::backend::cpu::linear::linear_fwd;
use crate::backend::cpu::rmsnorm::rmsnorm_fwd;
use crate::backend::cpu::rope::{rope_fwd, RopeTable};
use crate::backend::cpu::OpError;

/// What one decoder layer saw and made (input to its backward).
pub struct TextLayerActs {
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

/// One layer: `x += o_proj(attn(rmsnorm(x)))`, `x += down(silu(gate) * up)`.
pub fn text_layer_fwd(
    cfg: &TextConfig,
    p: &TextLayerParams,
    w: &Tensors,
    x: &mut [f32],
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
) -> Result<TextLayerActs, OpError> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let t = x.len() / h;
    let eps = cfg.rms_norm_eps as f32;
    let x_in = x.to_vec();
    let (mut h1, mut rstd1) = (vec![0.0; t * h], vec![0.0; t]);
    rmsnorm_fwd(x, w.get(p.input_norm), h, eps, &mut h1, &mut rstd1);
    let (mut q_raw, mut k_raw, mut v) = (
        vec![0.0; t * q_out],
        vec![0.0; t * kv_out],
        vec![0.0; t * kv_out],
    );
    linear_fwd(
        &h1,
        w.get(p.q_w),
        Some(w.get(p.q_b)),
        t,
        h,
        q_out,
        &mut q_raw,
    );
    linear_fwd(
        &h1,
        w.get(p.k_w),
        Some(w.get(p.k_b)),
        t,
        h,
        kv_out,
        &mut k_raw,
    );
    linear_fwd(&h1, w.get(p.v_w), Some(w.get(p.v_b)), t, h, kv_out, &mut v);
    let (mut q, mut k) = (vec![0.0; t * q_out], vec![0.0; t * kv_out]);
    rope_fwd(rope, &q_raw, cfg.num_heads, &mut q);
    rope_fwd(rope, &k_raw, cfg.num_kv_heads, &mut k);
    let attn_cfg = VarlenAttention {
        cu_seqlens_q: cu_seqlens,
        cu_seqlens_k: cu_seqlens,
        q_heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: hd,
        causal: true,
        scale: 1.0 / (hd as f64).sqrt(),
    };
    let (mut attn, mut lse) = (vec![0.0; t * q_out], vec![0.0; t * cfg.num_heads]);
    attention_fwd(&attn_cfg, &q, &k, &v, &mut attn, &mut lse)?;
    let mut o = vec![0.0; t * h];
    linear_fwd(&attn, w.get(p.o_w), None, t, q_out, h, &mut o);
    x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    let x_mid = x.to_vec();
    let (mut h2, mut rstd2) = (vec![0.0; t * h], vec![0.0; t]);
    rmsnorm_fwd(x, w.get(p.post_norm), h, eps, &mut h2, &mut rstd2);
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
    x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    Ok(TextLayerActs {
        x_in,
        rstd1,
        h1,
        q,
        k,
        v,
        attn,
        lse,
        x_mid,
        rstd2,
        h2,
        gate,
        up,
        act,
    })
}

/// Activations of a whole decoder forward (kept only when training).
pub struct TextActs {
    pub layers: Vec<TextLayerActs>,
    pub final_in: Vec<f32>,
    pub final_rstd: Vec<f32>,
}

/// Runs the decoder on input embeddings `x[T, hidden]` (packed sequences
/// delimited by `cu_seqlens`), returning the final-norm hidden states.
pub fn decoder_fwd(
    cfg: &TextConfig,
    p: &TextParams,
    w: &Tensors,
    mut x: Vec<f32>,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    keep: bool,
) -> Result<(Vec<f32>, Option<TextActs>), OpError> {
    let h = cfg.hidden_size;
    let t = x.len() / h;
    let mut layers = Vec::new();
    for lp in &p.layers {
        let acts = text_layer_fwd(cfg, lp, w, &mut x, rope, cu_seqlens)?;
        if keep {
            layers.push(acts);
        }
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
    let acts = keep.then_some(TextActs {
        layers,
        final_in: x,
        final_rstd: rstd,
    });
    Ok((out, acts))
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
