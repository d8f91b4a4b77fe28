//! The pre-norm transformer block both towers are made of: `x += o(attn(
//! rope(q(h1)), rope(k(h1)), v(h1)))` with `h1 = rmsnorm1(x)`, then
//! `x += down(silu(gate(h2)) * up(h2))` with `h2 = rmsnorm2(x)`. A vision
//! block and a decoder layer differ only in their [`BlockWiring`]: widths,
//! head counts, which projections have biases, a fused qkv weight (row
//! ranges of one tensor) or three, and causal or windowed attention. The
//! forward and backward are written once, over any [`Backend`].

use super::acts::BlockActs;
use super::config::{TextConfig, VisionConfig};
use super::graph::Graph;
use super::params::{ParamId, TextLayerParams, VisionBlockParams};
use crate::backend::desc::AttnSpec;
use crate::ops::{Backend, Buffer, Result, WeightGrads, WeightRows};

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

    /// The attention of this block (its spans come with the call).
    pub fn attention(&self) -> AttnSpec {
        AttnSpec {
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
        }
    }
}

/// Mutable references to two different entries of `v`.
pub fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut: the same entry twice");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

/// The attention half's inputs: the normed block input and q, k (after
/// RoPE) and v; shared by the full forward and the decode step.
pub struct Qkv<B: Backend> {
    pub rstd1: B::Buf,
    pub h1: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
}

/// The MLP half's activations.
pub struct Mlp<B: Backend> {
    pub rstd2: B::Buf,
    pub h2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub act: B::Buf,
}

