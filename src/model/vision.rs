//! The vision tower: patch embed, 2D RoPE, window-permuted blocks (window or
//! full attention), the patch merger, and the inverse permutation.
//! Each layer's forward returns the activations its backward will need.

use super::acts::{Save, SavedBlock};
use super::block::{two_mut, BlockWiring};
use super::graph::Graph;
use super::plan::VisionPlan;
use crate::backend::desc::RopeFreqs;
use crate::ops::{Backend, Buffer, Result, WeightGrads, WeightRows};

/// A vision plan's index arrays and rotary table on the backend.
pub struct VisionInputs<B: Backend> {
    /// Processor-order patch of each windowed position.
    pub patch_order: B::Index,
    /// Windowed merged token -> processor order.
    pub window_index: B::Index,
    pub cu_window: B::Seqlens,
    pub cu_full: B::Seqlens,
    pub rope: B::Rope,
}

impl<B: Backend> VisionInputs<B> {
    pub fn upload(g: &Graph<'_, B>, plan: &VisionPlan) -> Result<Self> {
        let vc = &g.cfg.vision;
        let n = plan.patch_order.len();
        let (rows, cols) = plan.positions.split_at(n);
        let freqs = RopeFreqs::vision_2d(vc.head_dim(), vc.rope_theta);
        Ok(Self {
            patch_order: g.be.index(&plan.patch_order)?,
            window_index: g.be.index(&plan.window_index)?,
            cu_window: g.be.seqlens(&plan.layout.cu_window)?,
            cu_full: g.be.seqlens(&plan.layout.cu_full)?,
            rope: g.be.rope(&freqs, &[rows, cols])?,
        })
    }

    fn spans(&self, full: bool) -> &B::Seqlens {
        if full {
            &self.cu_full
        } else {
            &self.cu_window
        }
    }
}

/// What the merger saw and made.
pub struct MergerActs<B: Backend> {
    pub x_in: B::Buf,
    pub rstd: B::Buf,
    pub normed: B::Buf,
    pub fc1: B::Buf,
    pub gelu: B::Buf,
}

/// Activations of a whole vision forward (kept only when training).
pub struct VisionActs<B: Backend> {
    /// Per block: its activations, or only its input when recomputing.
    pub blocks: Vec<SavedBlock<B>>,
    pub merger: MergerActs<B>,
}

