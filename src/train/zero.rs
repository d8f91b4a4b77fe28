//! ZeRO-2 and ZeRO-3 for data-parallel ranks, on each rank's backend: every parameter
//! tensor of L elements is cut into `world_size` shards of `ceil(L / N)`
//! (the last one padded with zeros). Rank r owns shard r of every tensor:
//! the fp32 sum of the ranks' gradients there (reduce-scattered), the fp32
//! master weights and AdamW's moments. It steps its shards and the updated
//! weights are all-gathered into every rank's whole model. With ZeRO-3 the
//! weights stay sharded too: the model gathers each unit's (a block's, or
//! the root's) just before it runs in the update ([`UnitGather`]), and the
//! whole model is gathered only for the phases that sample from it
//! (rollouts, validation, saving). On GPUs the gradients and weights move
//! between devices through NCCL only; other backends go through the
//! group's host collectives.

use super::optimizer::{AdamW, StepReport};
use crate::backend::cpu::adamw::AdamWConfig;
use crate::backend::desc::clip_coefficient;
use crate::distributed::{Collective, DistError};
use crate::model::engine::Engine;
use crate::model::graph::GatherWeights;
use crate::model::params::Tensors;
use crate::model::params::{ParamId, ParamLayout};
use crate::model::ModelError;
use crate::ops::cuda::DeviceBuf;
use crate::ops::{Backend, Buffer, DType, Precision};
use std::any::Any;
use std::ops::Range;

/// The contiguous block of `len` items that rank `rank` of `world` owns:
/// the first `len % world` ranks take one more.
pub fn share(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Elements per shard of a tensor of `len` over `world` ranks.
pub fn shard_len(len: usize, world: usize) -> usize {
    len.div_ceil(world.max(1))
}

/// The elements of a tensor of `len` that rank `rank` of `world` owns (the
/// last ranks' may be short or empty: padding is owned by no state).
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let n = shard_len(len, world);
    (rank * n).min(len)..((rank + 1) * n).min(len)
}

/// Why a sharded step failed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<crate::ops::Error> for ZeroError {
    fn from(e: crate::ops::Error) -> Self {
        ZeroError::Model(ModelError::from(e))
    }
}

/// One rank's share of AdamW's state, on its backend.
pub struct ShardedAdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    /// Steps taken so far, the same on every rank.
    pub step: u64,
    pub rank: usize,
    pub world_size: usize,
    /// The model holds bf16 weights: the masters rounded.
    pub bf16_model: bool,
    /// Elements of every parameter tensor, in layout order.
    pub lens: Vec<usize>,
    /// fp32 master weights, first and second moments: this rank's shard of
    /// each tensor (`shard_len` elements, zeros past the tensor's end).
    master: Vec<B::Buf>,
    exp_avg: Vec<B::Buf>,
    exp_avg_sq: Vec<B::Buf>,
    /// The shards' weights in the model's dtype (bf16 models).
    copies: Option<Vec<B::Buf>>,
    /// ZeRO-3: the engine's weights are released outside the phases that
    /// need them whole, and gathered unit by unit in the update.
    pub zero3: bool,
    /// Whether the engine holds the whole weights now.
    resident: bool,
    /// ZeRO-3: this rank's shard of the gradients summed over ranks, as
    /// the backward hands each unit's over (zeroed after each step).
    grad_acc: Vec<B::Buf>,
}

impl<B: Backend> ShardedAdamW<B> {
    /// Rank `rank`'s shard of a whole optimizer (a fresh run, or a loaded
    /// checkpoint) over `weights`, on `engine`'s backend.
    pub fn from_full(
        opt: &AdamW,
        weights: &Tensors,
        engine: &Engine<B>,
        rank: usize,
        world_size: usize,
    ) -> Result<Self, ZeroError> {
        let be = &engine.be;
        let lens: Vec<usize> = weights.0.iter().map(Vec::len).collect();
        let slices = |t: &Tensors| -> Result<Vec<B::Buf>, ZeroError> {
            t.0.iter()
                .map(|v| {
                    let mut s = v[shard_range(v.len(), rank, world_size)].to_vec();
                    s.resize(shard_len(v.len(), world_size), 0.0);
                    Ok(be.upload(&s)?)
                })
                .collect()
        };
        let bf16_model = engine.precision == Precision::Bf16;
        let master = slices(opt.master.as_ref().unwrap_or(weights))?;
        // The model's weights are the masters rounded (what the engine
        // holds): ZeRO-3 gathers them from here before the first step.
        let copies = if bf16_model {
            let c: Result<Vec<_>, _> = master.iter().map(|m| be.cast(m, DType::Bf16)).collect();
            Some(c?)
        } else {
            None
        };
        Ok(Self {
            cfg: opt.cfg,
            max_grad_norm: opt.max_grad_norm,
            step: opt.step,
            rank,
            world_size,
            bf16_model,
            master,
            exp_avg: slices(&opt.exp_avg)?,
            exp_avg_sq: slices(&opt.exp_avg_sq)?,
            lens,
            copies,
            zero3: false,
            resident: true,
            grad_acc: Vec::new(),
        })
    }