impl<B: Backend> Graph<'_, B> {
    fn rows_of(&self, p: &Proj) -> WeightRows<'_, B::Buf> {
        WeightRows {
            weight: self.w(p.weight),
            bias: p.bias.map(|b| self.w(b)),
            rows: p.row0..p.row0 + p.out,
        }
    }

    /// `y[rows, out] = x[rows, inp] @ W^T (+ b)` for projection `p`.
    pub fn project(&self, p: &Proj, x: &B::Buf, inp: usize) -> Result<B::Buf> {
        self.be.linear_fwd(x, x.len() / inp, inp, &self.rows_of(p))
    }

    /// Backward of [`Self::project`]: accumulates `dW`, `db` into `g`.
    fn project_bwd(
        &self,
        g: &mut [B::Buf],
        p: &Proj,
        x: &B::Buf,
        inp: usize,
        dy: &B::Buf,
        want_dx: bool,
    ) -> Result<Option<B::Buf>> {
        let grads = match p.bias {
            Some(b) => {
                let (weight, bias) = two_mut(g, p.weight.0, b.0);
                WeightGrads {
                    weight,
                    bias: Some(bias),
                    rows: p.row0..p.row0 + p.out,
                }
            }
            None => WeightGrads {
                weight: &mut g[p.weight.0],
                bias: None,
                rows: p.row0..p.row0 + p.out,
            },
        };
        self.be
            .linear_bwd(dy, x, x.len() / inp, inp, self.w(p.weight), grads, want_dx)
    }

    /// Backward of a projection whose `dx` adds into `acc`.
    fn project_bwd_add(
        &self,
        g: &mut [B::Buf],
        p: &Proj,
        x: &B::Buf,
        inp: usize,
        dy: &B::Buf,
        acc: &mut B::Buf,
    ) -> Result<()> {
        let dx = self.project_bwd(g, p, x, inp, dy, true)?;
        self.be.add_into(acc, &dx.expect("asked for dx"))
    }

    fn project_bwd_new(
        &self,
        g: &mut [B::Buf],
        p: &Proj,
        x: &B::Buf,
        inp: usize,
        dy: &B::Buf,
    ) -> Result<B::Buf> {
        Ok(self
            .project_bwd(g, p, x, inp, dy, true)?
            .expect("asked for dx"))
    }

    /// `rmsnorm1(x)`, then q, k (roped) and v.
    pub fn qkv_fwd(&self, b: &BlockWiring, x: &B::Buf, rope: &B::Rope) -> Result<Qkv<B>> {
        let be = self.be;
        let (h1, rstd1) = be.rmsnorm_fwd(x, self.w(b.norm1), b.hidden, b.eps)?;
        let q_raw = self.project(&b.q, &h1, b.hidden)?;
        let k_raw = self.project(&b.k, &h1, b.hidden)?;
        let v = self.project(&b.v, &h1, b.hidden)?;
        let q = be.rope_apply(rope, &q_raw, b.q_heads, false)?;
        let k = be.rope_apply(rope, &k_raw, b.kv_heads, false)?;
        Ok(Qkv { rstd1, h1, q, k, v })
    }

    /// `x += o(attn)`.
    pub fn o_residual(&self, b: &BlockWiring, attn: &B::Buf, x: &mut B::Buf) -> Result<()> {
        let o = self.project(&b.o, attn, b.q_width())?;
        self.be.add_into(x, &o)
    }

    /// `x += down(silu(gate(h2)) * up(h2))` with `h2 = rmsnorm2(x)`.
    pub fn mlp_fwd(&self, b: &BlockWiring, x: &mut B::Buf) -> Result<Mlp<B>> {
        let be = self.be;
        let (h2, rstd2) = be.rmsnorm_fwd(x, self.w(b.norm2), b.hidden, b.eps)?;
        let gate = self.project(&b.gate, &h2, b.hidden)?;
        let up = self.project(&b.up, &h2, b.hidden)?;
        let act = be.swiglu_fwd(&gate, &up)?;
        let down = self.project(&b.down, &act, b.intermediate)?;
        be.add_into(x, &down)?;
        Ok(Mlp {
            rstd2,
            h2,
            gate,
            up,
            act,
        })
    }

    /// One block on `x` (updated in place), attending within the spans of
    /// `cu`; returns what its backward needs.
    pub fn block_fwd(
        &self,
        b: &BlockWiring,
        x: &mut B::Buf,
        rope: &B::Rope,
        cu: &B::Seqlens,
    ) -> Result<BlockActs<B>> {
        let be = self.be;
        let x_in = be.copy(x)?;
        let Qkv { rstd1, h1, q, k, v } = self.qkv_fwd(b, x, rope)?;
        let (attn, lse) = be.attention_fwd(&b.attention(), cu, &q, &k, &v)?;
        self.o_residual(b, &attn, x)?;
        let x_mid = be.copy(x)?;
        let mlp = self.mlp_fwd(b, x)?;
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

    /// Backward of [`Self::block_fwd`]: `dx` holds the gradient w.r.t. the
    /// block's output on entry and w.r.t. its input on return; weight
    /// gradients accumulate into `g`.
    pub fn block_bwd(
        &self,
        b: &BlockWiring,
        acts: &BlockActs<B>,
        rope: &B::Rope,
        cu: &B::Seqlens,
        dx: &mut B::Buf,
        g: &mut [B::Buf],
    ) -> Result<()> {
        let be = self.be;
        let (hid, inter) = (b.hidden, b.intermediate);
        // MLP branch.
        let d_act = self.project_bwd_new(g, &b.down, &acts.act, inter, dx)?;
        let (d_gate, d_up) = be.swiglu_bwd(&d_act, &acts.gate, &acts.up)?;
        let mut d_h2 = self.project_bwd_new(g, &b.gate, &acts.h2, hid, &d_gate)?;
        self.project_bwd_add(g, &b.up, &acts.h2, hid, &d_up, &mut d_h2)?;
        let d_norm = be.rmsnorm_bwd(
            &d_h2,
            &acts.x_mid,
            self.w(b.norm2),
            &acts.rstd2,
            hid,
            &mut g[b.norm2.0],
        )?;
        be.add_into(dx, &d_norm)?;
        // Attention branch.
        let d_attn = self.project_bwd_new(g, &b.o, &acts.attn, b.q_width(), dx)?;
        let (dq, dk, dv) = be.attention_bwd(
            &b.attention(),
            cu,
            &acts.q,
            &acts.k,
            &acts.v,
            &acts.attn,
            &acts.lse,
            &d_attn,
        )?;
        let dq_raw = be.rope_apply(rope, &dq, b.q_heads, true)?;
        let dk_raw = be.rope_apply(rope, &dk, b.kv_heads, true)?;
        let mut d_h1 = self.project_bwd_new(g, &b.q, &acts.h1, hid, &dq_raw)?;
        self.project_bwd_add(g, &b.k, &acts.h1, hid, &dk_raw, &mut d_h1)?;
        self.project_bwd_add(g, &b.v, &acts.h1, hid, &dv, &mut d_h1)?;
        let d_norm = be.rmsnorm_bwd(
            &d_h1,
            &acts.x_in,
            self.w(b.norm1),
            &acts.rstd1,
            hid,
            &mut g[b.norm1.0],
        )?;
        be.add_into(dx, &d_norm)
    }

    /// The block's activations from what was saved (recomputed from its
    /// input under [`super::acts::Save::Inputs`]).
    pub fn block_acts<'a>(
        &self,
        b: &BlockWiring,
        saved: &'a super::acts::SavedBlock<B>,
        rope: &B::Rope,
        cu: &B::Seqlens,
        recomputed: &'a mut Option<BlockActs<B>>,
    ) -> Result<&'a BlockActs<B>> {
        Ok(match saved {
            super::acts::SavedBlock::All(a) => a,
            super::acts::SavedBlock::Input(x_in) => {
                let mut x = self.be.copy(x_in)?;
                recomputed.insert(self.block_fwd(b, &mut x, rope, cu)?)
            }
        })
    }
}