impl<B: Backend> Graph<'_, B> {
    /// `fc2(gelu(fc1(concat of each merge block's ln_q(patch)))) -> [N / unit, out]`.
    pub fn merger_fwd(&self, x: B::Buf) -> Result<(B::Buf, MergerActs<B>)> {
        let (cfg, p, be) = (&self.cfg.vision, &self.layout.vision.merger, self.be);
        let hid = cfg.hidden_size;
        let merged = hid * cfg.merge_unit();
        let (normed, rstd) = be.rmsnorm_fwd(&x, self.w(p.ln_q), hid, cfg.rms_norm_eps as f32)?;
        // [N, hid] row-major is already [N / unit, unit * hid]: consecutive
        // patches concatenate.
        let m = normed.len() / merged;
        let fc1 = be.linear_fwd(&normed, m, merged, &self.full(p.fc1_w, Some(p.fc1_b)))?;
        let gelu = be.gelu_fwd(&fc1)?;
        let out = be.linear_fwd(&gelu, m, merged, &self.full(p.fc2_w, Some(p.fc2_b)))?;
        Ok((
            out,
            MergerActs {
                x_in: x,
                rstd,
                normed,
                fc1,
                gelu,
            },
        ))
    }

    /// Backward of [`Self::merger_fwd`]: gradient w.r.t. its input `[N, hidden]`.
    pub fn merger_bwd(
        &self,
        acts: &MergerActs<B>,
        d_out: &B::Buf,
        g: &mut [B::Buf],
    ) -> Result<B::Buf> {
        let (cfg, p, be) = (&self.cfg.vision, &self.layout.vision.merger, self.be);
        let hid = cfg.hidden_size;
        let merged = hid * cfg.merge_unit();
        let m = d_out.len() / cfg.out_hidden_size;
        let d_gelu = be
            .linear_bwd(
                d_out,
                &acts.gelu,
                m,
                merged,
                self.w(p.fc2_w),
                full_grads(g, p.fc2_w.0, p.fc2_b.0, cfg.out_hidden_size),
                true,
            )?
            .expect("asked for dx");
        let d_fc1 = be.gelu_bwd(&d_gelu, &acts.fc1)?;
        let d_normed = be
            .linear_bwd(
                &d_fc1,
                &acts.normed,
                m,
                merged,
                self.w(p.fc1_w),
                full_grads(g, p.fc1_w.0, p.fc1_b.0, merged),
                true,
            )?
            .expect("asked for dx");
        be.rmsnorm_bwd(
            &d_normed,
            &acts.x_in,
            self.w(p.ln_q),
            &acts.rstd,
            hid,
            &mut g[p.ln_q.0],
        )
    }

    /// All rows of `weight` (and `bias`).
    pub(crate) fn full(
        &self,
        weight: super::params::ParamId,
        bias: Option<super::params::ParamId>,
    ) -> WeightRows<'_, B::Buf> {
        let rows = self.layout.specs[weight.0].shape[0];
        WeightRows {
            weight: self.w(weight),
            bias: bias.map(|b| self.w(b)),
            rows: 0..rows,
        }
    }

    /// Runs the tower on the concatenated `pixels [N, patch_dim]` of the
    /// images laid out by `vi`. Returns `[N / unit, out_hidden]` in
    /// processor order (image by image, raster over the merged grid), plus
    /// the activations `save` asks for.
    pub fn vision_fwd(
        &self,
        pixels: &B::Buf,
        vi: &VisionInputs<B>,
        save: Save,
    ) -> Result<(B::Buf, Option<VisionActs<B>>)> {
        let (cfg, p, be) = (&self.cfg.vision, &self.layout.vision, self.be);
        let (hid, pd) = (cfg.hidden_size, cfg.patch_dim());
        let n = pixels.len() / pd;
        // Patch embed (Conv3d without bias == matmul), then the window permutation.
        let embedded = be.linear_fwd(pixels, n, pd, &self.full(p.patch_embed, None))?;
        let mut x = be.gather_rows(&embedded, &vi.patch_order, hid)?;
        drop(embedded);
        let mut blocks = Vec::new();
        for (i, bp) in p.blocks.iter().enumerate() {
            let cu = vi.spans(cfg.fullatt_block_indexes.contains(&i));
            let ids = self.layout.vision_block_ids(i);
            let acts = self.with_unit(ids, |unit| {
                unit.block_fwd(&BlockWiring::vision(cfg, bp), &mut x, &vi.rope, cu)
            })?;
            blocks.extend(SavedBlock::keep(acts, save));
        }
        let (merged, merger) = self.merger_fwd(x)?;
        // Undo the window permutation on merged tokens.
        let mut out = be.zeros(merged.len())?;
        be.scatter_rows(&merged, &vi.window_index, cfg.out_hidden_size, &mut out)?;
        let acts = (save != Save::Nothing).then_some(VisionActs { blocks, merger });
        Ok((out, acts))
    }

    /// Backward of [`Self::vision_fwd`] from `d_out[N / unit, out_hidden]`
    /// (processor order); accumulates every vision weight gradient into `g`.
    pub fn vision_bwd(
        &self,
        acts: &VisionActs<B>,
        vi: &VisionInputs<B>,
        pixels: &B::Buf,
        d_out: &B::Buf,
        g: &mut [B::Buf],
    ) -> Result<()> {
        let (cfg, p, be) = (&self.cfg.vision, &self.layout.vision, self.be);
        let (hid, pd) = (cfg.hidden_size, cfg.patch_dim());
        // Inverse of the un-permutation: gather back into windowed order.
        let d_merged = be.gather_rows(d_out, &vi.window_index, cfg.out_hidden_size)?;
        let mut dx = self.merger_bwd(&acts.merger, &d_merged, g)?;
        for (i, (bp, saved)) in p.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            let cu = vi.spans(cfg.fullatt_block_indexes.contains(&i));
            let wiring = BlockWiring::vision(cfg, bp);
            let ids = self.layout.vision_block_ids(i);
            self.with_unit_grads(ids, g, |unit, g| {
                let mut recomputed = None;
                let block = unit.block_acts(&wiring, saved, &vi.rope, cu, &mut recomputed)?;
                unit.block_bwd(&wiring, block, &vi.rope, cu, &mut dx, g)
            })?;
        }
        // Undo the window permutation of patches, then the patch embedding.
        let n = dx.len() / hid;
        let mut d_embedded = be.zeros(n * hid)?;
        be.scatter_rows(&dx, &vi.patch_order, hid, &mut d_embedded)?;
        be.linear_bwd(
            &d_embedded,
            pixels,
            n,
            pd,
            self.w(p.patch_embed),
            WeightGrads {
                weight: &mut g[p.patch_embed.0],
                bias: None,
                rows: 0..hid,
            },
            false,
        )?;
        Ok(())
    }
}

/// Gradients of all `out` rows of a weight and its bias.
fn full_grads<T>(g: &mut [T], weight: usize, bias: usize, out: usize) -> WeightGrads<'_, T>
where
    T: Buffer,
{
    let (weight, bias) = two_mut(g, weight, bias);
    WeightGrads {
        weight,
        bias: Some(bias),
        rows: 0..out,
    }
}
