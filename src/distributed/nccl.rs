//! GPU ranks through NCCL: gradients, weight shards and broadcasts move
//! between devices only through these calls. Rank 0 creates the NCCL unique
//! id and hands it to the others over the TCP rendezvous at
//! MASTER_ADDR:MASTER_PORT; the same group then carries host-side metrics.

use super::collective::{check_sharded, DeviceCollective};
use super::tcp::TcpGroup;
use super::{Collective, DistError, World};
use crate::backend::cuda::CudaBackend;
use crate::ops::cuda::DeviceBuf;
use crate::ops::device_buf::Storage;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::time::{Duration, Instant};

pub struct NcclGroup {
    comm: Comm,
    /// The rendezvous group, kept for host-side values (metrics, counts).
    host: TcpGroup,
    /// How long [`NcclGroup::wait`] lets queued collectives run.
    timeout: Duration,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Setup(format!("NCCL {what}: {e:?}"))
}

/// The first `len` f32 elements of `buf` (NCCL moves f32 buffers for now).
fn view(buf: &DeviceBuf) -> Result<cudarc::driver::CudaView<'_, f32>, DistError> {
    let len = crate::ops::Buffer::len(buf);
    let s = buf.f32().map_err(|e| DistError::Setup(e.to_string()))?;
    Ok(s.slice(0..len))
}

fn view_mut(buf: &mut DeviceBuf) -> Result<cudarc::driver::CudaViewMut<'_, f32>, DistError> {
    let len = crate::ops::Buffer::len(buf);
    let s = buf.f32_mut().map_err(|e| DistError::Setup(e.to_string()))?;
    Ok(s.slice_mut(0..len))
}