    /// ZeRO-3 with the weights released: the model gathers each unit.
    pub fn gathers_by_unit(&self) -> bool {
        self.zero3 && !self.resident
    }

    /// This rank's shards of the model's weights (bf16 copies, or the fp32
    /// masters), which the whole weights are gathered from.
    pub fn weight_shards(&self) -> &[B::Buf] {
        self.copies.as_deref().unwrap_or(&self.master)
    }

    /// ZeRO-3: gathers the whole weights into `engine` (every rank at the
    /// same point) unless it holds them already.
    pub fn materialize(
        &mut self,
        engine: &mut Engine<B>,
        group: &mut dyn Collective,
    ) -> Result<(), ZeroError> {
        if self.resident {
            return Ok(());
        }
        let be = &engine.be;
        let shards = self.copies.as_ref().unwrap_or(&self.master);
        for ((shard, full), &l) in shards.iter().zip(engine.weights.iter_mut()).zip(&self.lens) {
            *full = be.cast(&be.zeros(l)?, shard.dtype())?;
            all_gather(group, be, shard, full)?;
        }
        if let Some(device) = group.device() {
            device.wait("weight all-gather")?;
        }
        self.resident = true;
        Ok(())
    }

    /// ZeRO-3: frees the engine's whole weights (each rank keeps its
    /// shards); a no-op under ZeRO-2.
    pub fn release(&mut self, engine: &mut Engine<B>) -> Result<(), ZeroError> {
        if !self.zero3 || !self.resident {
            return Ok(());
        }
        let be = &engine.be;
        for w in engine.weights.iter_mut() {
            *w = be.cast(&be.zeros(0)?, w.dtype())?;
        }
        self.resident = false;
        Ok(())
    }

    /// The source the update's forward and backward gather each unit's
    /// weights from (ZeRO-3 with the weights released), else none.
    pub fn unit_source<'a>(
        &'a mut self,
        be: &B,
        layout: &ParamLayout,
        group: &'a mut dyn Collective,
    ) -> Result<Option<UnitGather<'a, B>>, ZeroError> {
        if !self.gathers_by_unit() {
            return Ok(None);
        }
        if self.grad_acc.is_empty() {
            for &l in &self.lens {
                self.grad_acc.push(be.zeros(shard_len(l, self.world_size))?);
            }
        }
        Ok(Some(UnitGather {
            group: std::cell::RefCell::new(group),
            shards: self.copies.as_deref().unwrap_or(&self.master),
            lens: &self.lens,
            acc: std::cell::RefCell::new(&mut self.grad_acc),
            schedule: unit_schedule(layout),
            cursor: std::cell::Cell::new(None),
            ahead: std::cell::RefCell::new(None),
            hits: std::cell::Cell::new(0),
        }))
    }

    /// One AdamW step from the engine's accumulated gradients (this rank's
    /// micro-batches), then zeroed: reduce-scatter of every tensor's
    /// gradients, the global norm over the ranks' shards, clipping, the
    /// step on the shards, and the updated weights all-gathered into the
    /// engine. A non-finite norm skips the step on every rank alike.
    pub fn step(
        &mut self,
        engine: &mut Engine<B>,
        group: &mut dyn Collective,
    ) -> Result<StepReport, ZeroError> {
        let (be, weights, grads) = (&engine.be, &mut engine.weights, &mut engine.grads);
        let world = self.world_size;
        // ZeRO-3's backward handed every unit's gradients over as it went.
        let by_unit = self.gathers_by_unit();
        let mut shards = Vec::with_capacity(self.lens.len());
        if by_unit {
            shards = std::mem::take(&mut self.grad_acc);
        } else {
            for (i, &l) in self.lens.iter().enumerate() {
                let mut shard = be.zeros(shard_len(l, world))?;
                match grads.as_ref() {
                    Some(grads) => reduce_scatter(group, be, &grads[i], &mut shard)?,
                    // This rank had no micro-batch in this step.
                    None => reduce_scatter(group, be, &be.zeros(l)?, &mut shard)?,
                }
                shards.push(shard);
            }
        }
        // Before anything waits on them: a dead peer stops this rank with
        // an error instead of a hang.
        if let Some(device) = group.device() {
            device.wait("gradient reduce-scatter")?;
        }
        let local = be.grad_norm(&shards)?;
        let mut sq = [local * local];
        group.all_reduce_sum_f64(&mut sq)?;
        let grad_norm = sq[0].sqrt();
        for g in grads.iter_mut().flatten() {
            be.fill_zero(g)?;
        }
        if !grad_norm.is_finite() {
            if by_unit {
                self.keep_accumulators(be, shards)?;
            }
            return Ok(StepReport {
                grad_norm,
                skipped: true,
            });
        }
        self.step += 1;
        let scale = clip_coefficient(grad_norm, self.max_grad_norm.unwrap_or(f64::INFINITY));
        be.adamw_step(
            &self.cfg,
            self.step,
            scale,
            &mut self.master,
            &shards,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            self.copies.as_deref_mut(),
        )?;
        if by_unit {
            self.keep_accumulators(be, shards)?;
        }
        if self.resident {
            let updated = self.copies.as_ref().unwrap_or(&self.master);
            for (shard, full) in updated.iter().zip(weights.iter_mut()) {
                all_gather(group, be, shard, full)?;
            }
            if let Some(device) = group.device() {
                device.wait("weight all-gather")?;
            }
        }
        Ok(StepReport {
            grad_norm,
            skipped: false,
        })
    }

    /// The used gradient shards, zeroed, as the next step's accumulators.
    fn keep_accumulators(&mut self, be: &B, mut shards: Vec<B::Buf>) -> Result<(), ZeroError> {
        for s in shards.iter_mut() {
            be.fill_zero(s)?;
        }
        self.grad_acc = shards;
        Ok(())
    }

    /// This rank's shards on the host, the padding cut: (master, exp_avg,
    /// exp_avg_sq), one vector per tensor.
    pub fn download(&self, be: &B) -> Result<[Vec<Vec<f32>>; 3], ZeroError> {
        let get = |bufs: &[B::Buf]| -> Result<Vec<Vec<f32>>, ZeroError> {
            bufs.iter()
                .zip(&self.lens)
                .map(|(b, &l)| {
                    let mut v = be.download(b)?;
                    v.truncate(shard_range(l, self.rank, self.world_size).len());
                    Ok(v)
                })
                .collect()
        };
        Ok([
            get(&self.master)?,
            get(&self.exp_avg)?,
            get(&self.exp_avg_sq)?,
        ])
    }
}

