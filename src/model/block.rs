//! The pre-norm transformer block both towers are made of: `x += o(attn(
//! rope(q(h1)), rope(k(h1)), v(h1)))` with `h1 = rmsnorm1(x)`, then
//! `x += down(silu(gate(h2)) * up(h2))` with `h2 = rmsnorm2(x)`. A vision
//! block and a decoder layer differ only in their [`BlockWiring`]: widths,
//! head counts, which projections have biases, a fused qkv weight (row
//! ranges of one tensor) or three, and causal or windowed attention. The
//! CPU forward and backward live here. (The device training graph,
//! `device_train.rs`, still spells its two block kinds out: it is kept as
//! it was verified on a GPU until a GPU run can check it on this wiring.)

use super::acts::BlockActs;
use super::config::{TextConfig, VisionConfig};
use super::grad_util::{add_into, attention_rope_bwd};
use super::params::{ParamId, Tensors, TextLayerParams, VisionBlockParams};
use crate::backend::cpu::activations::{swiglu_bwd, swiglu_fwd};
use crate::backend::cpu::attention::{attention_fwd, VarlenAttention};
use crate::backend::cpu::linear::{linear_bwd, linear_fwd};
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::{rope_fwd, RopeTable};
use crate::backend::cpu::OpError;

/// A projection: rows `row0 .. row0 + out` of the weight `[*, in]` (and of
/// its bias, if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proj {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub row0: usize,
    pub out: usize,
}

impl Proj {
    /// All `out` rows of `weight` (and `bias`).
    pub fn whole(weight: ParamId, bias: Option<ParamId>, out: usize) -> Self {
        Self {
            weight,
            bias,
            row0: 0,
            out,
        }
    }
}

/// Everything that tells a vision block from a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockWiring {
    pub hidden: usize,
    pub intermediate: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub causal: bool,
    pub norm1: ParamId,
    pub norm2: ParamId,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

impl BlockWiring {
    /// A vision block: fused qkv (rows q | k | v), biases everywhere,
    /// bidirectional attention inside each window.
    pub fn vision(cfg: &VisionConfig, p: &VisionBlockParams) -> Self {
        let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let qkv = |row0| Proj {
            weight: p.qkv_w,
            bias: Some(p.qkv_b),
            row0,
            out: hid,
        };
        Self {
            hidden: hid,
            intermediate: inter,
            q_heads: cfg.num_heads,
            kv_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps as f32,
            causal: false,
            norm1: p.norm1,
            norm2: p.norm2,
            q: qkv(0),
            k: qkv(hid),
            v: qkv(2 * hid),
            o: Proj::whole(p.proj_w, Some(p.proj_b), hid),
            gate: Proj::whole(p.gate_w, Some(p.gate_b), inter),
            up: Proj::whole(p.up_w, Some(p.up_b), inter),
            down: Proj::whole(p.down_w, Some(p.down_b), hid),
        }
    }

    /// A Qwen2 decoder layer: biases on q, k, v only, causal GQA.
    pub fn text(cfg: &TextConfig, p: &TextLayerParams) -> Self {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        Self {
            hidden: h,
            intermediate: inter,
            q_heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
            causal: true,
            norm1: p.input_norm,
            norm2: p.post_norm,
            q: Proj::whole(p.q_w, Some(p.q_b), q_out),
            k: Proj::whole(p.k_w, Some(p.k_b), kv_out),
            v: Proj::whole(p.v_w, Some(p.v_b), kv_out),
            o: Proj::whole(p.o_w, None, h),
            gate: Proj::whole(p.gate_w, None, inter),
            up: Proj::whole(p.up_w, None, inter),
            down: Proj::whole(p.down_w, None, h),
        }
    }

    pub fn q_width(&self) -> usize {
        self.q_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The attention of this block over the spans of `cu_seqlens`.
    pub fn attention<'a>(&self, cu_seqlens: &'a [i32]) -> VarlenAttention<'a> {
        VarlenAttention {
            cu_seqlens_q: cu_seqlens,
            cu_seqlens_k: cu_seqlens,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
        }
    }
}