impl NcclGroup {
    /// Joins the group of `world` on `gpu`'s stream.
    pub fn join(
        gpu: &CudaBackend,
        world: &World,
        timeout: Duration,
    ) -> Result<NcclGroup, DistError> {
        let mut host = TcpGroup::join(&world.master, world.rank, world.world_size, timeout)?;
        let mine: Vec<u8> = if world.rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let all = host.exchange(&mine)?;
        let bytes = &all[0];
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(DistError::SizeMismatch {
                rank: 0,
                got: bytes.len(),
                want: internal.len(),
            });
        }
        for (d, &b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            gpu.stream().clone(),
            world.rank,
            world.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error("communicator init", e))?;
        Ok(NcclGroup {
            comm,
            host,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Element-wise sum over ranks, in place, on the device.
    pub fn all_reduce_sum(&self, buf: &mut DeviceBuf) -> Result<(), DistError> {
        self.comm
            .all_reduce_in_place(&mut view_mut(buf)?, &ReduceOp::Sum)
            .map_err(|e| nccl_error("all-reduce", e))?;
        Ok(())
    }

    /// The sum over ranks of `input` (`world_size` shards), shard `rank()`
    /// of it into `shard`.
    pub fn reduce_scatter_sum(
        &self,
        input: &DeviceBuf,
        shard: &mut DeviceBuf,
    ) -> Result<(), DistError> {
        let (n, total) = (
            crate::ops::Buffer::len(shard),
            crate::ops::Buffer::len(input),
        );
        check_sharded("reduce-scatter", total, n, self.world_size())?;
        self.comm
            .reduce_scatter(&view(input)?, &mut view_mut(shard)?, &ReduceOp::Sum)
            .map_err(|e| nccl_error("reduce-scatter", e))?;
        Ok(())
    }

    /// Every rank's `shard`, in rank order, into `out`.
    pub fn all_gather(&self, shard: &DeviceBuf, out: &mut DeviceBuf) -> Result<(), DistError> {
        let (n, total) = (crate::ops::Buffer::len(shard), crate::ops::Buffer::len(out));
        check_sharded("all-gather", total, n, self.world_size())?;
        self.comm
            .all_gather(&view(shard)?, &mut view_mut(out)?)
            .map_err(|e| nccl_error("all-gather", e))?;
        Ok(())
    }

    /// The host group (rendezvous) for host-side values.
    pub fn host(&mut self) -> &mut TcpGroup {
        &mut self.host
    }

    /// Waits until the collectives queued so far have completed, for at
    /// most the collective timeout. A collective whose peer died or hangs
    /// never completes; past the timeout this returns the error naming the
    /// ranks the rendezvous group cannot reach (a dead process's connection
    /// is closed), and dropping the group then aborts the communicator
    /// (`ncclCommAbort`), which frees this GPU. Without this a rank would
    /// block forever in the next synchronisation.
    pub fn wait(&mut self, what: &str) -> Result<(), DistError> {
        let stream = self.comm.stream();
        let done = stream
            .record_event(None)
            .map_err(|e| nccl_error("event", e))?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        while !done.is_complete() {
            if started.elapsed() >= self.timeout {
                return Err(self.blame(what));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Why a collective did not complete: the ranks that do not answer on
    /// the rendezvous group (its barrier, given a short while), else a
    /// stall every rank is alive for.
    fn blame(&mut self, what: &str) -> DistError {
        let short = Duration::from_secs(10).min(self.timeout);
        let answered = self
            .host
            .set_timeout(short)
            .and_then(|_| self.host.barrier());
        match answered {
            Err(e) => e,
            Ok(()) => DistError::Stalled {
                what: format!("NCCL {what}"),
                timeout: self.timeout,
            },
        }
    }

    /// The sum over ranks of `full` (an f32 tensor of any length L), of
    /// which this rank keeps elements `[r*s, (r+1)*s)` in `shard` (f32, `s
    /// = ceil(L / world_size)`; zeros past L), all on the device.
    pub fn reduce_scatter_padded(
        &self,
        full: &DeviceBuf,
        shard: &mut DeviceBuf,
    ) -> Result<(), DistError> {
        let (l, s, w) = (
            crate::ops::Buffer::len(full),
            crate::ops::Buffer::len(shard),
            self.world_size(),
        );
        check_shard(l, s, w)?;
        let stream = self.comm.stream();
        let mut padded = stream
            .alloc_zeros::<f32>(s * w)
            .map_err(|e| nccl_error("alloc", e))?;
        if l > 0 {
            stream
                .memcpy_dtod(&view(full)?, &mut padded.slice_mut(0..l))
                .map_err(|e| nccl_error("copy", e))?;
        }
        self.comm
            .reduce_scatter(&padded, &mut view_mut(shard)?, &ReduceOp::Sum)
            .map_err(|e| nccl_error("reduce-scatter", e))?;
        Ok(())
    }

    /// Every rank's `shard` (f32 or bf16, `s = ceil(L / world_size)`
    /// elements) into `full` (the same dtype, L elements), in rank order,
    /// on the device.
    pub fn all_gather_padded(
        &self,
        shard: &DeviceBuf,
        full: &mut DeviceBuf,
    ) -> Result<(), DistError> {
        let (l, s, w) = (
            crate::ops::Buffer::len(full),
            crate::ops::Buffer::len(shard),
            self.world_size(),
        );
        check_shard(l, s, w)?;
        let mismatch = |e: crate::ops::Error| DistError::Setup(e.to_string());
        match shard.storage() {
            Storage::F32(src) => {
                let dst = full.f32_mut().map_err(mismatch)?;
                gather_padded(
                    &self.comm,
                    &src.slice(0..s),
                    &mut dst.slice_mut(0..l),
                    s * w,
                )
            }
            Storage::Bf16(src) => {
                let dst = full.bf16_mut().map_err(mismatch)?;
                gather_padded(
                    &self.comm,
                    &src.slice(0..s),
                    &mut dst.slice_mut(0..l),
                    s * w,
                )
            }
        }
    }
}

fn check_shard(l: usize, s: usize, w: usize) -> Result<(), DistError> {
    if s == l.div_ceil(w.max(1)) {
        Ok(())
    } else {
        Err(DistError::Setup(format!(
            "a tensor of {l} elements over {w} ranks has shards of {}, not {s}",
            l.div_ceil(w.max(1))
        )))
    }
}

/// All-gathers `src` (one rank's shard) into a padded buffer of `padded`
/// elements, then copies its first `dst.len()` into `dst`.
fn gather_padded<T>(
    comm: &Comm,
    src: &CudaView<'_, T>,
    dst: &mut CudaViewMut<'_, T>,
    padded: usize,
) -> Result<(), DistError>
where
    T: cudarc::nccl::safe::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    let stream = comm.stream();
    let mut all = stream
        .alloc_zeros::<T>(padded)
        .map_err(|e| nccl_error("alloc", e))?;
    comm.all_gather(src, &mut all)
        .map_err(|e| nccl_error("all-gather", e))?;
    let n = dst.len();
    if n > 0 {
        stream
            .memcpy_dtod(&all.slice(0..n), dst)
            .map_err(|e| nccl_error("copy", e))?;
    }
    Ok(())
}

/// The host-side interface the trainer speaks: float collectives go
/// through NCCL (host values staged through this GPU, so the bytes travel
/// between devices only over NCCL), messages (rollouts, statuses) over the
/// rendezvous group.
impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        self.host.exchange(mine)
    }

    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        if buf.is_empty() {
            return self.barrier();
        }
        let sum = self.staged(buf, buf.len(), "all-reduce", |comm, src, dst| {
            comm.all_reduce(src, dst, &ReduceOp::Sum)
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], shard: &mut [f32]) -> Result<(), DistError> {
        let world = Collective::world_size(self);
        check_sharded("reduce-scatter", input.len(), shard.len(), world)?;
        if shard.is_empty() {
            return self.barrier();
        }
        let mine = self.staged(input, shard.len(), "reduce-scatter", |comm, src, dst| {
            comm.reduce_scatter(src, dst, &ReduceOp::Sum)
        })?;
        shard.copy_from_slice(&mine);
        Ok(())
    }

    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let world = Collective::world_size(self);
        check_sharded("all-gather", out.len(), shard.len(), world)?;
        if shard.is_empty() {
            return self.barrier();
        }
        let all = self.staged(shard, out.len(), "all-gather", |comm, src, dst| {
            comm.all_gather(src, dst)
        })?;
        out.copy_from_slice(&all);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        if buf.is_empty() {
            return self.barrier();
        }
        let theirs = self.staged(buf, buf.len(), "broadcast", |comm, src, dst| {
            comm.broadcast(Some(src), dst, root as i32)
        })?;
        buf.copy_from_slice(&theirs);
        Ok(())
    }
}

impl NcclGroup {
    /// `input` staged on this GPU, `op` run by NCCL from it into a buffer
    /// of `out_len`, and that buffer brought back: host values between
    /// GPUs through NCCL only.
    fn staged(
        &mut self,
        input: &[f32],
        out_len: usize,
        what: &str,
        op: impl FnOnce(
            &Comm,
            &CudaSlice<f32>,
            &mut CudaSlice<f32>,
        )
            -> Result<cudarc::nccl::result::NcclStatus, cudarc::nccl::result::NcclError>,
    ) -> Result<Vec<f32>, DistError> {
        let stream = self.comm.stream();
        let src = stream
            .clone_htod(input)
            .map_err(|e| nccl_error("upload", e))?;
        let mut dst = stream
            .alloc_zeros::<f32>(out_len)
            .map_err(|e| nccl_error("alloc", e))?;
        op(&self.comm, &src, &mut dst).map_err(|e| nccl_error(what, e))?;
        self.wait(what)?;
        stream
            .clone_dtoh(&dst)
            .map_err(|e| nccl_error("download", e))
    }
}

impl DeviceCollective for NcclGroup {
    fn reduce_scatter_padded(
        &mut self,
        full: &DeviceBuf,
        shard: &mut DeviceBuf,
    ) -> Result<(), DistError> {
        NcclGroup::reduce_scatter_padded(self, full, shard)
    }

    fn all_gather_padded(
        &mut self,
        shard: &DeviceBuf,
        full: &mut DeviceBuf,
    ) -> Result<(), DistError> {
        NcclGroup::all_gather_padded(self, shard, full)
    }

    fn wait(&mut self, what: &str) -> Result<(), DistError> {
        NcclGroup::wait(self, what)
    }
}
