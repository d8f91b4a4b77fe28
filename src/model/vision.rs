//! The vision tower: patch embed, 2D RoPE, window-permuted blocks (window or
//! full attention), the patch merger, and the inverse permutation.
//! Each layer's forward returns the activations its backward will need.

use super::config::VisionConfig;
use super::params::{MergerParams, Tensors, VisionBlockParams, VisionParams};
use super::positions::VisionLayout;
use crate::backend::cpu::activations::{gelu_fwd, swiglu_fwd};
use crate::backend::cpu::attention::{attention_fwd, VarlenAttention};
use crate::backend::cpu::linear::linear_fwd;
use crate::backend::cpu::rmsnorm::rmsnorm_fwd;
use crate::backend::cpu::rope::{rope_fwd, RopeTable};
use crate::backend::cpu::OpError;

/// What one vision block saw and made (input to its backward).
pub struct VisionBlockActs {
    pub x_in: Vec<f32>,
    pub rstd1: Vec<f32>,
    pub h1: Vec<f32>,
    /// q, k after RoPE and v, each `[N, heads, head_dim]`.
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

/// `x + f(x)` residual update in place.
fn add_into(x: &mut [f32], delta: &[f32]) {
    for (a, b) in x.iter_mut().zip(delta) {
        *a += b;
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
) -> Result<VisionBlockActs, OpError> {
    let (hd, heads, hid, inter) = (
        cfg.head_dim(),
        cfg.num_heads,
        cfg.hidden_size,
        cfg.intermediate_size,
    );
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
    let attn_cfg = VarlenAttention {
        cu_seqlens_q: cu_seqlens,
        cu_seqlens_k: cu_seqlens,
        q_heads: heads,
        kv_heads: heads,
        head_dim: hd,
        causal: false,
        scale: 1.0 / (hd as f64).sqrt(),
    };
    let (mut attn, mut lse) = (vec![0.0; n * hid], vec![0.0; n * heads]);
    attention_fwd(&attn_cfg, &q, &k, &v, &mut attn, &mut lse)?;
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
    Ok(VisionBlockActs {
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

/// Activations of a whole vision forward (kept only when training).
pub struct VisionActs {
    pub layout: VisionLayout,
    pub rope: RopeTable<f32>,
    pub patch_order: Vec<usize>,
    pub blocks: Vec<VisionBlockActs>,
    pub merger: MergerActs,
}

/// Runs the tower on the concatenated `pixel_values [N, patch_dim]` of the
/// images with patch grids `grids`. Returns `[N / unit, out_hidden]` in
/// processor order (image by image, raster over the merged grid), plus the
/// activations when `keep` is set.
pub fn vision_fwd(
    cfg: &VisionConfig,
    p: &VisionParams,
    w: &Tensors,
    pixel_values: &[f32],
    grids: &[[usize; 3]],
    keep: bool,
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
        if keep {
            blocks.push(acts);
        }
    }
    let (merged, merger) = merger_fwd(cfg, &p.merger, w, &x);
    // Undo the window permutation on merged tokens.
    let out_hid = cfg.out_hidden_size;
    let mut out = vec![0.0; merged.len()];
    for (i, &dst) in layout.window_index.iter().enumerate() {
        out[dst * out_hid..(dst + 1) * out_hid]
            .copy_from_slice(&merged[i * out_hid..(i + 1) * out_hid]);
    }
    let acts = keep.then_some(VisionActs {
        layout,
        rope,
        patch_order: order,
        blocks,
        merger,
    });
    Ok((out, acts))
}
