//! ZeRO-2 for data-parallel ranks: the parameters are viewed as one flat
//! vector (the layout's tensors one after another), cut into `world_size`
//! contiguous shards. Each rank owns one shard of the fp32 gradients
//! (reduce-scattered), of the fp32 master weights and of AdamW's moments,
//! steps it, and all-gathers the updated weights so every rank holds the
//! whole model for its next forward.

use super::optimizer::{AdamW, StepReport, WeightPrecision};
use crate::backend::cpu::adamw::{adamw_step, AdamWConfig};
use crate::backend::desc::clip_coefficient;
use crate::distributed::{Collective, DistError};
use crate::model::params::Tensors;
use half::bf16;
use rayon::prelude::*;
use std::ops::Range;

/// The contiguous block of `len` items that rank `rank` of `world` owns:
/// the first `len % world` ranks take one more.
pub fn share(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Elements per shard of a flat vector of `numel` over `world` ranks (the
/// last shard is padded with zeros up to it).
pub fn shard_len(numel: usize, world: usize) -> usize {
    numel.div_ceil(world.max(1))
}

/// `tensors` one after another.
pub fn flatten(tensors: &Tensors) -> Vec<f32> {
    tensors.0.concat()
}

/// Copies `flat` back into `tensors` (same total size).
pub fn unflatten(flat: &[f32], tensors: &mut Tensors) {
    let mut at = 0;
    for t in &mut tensors.0 {
        let len = t.len();
        t.copy_from_slice(&flat[at..at + len]);
        at += len;
    }
}

/// One rank's share of AdamW's state.
pub struct ShardedAdamW {
    pub cfg: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    /// Steps taken so far, the same on every rank.
    pub step: u64,
    /// The model's weights are the masters rounded to bf16.
    pub bf16_model: bool,
    /// This rank's elements of the flat parameter vector.
    pub range: Range<usize>,
    /// Elements in the whole flat vector.
    pub numel: usize,
    pub world_size: usize,
    /// fp32 master weights, first and second moments of `range`.
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl ShardedAdamW {
    /// Rank `rank`'s shard of a whole optimizer over `weights` (a fresh
    /// run, or a checkpoint saved without shards).
    pub fn from_full(opt: &AdamW, weights: &Tensors, rank: usize, world_size: usize) -> Self {
        let numel: usize = weights.0.iter().map(Vec::len).sum();
        let range = Self::range_of(numel, rank, world_size);
        let slice = |t: &Tensors| flat_range(t, range.clone());
        Self {
            cfg: opt.cfg,
            max_grad_norm: opt.max_grad_norm,
            step: opt.step,
            bf16_model: opt.precision() == WeightPrecision::Bf16Model,
            master: slice(opt.master.as_ref().unwrap_or(weights)),
            exp_avg: slice(&opt.exp_avg),
            exp_avg_sq: slice(&opt.exp_avg_sq),
            range,
            numel,
            world_size,
        }
    }

    /// The elements rank `rank` of `world_size` owns (the last shard may be
    /// short or empty: the padding is owned by no state).
    pub fn range_of(numel: usize, rank: usize, world_size: usize) -> Range<usize> {
        let n = shard_len(numel, world_size);
        (rank * n).min(numel)..((rank + 1) * n).min(numel)
    }

    /// One AdamW step from this rank's summed-by-itself gradients `grads`
    /// (the whole flat vector): reduce-scatter, the global norm over the
    /// shards, clipping, the step on the shard, then every rank's updated
    /// weights (bf16-rounded for a bf16 model) all-gathered into `weights`.
    /// A non-finite norm skips the step on every rank alike.
    pub fn step(
        &mut self,
        group: &mut dyn Collective,
        grads: &[f32],
        weights: &mut [f32],
    ) -> Result<StepReport, DistError> {
        let world = group.world_size();
        let n = shard_len(self.numel, world);
        let mut padded = vec![0.0f32; n * world];
        padded[..grads.len()].copy_from_slice(grads);
        let mut shard = vec![0.0f32; n];
        group.reduce_scatter_sum(&padded, &mut shard)?;
        drop(padded);
        let owned = self.range.len();
        let mut sq = [sum_of_squares(&shard[..owned])];
        group.all_reduce_sum_f64(&mut sq)?;
        let grad_norm = sq[0].sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepReport {
                grad_norm,
                skipped: true,
            });
        }
        self.step += 1;
        let scale = clip_coefficient(grad_norm, self.max_grad_norm.unwrap_or(f64::INFINITY));
        if scale != 1.0 {
            shard.iter_mut().for_each(|g| *g *= scale);
        }
        let mut updated = vec![0.0f32; n];
        if self.bf16_model {
            let mut rounded = vec![bf16::ZERO; owned];
            adamw_step(
                &self.cfg,
                self.step,
                &mut self.master,
                &shard[..owned],
                &mut self.exp_avg,
                &mut self.exp_avg_sq,
                Some(&mut rounded),
            );
            for (u, r) in updated.iter_mut().zip(&rounded) {
                *u = r.to_f32();
            }
        } else {
            adamw_step(
                &self.cfg,
                self.step,
                &mut self.master,
                &shard[..owned],
                &mut self.exp_avg,
                &mut self.exp_avg_sq,
                None,
            );
            updated[..owned].copy_from_slice(&self.master);
        }
        let mut all = vec![0.0f32; n * world];
        group.all_gather(&updated, &mut all)?;
        weights.copy_from_slice(&all[..self.numel]);
        Ok(StepReport {
            grad_norm,
            skipped: false,
        })
    }
}

/// The sum of squares in f64, over fixed chunks added in order (the same
/// bits whatever the thread scheduling).
fn sum_of_squares(v: &[f32]) -> f64 {
    let partial: Vec<f64> = v
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// Elements `range` of `tensors` viewed as one flat vector.
pub fn flat_range(tensors: &Tensors, range: Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(range.len());
    let mut at = 0;
    for t in &tensors.0 {
        let (a, b) = (at, at + t.len());
        let (lo, hi) = (range.start.max(a), range.end.min(b));
        if lo < hi {
            out.extend_from_slice(&t[lo - a..hi - a]);
        }
        at = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::threads::ThreadGroup;
    use std::time::Duration;

    #[test]
    fn shares_cover_every_item_once_in_order() {
        for (len, world) in [(10, 3), (2, 4), (0, 2), (7, 1)] {
            let parts: Vec<Range<usize>> = (0..world).map(|r| share(len, r, world)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[world - 1].end, len);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
            }
        }
    }

    #[test]
    fn flat_ranges_cross_tensor_boundaries() {
        let t = Tensors(vec![vec![0.0, 1.0, 2.0], vec![3.0], vec![4.0, 5.0]]);
        assert_eq!(flat_range(&t, 2..5), vec![2.0, 3.0, 4.0]);
        assert_eq!(flat_range(&t, 6..6), Vec::<f32>::new());
        let mut u = Tensors(vec![vec![0.0; 3], vec![0.0], vec![0.0; 2]]);
        unflatten(&flatten(&t), &mut u);
        assert_eq!(u.0, t.0);
    }

    /// Sharded AdamW over 3 ranks, each holding a third of the gradient
    /// sum, lands on the weights one whole AdamW step gives on the summed
    /// gradient (clipping on), in both weight precisions.
    #[test]
    fn three_shards_step_like_one_whole_optimizer() {
        for precision in [WeightPrecision::Fp32, WeightPrecision::Bf16Model] {
            let weights = Tensors(vec![
                (0..7).map(|i| i as f32 * 0.1 - 0.3).collect(),
                (0..4).map(|i| 0.05 * i as f32).collect(),
            ]);
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|r| {
                    (0..11)
                        .map(|i| ((i * 7 + r * 3) % 5) as f32 - 2.0)
                        .collect()
                })
                .collect();
            let cfg = AdamWConfig {
                lr: 0.01,
                ..AdamWConfig::default()
            };
            let mut whole = AdamW::new(&weights, cfg, Some(1.0), precision);
            let mut want = weights.clone();
            let total: Vec<f32> = (0..11)
                .map(|i| grads[0][i] + grads[1][i] + grads[2][i])
                .collect();
            let mut g = Tensors(vec![total[..7].to_vec(), total[7..].to_vec()]);
            whole.step(&mut want, &mut g);
            let handles = ThreadGroup::new(3, Duration::from_secs(10));
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let joins: Vec<_> = handles
                    .into_iter()
                    .zip(&grads)
                    .map(|(mut h, g)| {
                        let opt = AdamW::new(&weights, cfg, Some(1.0), precision);
                        let weights = &weights;
                        s.spawn(move || {
                            let mut z = ShardedAdamW::from_full(&opt, weights, h.rank(), 3);
                            let mut out = flatten(weights);
                            let report = z.step(&mut h, g, &mut out).unwrap();
                            assert!(!report.skipped);
                            out
                        })
                    })
                    .collect();
                joins.into_iter().map(|j| j.join().unwrap()).collect()
            });
            let want = flatten(&want);
            for got in results {
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}
