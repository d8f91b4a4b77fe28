//! The vision tower: patch embed, 2D RoPE, window-permuted blocks (window or
//! full attention), the patch merger, and the inverse permutation.
//! Each layer's forward returns the activations its backward will need.

use super::acts::{BlockActs, Save, SavedBlock};
use super::config::VisionConfig;
use super::grad_util::{add_into, attention_rope_bwd, linear_bwd_acc};
use super::params::{MergerParams, Tensors, VisionBlockParams, VisionParams};
use super::positions::VisionLayout;
use crate::backend::cpu::activations::{gelu_bwd, gelu_fwd, swiglu_bwd, swiglu_fwd};
use crate::backend::cpu::attention::{attention_fwd, VarlenAttention};
use crate::backend::cpu::linear::{linear_bwd, linear_fwd};
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::{rope_fwd, RopeTable};
use crate::backend::cpu::OpError;

/// Splits fused `qkv[N, 3 * hidden]` (rows q | k | v, head-major) into three.
fn split_qkv(qkv: &[f32], n: usize, hidden: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut q, mut k, mut v) = (
        Vec::with_capacity(n * hidden),
        Vec::with_capacity(n * hidden),
        Vec::with_capacity(n * hidden),
    );
    for row in qkv.chunks(3 * hidden) {
        q.extend_from_slice(&row[..hidden]);
        k.extend_from_slice(&row[hidden..2 * hidden]);
        v.extend_from_slice(&row[2 * hidden..]);
    }
    (q, k, v)
}

/// Bidirectional attention inside each window (or whole image).
fn attention_shape<'a>(cfg: &VisionConfig, cu_seqlens: &'a [i32]) -> VarlenAttention<'a> {
    VarlenAttention {
        cu_seqlens_q: cu_seqlens,
        cu_seqlens_k: cu_seqlens,
        q_heads: cfg.num_heads,
        kv_heads: cfg.num_heads,
        head_dim: cfg.head_dim(),
        causal: false,
        scale: 1.0 / (cfg.head_dim() as f64).sqrt(),
    }
}

/// One block: `x += proj(attn(rmsnorm1(x)))`, `x += mlp(rmsnorm2(x))`.
pub fn vision_block_fwd(
    cfg: &VisionConfig,
    p: &VisionBlockParams,
    w: &Tensors,
    x: &mut [f32],
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
) -> Result<BlockActs, OpError> {
    let (heads, hid, inter) = (cfg.num_heads, cfg.hidden_size, cfg.intermediate_size);
    let n = x.len() / hid;
    let eps = cfg.rms_norm_eps as f32;
    let x_in = x.to_vec();
    let (mut h1, mut rstd1) = (vec![0.0; n * hid], vec![0.0; n]);
    rmsnorm_fwd(x, w.get(p.norm1), hid, eps, &mut h1, &mut rstd1);
    let mut qkv = vec![0.0; n * 3 * hid];
    linear_fwd(
        &h1,
        w.get(p.qkv_w),
        Some(w.get(p.qkv_b)),
        n,
        hid,
        3 * hid,
        &mut qkv,
    );
    let (q_raw, k_raw, v) = split_qkv(&qkv, n, hid);
    let (mut q, mut k) = (vec![0.0; n * hid], vec![0.0; n * hid]);
    rope_fwd(rope, &q_raw, heads, &mut q);
    rope_fwd(rope, &k_raw, heads, &mut k);
    let (mut attn, mut lse) = (vec![0.0; n * hid], vec![0.0; n * heads]);
    attention_fwd(
        &attention_shape(cfg, cu_seqlens),
        &q,
        &k,
        &v,
        &mut attn,
        &mut lse,
    )?;
    let mut proj = vec![0.0; n * hid];
    linear_fwd(
        &attn,
        w.get(p.proj_w),
        Some(w.get(p.proj_b)),
        n,
        hid,
        hid,
        &mut proj,
    );
    add_into(x, &proj);
    let x_mid = x.to_vec();
    let (mut h2, mut rstd2) = (vec![0.0; n * hid], vec![0.0; n]);
    rmsnorm_fwd(x, w.get(p.norm2), hid, eps, &mut h2, &mut rstd2);
    let (mut gate, mut up, mut act) = (
        vec![0.0; n * inter],
        vec![0.0; n * inter],
        vec![0.0; n * inter],
    );
    linear_fwd(
        &h2,
        w.get(p.gate_w),
        Some(w.get(p.gate_b)),
        n,
        hid,
        inter,
        &mut gate,
    );
    linear_fwd(
        &h2,
        w.get(p.up_w),
        Some(w.get(p.up_b)),
        n,
        hid,
        inter,
        &mut up,
    );
    swiglu_fwd(&gate, &up, &mut act);
    let mut down = vec![0.0; n * hid];
    linear_fwd(
        &act,
        w.get(p.down_w),
        Some(w.get(p.down_b)),
        n,
        inter,
        hid,
        &mut down,
    );
    add_into(x, &down);
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
        rstd2,
        h2,
        gate,
        up,
        act,
    })
}