fn weight_rows<'w>(w: &'w Tensors, p: &Proj, inp: usize) -> (&'w [f32], Option<&'w [f32]>) {
    let rows = p.row0..p.row0 + p.out;
    (
        &w.get(p.weight)[rows.start * inp..rows.end * inp],
        p.bias.map(|b| &w.get(b)[rows]),
    )
}

/// `y[rows, out] = x[rows, inp] @ W^T (+ b)` for projection `p`.
fn project(w: &Tensors, p: &Proj, x: &[f32], inp: usize) -> Vec<f32> {
    let rows = x.len() / inp;
    let (wv, bv) = weight_rows(w, p, inp);
    let mut y = vec![0.0; rows * p.out];
    linear_fwd(x, wv, bv, rows, inp, p.out, &mut y);
    y
}

/// Backward of [`project`]: accumulates `dW`, `db`; `dx` gets `dy W`
/// added (`accumulate`) or written.
fn project_bwd(
    w: &Tensors,
    g: &mut Tensors,
    p: &Proj,
    x: &[f32],
    inp: usize,
    dy: &[f32],
    dx: Option<(&mut [f32], bool)>,
) {
    let rows = x.len() / inp;
    let (wv, _) = weight_rows(w, p, inp);
    let rows_w = p.row0 * inp..(p.row0 + p.out) * inp;
    let mut run = |dx_out: Option<&mut [f32]>| match p.bias {
        Some(b) => {
            let (dw, db) = g.pair_mut(p.weight, b);
            let db = &mut db[p.row0..p.row0 + p.out];
            linear_bwd(
                dy,
                x,
                wv,
                rows,
                inp,
                p.out,
                dx_out,
                &mut dw[rows_w.clone()],
                Some(db),
            );
        }
        None => {
            let dw = &mut g.get_mut(p.weight)[rows_w.clone()];
            linear_bwd(dy, x, wv, rows, inp, p.out, dx_out, dw, None);
        }
    };
    match dx {
        None => run(None),
        Some((dx, false)) => run(Some(dx)),
        Some((dx, true)) => {
            let mut delta = vec![0.0; rows * inp];
            run(Some(&mut delta));
            add_into(dx, &delta);
        }
    }
}

