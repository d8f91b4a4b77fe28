//! The vision tower: patch embed, 2D RoPE, window-permuted blocks (window or
//! full attention), the patch merger, and the inverse permutation.
//! Each layer's forward returns the activations its backward will need.

use super::acts::{Save, SavedBlock};
use super::block::{block_bwd, block_fwd, BlockWiring};
use super::config::VisionConfig;
use super::params::{MergerParams, Tensors, VisionParams};
use super::positions::VisionLayout;
use crate::backend::cpu::activations::{gelu_bwd, gelu_fwd};
use crate::backend::cpu::linear::{linear_bwd, linear_fwd};
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cpu::OpError;

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
        let acts = block_fwd(&BlockWiring::vision(cfg, bp), w, &mut x, &rope, cu)?;
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
        let wiring = BlockWiring::vision(cfg, bp);
        let recomputed;
        let block_acts = match saved {
            SavedBlock::All(a) => a,
            SavedBlock::Input(x_in) => {
                let mut x = x_in.clone();
                recomputed = block_fwd(&wiring, w, &mut x, &acts.rope, cu)?;
                &recomputed
            }
        };
        block_bwd(&wiring, w, block_acts, &acts.rope, cu, &mut dx, g)?;
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