/// Backward of [`vision_block_fwd`]: `dx` holds the gradient w.r.t. the
/// block output on entry and w.r.t. its input on return; weight gradients
/// accumulate into `g`.
#[allow(clippy::too_many_arguments)]
pub fn vision_block_bwd(
    cfg: &VisionConfig,
    p: &VisionBlockParams,
    w: &Tensors,
    acts: &BlockActs,
    rope: &RopeTable<f32>,
    cu_seqlens: &[i32],
    dx: &mut [f32],
    g: &mut Tensors,
) -> Result<(), OpError> {
    let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let n = dx.len() / hid;
    // MLP branch.
    let mut d_act = vec![0.0; n * inter];
    {
        let (dw, db) = g.pair_mut(p.down_w, p.down_b);
        linear_bwd(
            dx,
            &acts.act,
            w.get(p.down_w),
            n,
            inter,
            hid,
            Some(&mut d_act),
            dw,
            Some(db),
        );
    }
    let (mut d_gate, mut d_up) = (vec![0.0; n * inter], vec![0.0; n * inter]);
    swiglu_bwd(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up);
    let mut d_h2 = vec![0.0; n * hid];
    for (dy, wid, bid) in [(&d_gate, p.gate_w, p.gate_b), (&d_up, p.up_w, p.up_b)] {
        let (dw, db) = g.pair_mut(wid, bid);
        linear_bwd_acc(
            dy,
            &acts.h2,
            w.get(wid),
            n,
            hid,
            inter,
            &mut d_h2,
            dw,
            Some(db),
        );
    }
    let mut d_norm = vec![0.0; n * hid];
    rmsnorm_bwd(
        &d_h2,
        &acts.x_mid,
        w.get(p.norm2),
        &acts.rstd2,
        hid,
        &mut d_norm,
        g.get_mut(p.norm2),
    );
    add_into(dx, &d_norm);
    // Attention branch.
    let mut d_attn = vec![0.0; n * hid];
    {
        let (dw, db) = g.pair_mut(p.proj_w, p.proj_b);
        linear_bwd(
            dx,
            &acts.attn,
            w.get(p.proj_w),
            n,
            hid,
            hid,
            Some(&mut d_attn),
            dw,
            Some(db),
        );
    }
    let (dq_raw, dk_raw, dv) =
        attention_rope_bwd(&attention_shape(cfg, cu_seqlens), acts, rope, &d_attn)?;
    // Re-fuse into d_qkv rows (q | k | v) for the fused projection.
    let mut d_qkv = Vec::with_capacity(n * 3 * hid);
    for i in 0..n {
        let r = i * hid..(i + 1) * hid;
        d_qkv.extend_from_slice(&dq_raw[r.clone()]);
        d_qkv.extend_from_slice(&dk_raw[r.clone()]);
        d_qkv.extend_from_slice(&dv[r]);
    }
    let mut d_h1 = vec![0.0; n * hid];
    {
        let (dw, db) = g.pair_mut(p.qkv_w, p.qkv_b);
        linear_bwd(
            &d_qkv,
            &acts.h1,
            w.get(p.qkv_w),
            n,
            hid,
            3 * hid,
            Some(&mut d_h1),
            dw,
            Some(db),
        );
    }
    rmsnorm_bwd(
        &d_h1,
        &acts.x_in,
        w.get(p.norm1),
        &acts.rstd1,
        hid,
        &mut d_norm,
        g.get_mut(p.norm1),
    );
    add_into(dx, &d_norm);
    Ok(())
}

/// What the merger saw and made.
pub struct MergerActs {
    pub x_in: Vec<f32>,
    pub rstd: Vec<f32>,
    pub normed: Vec<f32>,
    pub fc1: Vec<f32>,
    pub gelu: Vec<f32>,
}