/// The attention half's inputs: the normed block input and q, k (after
/// RoPE) and v; shared by the full forward and the decode step.
pub struct Qkv {
    pub rstd1: Vec<f32>,
    pub h1: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub fn qkv_fwd(b: &BlockWiring, w: &Tensors, x: &[f32], rope: &RopeTable<f32>) -> Qkv {
    let n = x.len() / b.hidden;
    let (mut h1, mut rstd1) = (vec![0.0; n * b.hidden], vec![0.0; n]);
    rmsnorm_fwd(x, w.get(b.norm1), b.hidden, b.eps, &mut h1, &mut rstd1);
    let (q_raw, k_raw) = (
        project(w, &b.q, &h1, b.hidden),
        project(w, &b.k, &h1, b.hidden),
    );
    let v = project(w, &b.v, &h1, b.hidden);
    let (mut q, mut k) = (vec![0.0; q_raw.len()], vec![0.0; k_raw.len()]);
    rope_fwd(rope, &q_raw, b.q_heads, &mut q);
    rope_fwd(rope, &k_raw, b.kv_heads, &mut k);
    Qkv { rstd1, h1, q, k, v }
}

/// `x += o(attn)`.
pub fn o_residual(b: &BlockWiring, w: &Tensors, attn: &[f32], x: &mut [f32]) {
    add_into(x, &project(w, &b.o, attn, b.q_width()));
}

/// The MLP half's activations.
pub struct Mlp {
    pub rstd2: Vec<f32>,
    pub h2: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub act: Vec<f32>,
}

/// `x += down(silu(gate(h2)) * up(h2))` with `h2 = rmsnorm2(x)`.
pub fn mlp_fwd(b: &BlockWiring, w: &Tensors, x: &mut [f32]) -> Mlp {
    let n = x.len() / b.hidden;
    let (mut h2, mut rstd2) = (vec![0.0; n * b.hidden], vec![0.0; n]);
    rmsnorm_fwd(x, w.get(b.norm2), b.hidden, b.eps, &mut h2, &mut rstd2);
    let gate = project(w, &b.gate, &h2, b.hidden);
    let up = project(w, &b.up, &h2, b.hidden);
    let mut act = vec![0.0; gate.len()];
    swiglu_fwd(&gate, &up, &mut act);
    add_into(x, &project(w, &b.down, &act, b.intermediate));
    Mlp {
        rstd2,
        h2,
        gate,
        up,
        act,
    }
}

/// One block on `x` (updated in place), attending within the spans of
/// `cu_seqlens`; returns what its backward needs.
pub fn block_fwd(
    b: &BlockWiring,
    w: &Tensors,
    x: &mut [f32],
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
) -> Result<BlockActs, OpError> {
    let n = x.len() / b.hidden;
    let x_in = x.to_vec();
    let Qkv { rstd1, h1, q, k, v } = qkv_fwd(b, w, x, rope);
    let (mut attn, mut lse) = (vec![0.0; n * b.q_width()], vec![0.0; n * b.q_heads]);
    attention_fwd(&b.attention(cu_seqlens), &q, &k, &v, &mut attn, &mut lse)?;
    o_residual(b, w, &attn, x);
    let x_mid = x.to_vec();
    let mlp = mlp_fwd(b, w, x);
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

/// Backward of [`block_fwd`]: `dx` holds the gradient w.r.t. the block's
/// output on entry and w.r.t. its input on return; weight gradients
/// accumulate into `g`.
#[allow(clippy::too_many_arguments)]
pub fn block_bwd(
    b: &BlockWiring,
    w: &Tensors,
    acts: &BlockActs,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    dx: &mut [f32],
    g: &mut Tensors,
) -> Result<(), OpError> {
    let (hid, inter) = (b.hidden, b.intermediate);
    let n = dx.len() / hid;
    // MLP branch.
    let mut d_act = vec![0.0; n * inter];
    project_bwd(
        w,
        g,
        &b.down,
        &acts.act,
        inter,
        dx,
        Some((&mut d_act, false)),
    );
    let (mut d_gate, mut d_up) = (vec![0.0; n * inter], vec![0.0; n * inter]);
    swiglu_bwd(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up);
    let mut d_h2 = vec![0.0; n * hid];
    project_bwd(
        w,
        g,
        &b.gate,
        &acts.h2,
        hid,
        &d_gate,
        Some((&mut d_h2, false)),
    );
    project_bwd(w, g, &b.up, &acts.h2, hid, &d_up, Some((&mut d_h2, true)));
    let mut d_norm = vec![0.0; n * hid];
    rmsnorm_bwd(
        &d_h2,
        &acts.x_mid,
        w.get(b.norm2),
        &acts.rstd2,
        hid,
        &mut d_norm,
        g.get_mut(b.norm2),
    );
    add_into(dx, &d_norm);
    // Attention branch.
    let mut d_attn = vec![0.0; n * b.q_width()];
    project_bwd(
        w,
        g,
        &b.o,
        &acts.attn,
        b.q_width(),
        dx,
        Some((&mut d_attn, false)),
    );
    let (dq_raw, dk_raw, dv) = attention_rope_bwd(&b.attention(cu_seqlens), acts, rope, &d_attn)?;
    let mut d_h1 = vec![0.0; n * hid];
    project_bwd(w, g, &b.q, &acts.h1, hid, &dq_raw, Some((&mut d_h1, false)));
    project_bwd(w, g, &b.k, &acts.h1, hid, &dk_raw, Some((&mut d_h1, true)));
    project_bwd(w, g, &b.v, &acts.h1, hid, &dv, Some((&mut d_h1, true)));
    rmsnorm_bwd(
        &d_h1,
        &acts.x_in,
        w.get(b.norm1),
        &acts.rstd1,
        hid,
        &mut d_norm,
        g.get_mut(b.norm1),
    );
    add_into(dx, &d_norm);
    Ok(())
}