/// Each unit's whole weights gathered from every rank's shards, as the
/// model asks for them (ZeRO-3's forward and backward).
pub struct UnitGather<'a, B: Backend> {
    group: std::cell::RefCell<&'a mut dyn Collective>,
    shards: &'a [B::Buf],
    lens: &'a [usize],
    /// This rank's shards of the gradients summed over ranks.
    acc: std::cell::RefCell<&'a mut Vec<B::Buf>>,
    /// The order a pass asks for the units in: its forward (vision blocks,
    /// then decoder layers) and its backward (the reverse). Every pass
    /// follows it (the ranks' gathers must match), so the unit after the
    /// current one is gathered while the current one runs.
    schedule: [Vec<Vec<ParamId>>; 2],
    /// (segment, position) of the last unit handed out.
    cursor: std::cell::Cell<Option<(usize, usize)>>,
    /// The next unit, gathered ahead.
    ahead: std::cell::RefCell<Option<Gathered<B>>>,
    /// Units handed out from the gathered-ahead one.
    hits: std::cell::Cell<usize>,
}

/// A unit's ids and whole weights.
type Gathered<B> = (Vec<ParamId>, Vec<<B as Backend>::Buf>);

/// The forward and backward order of the units (the root aside).
fn unit_schedule(layout: &ParamLayout) -> [Vec<Vec<ParamId>>; 2] {
    let forward: Vec<Vec<ParamId>> = (0..layout.vision.blocks.len())
        .map(|i| layout.vision_block_ids(i).to_vec())
        .chain((0..layout.text.layers.len()).map(|l| layout.text_layer_ids(l).to_vec()))
        .collect();
    let backward = forward.iter().rev().cloned().collect();
    [forward, backward]
}

impl<B: Backend> UnitGather<'_, B> {
    /// How many units came from the one gathered ahead (all but the first
    /// of each forward and backward, when the passes keep the schedule).
    pub fn gathered_ahead(&self) -> usize {
        self.hits.get()
    }

    /// Issues the all-gathers of `ids` (on GPUs they run on NCCL's stream
    /// while the caller goes on).
    fn start(&self, be: &B, ids: &[ParamId]) -> crate::ops::Result<Vec<B::Buf>> {
        let mut group = self.group.borrow_mut();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let shard = &self.shards[id.0];
            let mut full = be.cast(&be.zeros(self.lens[id.0])?, shard.dtype())?;
            all_gather(&mut **group, be, shard, &mut full)
                .map_err(|e| crate::ops::Error::Gather(e.to_string()))?;
            out.push(full);
        }
        Ok(out)
    }

    /// Where `ids` stands in the schedule: right after the cursor, else
    /// the start of a segment.
    fn place(&self, ids: &[ParamId]) -> Option<(usize, usize)> {
        if let Some((s, p)) = self.cursor.get() {
            if self.schedule[s].get(p + 1).is_some_and(|u| u == ids) {
                return Some((s, p + 1));
            }
        }
        (0..2).find_map(|s| (self.schedule[s].first()? == ids).then_some((s, 0)))
    }
}