/// `fc2(gelu(fc1(concat of each merge block's ln_q(patch)))) -> [N / unit, out]`.
pub fn merger_fwd(
    cfg: &VisionConfig,
    p: &MergerParams,
    w: &Tensors,
    x: &[f32],
) -> (Vec<f32>, MergerActs) {
    let hid = cfg.hidden_size;
    let n = x.len() / hid;
    let merged = hid * cfg.merge_unit();
    let m = n / cfg.merge_unit();
    let (mut normed, mut rstd) = (vec![0.0; n * hid], vec![0.0; n]);
    rmsnorm_fwd(
        x,
        w.get(p.ln_q),
        hid,
        cfg.rms_norm_eps as f32,
        &mut normed,
        &mut rstd,
    );
    // [N, hid] row-major is already [N / unit, unit * hid]: consecutive patches concatenate.
    let mut fc1 = vec![0.0; m * merged];
    linear_fwd(
        &normed,
        w.get(p.fc1_w),
        Some(w.get(p.fc1_b)),
        m,
        merged,
        merged,
        &mut fc1,
    );
    let mut gelu = vec![0.0; m * merged];
    gelu_fwd(&fc1, &mut gelu);
    let mut out = vec![0.0; m * cfg.out_hidden_size];
    linear_fwd(
        &gelu,
        w.get(p.fc2_w),
        Some(w.get(p.fc2_b)),
        m,
        merged,
        cfg.out_hidden_size,
        &mut out,
    );
    (
        out,
        MergerActs {
            x_in: x.to_vec(),
            rstd,
            normed,
            fc1,
            gelu,
        },
    )
}

/// Backward of [`merger_fwd`]: gradient w.r.t. its input `[N, hidden]`.
pub fn merger_bwd(
    cfg: &VisionConfig,
    p: &MergerParams,
    w: &Tensors,
    acts: &MergerActs,
    d_out: &[f32],
    g: &mut Tensors,
) -> Vec<f32> {
    let hid = cfg.hidden_size;
    let merged = hid * cfg.merge_unit();
    let m = d_out.len() / cfg.out_hidden_size;
    let mut d_gelu = vec![0.0; m * merged];
    {
        let (dw, db) = g.pair_mut(p.fc2_w, p.fc2_b);
        linear_bwd(
            d_out,
            &acts.gelu,
            w.get(p.fc2_w),
            m,
            merged,
            cfg.out_hidden_size,
            Some(&mut d_gelu),
            dw,
            Some(db),
        );
    }
    let mut d_fc1 = vec![0.0; m * merged];
    gelu_bwd(&d_gelu, &acts.fc1, &mut d_fc1);
    let mut d_normed = vec![0.0; m * merged];
    {
        let (dw, db) = g.pair_mut(p.fc1_w, p.fc1_b);
        linear_bwd(
            &d_fc1,
            &acts.normed,
            w.get(p.fc1_w),
            m,
            merged,
            merged,
            Some(&mut d_normed),
            dw,
            Some(db),
        );
    }
    let mut dx = vec![0.0; acts.x_in.len()];
    rmsnorm_bwd(
        &d_normed,
        &acts.x_in,
        w.get(p.ln_q),
        &acts.rstd,
        hid,
        &mut dx,
        g.get_mut(p.ln_q),
    );
    dx
}

/// Activations of a whole vision forward (kept only when training).
pub struct VisionActs {
    pub layout: VisionLayout,
    pub rope: RopeTable<f32>,
    pub patch_order: Vec<usize>,
    /// Per block: its activations, or only its input when recomputing.
    pub blocks: Vec<SavedBlock>,
    pub merger: MergerActs,
}

/// Runs the tower on the concatenated `pixel_values [N, patch_dim]` of the
/// images with patch grids `grids`. Returns `[N / unit, out_hidden]` in
/// processor order (image by image, raster over the merged grid), plus the
/// activations `save` asks for.
pub fn vision_fwd(
    cfg: &VisionConfig,
    p: &VisionParams,
    w: &Tensors,
    pixel_values: &[f32],
    grids: &[[usize; 3]],
    save: Save,
) -> Result<(Vec<f32>, Option<VisionActs>), OpError> {
    let (hid, pd, unit) = (cfg.hidden_size, cfg.patch_dim(), cfg.merge_unit());
    let n = pixel_values.len() / pd;
    assert_eq!(
        n,
        grids
            .iter()
            .map(|g| g.iter().product::<usize>())
            .sum::<usize>(),
        "vision: pixel rows vs grids"
    );
    let layout = VisionLayout::new(grids, cfg.spatial_merge_size, cfg.window_merged());
    let order = layout.patch_order(unit);

    // Patch embed (Conv3d without bias == matmul), then the window permutation.
    let mut embedded = vec![0.0; n * hid];
    linear_fwd(
        pixel_values,
        w.get(p.patch_embed),
        None,
        n,
        pd,
        hid,
        &mut embedded,
    );
    let mut x = vec![0.0; n * hid];
    for (dst, &src) in x.chunks_mut(hid).zip(&order) {
        dst.copy_from_slice(&embedded[src * hid..(src + 1) * hid]);
    }
    let rows: Vec<i32> = order.iter().map(|&i| layout.rows[i]).collect();
    let cols: Vec<i32> = order.iter().map(|&i| layout.cols[i]).collect();
    let rope = RopeTable::vision_2d(&rows, &cols, cfg.head_dim(), cfg.rope_theta);

    let mut blocks = Vec::new();
    for (i, bp) in p.blocks.iter().enumerate() {
        let cu = if cfg.fullatt_block_indexes.contains(&i) {
            &layout.cu_full
        } else {
            &layout.cu_window
        };
        let acts = vision_block_fwd(cfg, bp, w, &mut x, &rope, cu)?;
        blocks.extend(SavedBlock::keep(acts, save));
    }
    let (merged, merger) = merger_fwd(cfg, &p.merger, w, &x);
    // Undo the window permutation on merged tokens.
    let out_hid = cfg.out_hidden_size;
    let mut out = vec![0.0; merged.len()];
    for (i, &dst) in layout.window_index.iter().enumerate() {
        out[dst * out_hid..(dst + 1) * out_hid]
            .copy_from_slice(&merged[i * out_hid..(i + 1) * out_hid]);
    }
    let acts = (save != Save::Nothing).then_some(VisionActs {
        layout,
        rope,
        patch_order: order,
        blocks,
        merger,
    });
    Ok((out, acts))
}

/// Backward of [`vision_fwd`] from `d_out[N / unit, out_hidden]` (processor
/// order); accumulates every vision weight gradient into `g`.
pub fn vision_bwd(
    cfg: &VisionConfig,
    p: &VisionParams,
    w: &Tensors,
    acts: &VisionActs,
    pixel_values: &[f32],
    d_out: &[f32],
    g: &mut Tensors,
) -> Result<(), OpError> {
    let (hid, pd) = (cfg.hidden_size, cfg.patch_dim());
    let out_hid = cfg.out_hidden_size;
    // Inverse of the un-permutation: gather back into windowed order.
    let mut d_merged = vec![0.0; d_out.len()];
    for (i, &src) in acts.layout.window_index.iter().enumerate() {
        d_merged[i * out_hid..(i + 1) * out_hid]
            .copy_from_slice(&d_out[src * out_hid..(src + 1) * out_hid]);
    }
    let mut dx = merger_bwd(cfg, &p.merger, w, &acts.merger, &d_merged, g);
    for (i, (bp, saved)) in p.blocks.iter().zip(&acts.blocks).enumerate().rev() {
        let cu = if cfg.fullatt_block_indexes.contains(&i) {
            &acts.layout.cu_full
        } else {
            &acts.layout.cu_window
        };
        let recomputed;
        let block_acts = match saved {
            SavedBlock::All(a) => a,
            SavedBlock::Input(x_in) => {
                let mut x = x_in.clone();
                recomputed = vision_block_fwd(cfg, bp, w, &mut x, &acts.rope, cu)?;
                &recomputed
            }
        };
        vision_block_bwd(cfg, bp, w, block_acts, &acts.rope, cu, &mut dx, g)?;
    }
    // Undo the window permutation of patches, then the patch embedding.
    let n = dx.len() / hid;
    let mut d_embedded = vec![0.0; n * hid];
    for (i, &src) in acts.patch_order.iter().enumerate() {
        d_embedded[src * hid..(src + 1) * hid].copy_from_slice(&dx[i * hid..(i + 1) * hid]);
    }
    linear_bwd(
        &d_embedded,
        pixel_values,
        w.get(p.patch_embed),
        n,
        pd,
        hid,
        None,
        g.get_mut(p.patch_embed),
        None,
    );
    Ok(())
}