impl<B: Backend> GatherWeights<B> for UnitGather<'_, B> {
    fn gather(&self, be: &B, ids: &[ParamId]) -> crate::ops::Result<Vec<B::Buf>> {
        let ahead = self.ahead.borrow_mut().take();
        let out = match ahead {
            Some((next, bufs)) if next == ids => {
                self.hits.set(self.hits.get() + 1);
                bufs
            }
            // Not the unit gathered ahead (dropped; every rank drops it
            // alike): gather this one now.
            _ => self.start(be, ids)?,
        };
        if let Some(device) = self.group.borrow_mut().device() {
            device
                .wait("unit all-gather")
                .map_err(|e| crate::ops::Error::Gather(e.to_string()))?;
        }
        let at = self.place(ids);
        self.cursor.set(at);
        if let Some((s, p)) = at {
            if let Some(next) = self.schedule[s].get(p + 1) {
                let bufs = self.start(be, next)?;
                *self.ahead.borrow_mut() = Some((next.clone(), bufs));
            }
        }
        Ok(out)
    }

    fn scatter_grads(
        &self,
        be: &B,
        ids: &[ParamId],
        grads: &mut [B::Buf],
    ) -> crate::ops::Result<()> {
        let mut group = self.group.borrow_mut();
        let mut acc = self.acc.borrow_mut();
        for id in ids {
            let mut shard = be.zeros(acc[id.0].len())?;
            reduce_scatter(&mut **group, be, &grads[id.0], &mut shard)
                .map_err(|e| crate::ops::Error::Gather(e.to_string()))?;
            be.add_into(&mut acc[id.0], &shard)?;
            grads[id.0] = be.zeros(0)?;
        }
        if let Some(device) = group.device() {
            device
                .wait("gradient reduce-scatter")
                .map_err(|e| crate::ops::Error::Gather(e.to_string()))?;
        }
        Ok(())
    }
}

/// The sum over ranks of `full` (fp32), this rank's shard of it into
/// `shard`: through NCCL for device buffers, else the host collective.
fn reduce_scatter<B: Backend>(
    group: &mut dyn Collective,
    be: &B,
    full: &B::Buf,
    shard: &mut B::Buf,
) -> Result<(), ZeroError> {
    if let Some(device) = group.device() {
        let full = (full as &dyn Any).downcast_ref::<DeviceBuf>();
        let shard = (shard as &mut dyn Any).downcast_mut::<DeviceBuf>();
        if let (Some(full), Some(shard)) = (full, shard) {
            return Ok(device.reduce_scatter_padded(full, shard)?);
        }
    }
    let world = group.world_size();
    let n = shard.len();
    let mut host = be.download(full)?;
    host.resize(n * world, 0.0);
    let mut mine = vec![0.0f32; n];
    group.reduce_scatter_sum(&host, &mut mine)?;
    be.write(shard, &mine)?;
    Ok(())
}

/// Every rank's `shard` into `full` (its first `full.len()` elements), in
/// the buffers' dtype: through NCCL for device buffers, else the host.
fn all_gather<B: Backend>(
    group: &mut dyn Collective,
    be: &B,
    shard: &B::Buf,
    full: &mut B::Buf,
) -> Result<(), ZeroError> {
    if let Some(device) = group.device() {
        let shard = (shard as &dyn Any).downcast_ref::<DeviceBuf>();
        let full = (full as &mut dyn Any).downcast_mut::<DeviceBuf>();
        if let (Some(shard), Some(full)) = (shard, full) {
            return Ok(device.all_gather_padded(shard, full)?);
        }
    }
    let world = group.world_size();
    let mine = be.download(shard)?;
    let mut all = vec![0.0f32; mine.len() * world];
    group.all_gather(&mine, &mut all)?;
    be.write(full, &all[..full.len()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let shards: Vec<Range<usize>> =
                (0..world).map(|r| shard_range(len, r, world)).collect();
            assert_eq!(shards.iter().map(Range::len).sum::<usize>(), len);
            assert!(shards.iter().all(|r| r.len() <= shard_len(len, world)));
        }
    }
}
