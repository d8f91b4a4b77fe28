//! The operations ranks agree through, built on one primitive: every rank
//! contributes a message and receives every rank's message in rank order.
//! Reductions then add in rank order on every rank, so a result does not
//! depend on which rank finished first and all ranks hold the same bits.

use crate::ops::cuda::DeviceBuf;
use std::time::Duration;

/// Why a collective did not complete. Each names the rank(s) at fault, so a
/// hung or dead rank can be told from a bug.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DistError {
    #[error("rank(s) {ranks:?} did not arrive within {timeout:?} (collective_timeout_s); they hang or are too slow")]
    Timeout {
        ranks: Vec<usize>,
        timeout: Duration,
    },
    #[error("rank {rank} left the group (its process exited or dropped the connection)")]
    PeerLost { rank: usize },
    #[error(
        "rank {rank} sent {got} bytes where {want} were expected (ranks disagree on a buffer size)"
    )]
    SizeMismatch {
        rank: usize,
        got: usize,
        want: usize,
    },
    /// Every rank answers, but a device collective did not complete.
    #[error("{what} did not complete within {timeout:?} (collective_timeout_s), though every rank answers on the rendezvous: a GPU or the network between them hangs")]
    Stalled { what: String, timeout: Duration },
    #[error("collective setup: {0}")]
    Setup(String),
    #[error("collective i/o with rank {rank}: {message}")]
    Io { rank: usize, message: String },
}

/// A group of `world_size` ranks; this handle is rank `rank()`.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Every rank's `mine`, in rank order, on every rank.
    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;

    /// Element-wise sum over ranks, added in rank order, on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        let all = self.exchange(bytemuck::cast_slice(buf))?;
        sum_in_rank_order(&all, buf, 0)
    }

    /// [`Collective::all_reduce_sum`] for f64 (metrics and counts).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError> {
        let all = self.exchange(bytemuck::cast_slice(buf))?;
        sum_in_rank_order(&all, buf, 0)
    }

    /// Element-wise maximum over ranks, on every rank (a minimum is the
    /// maximum of the negated values).
    fn all_reduce_max_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError> {
        let all = self.exchange(bytemuck::cast_slice(buf))?;
        let want = buf.len() * 8;
        buf.iter_mut().for_each(|v| *v = f64::NEG_INFINITY);
        for (rank, bytes) in all.iter().enumerate() {
            check_len(rank, bytes.len(), want)?;
            let theirs: Vec<f64> = bytemuck::pod_collect_to_vec(bytes);
            buf.iter_mut().zip(theirs).for_each(|(a, b)| *a = a.max(b));
        }
        Ok(())
    }

    /// The sum over ranks of `input` (`world_size` equal shards), of which
    /// this rank keeps shard `rank()` in `shard`.
    fn reduce_scatter_sum(&mut self, input: &[f32], shard: &mut [f32]) -> Result<(), DistError> {
        let n = shard.len();
        check_sharded("reduce-scatter", input.len(), n, self.world_size())?;
        let all = self.exchange(bytemuck::cast_slice(input))?;
        sum_in_rank_order(&all, shard, self.rank() * n)
    }

    /// Every rank's `shard`, in rank order, in `out` on every rank.
    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let n = shard.len();
        check_sharded("all-gather", out.len(), n, self.world_size())?;
        let all = self.exchange(bytemuck::cast_slice(shard))?;
        for (rank, bytes) in all.iter().enumerate() {
            check_len(rank, bytes.len(), n * 4)?;
            let theirs: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
            out[rank * n..(rank + 1) * n].copy_from_slice(&theirs);
        }
        Ok(())
    }

    /// `root`'s `buf` on every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        let mine: &[u8] = if self.rank() == root {
            bytemuck::cast_slice(buf)
        } else {
            &[]
        };
        let all = self.exchange(mine)?;
        let theirs = all.get(root).ok_or_else(|| {
            DistError::Setup(format!("broadcast from rank {root} of {}", all.len()))
        })?;
        check_len(root, theirs.len(), buf.len() * 4)?;
        buf.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(theirs));
        Ok(())
    }

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), DistError> {
        self.exchange(&[]).map(|_| ())
    }

    /// The device collectives, when the ranks are GPUs: device buffers
    /// move between them there (NCCL), never through the host.
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }
}

/// Collectives on device buffers of any length, for ZeRO's per-tensor
/// shards: the tensor of L elements is `world_size` shards of
/// `ceil(L / world_size)`, the last padded with zeros.
pub trait DeviceCollective {
    /// The sum over ranks of `full` (f32), this rank's shard into `shard`.
    fn reduce_scatter_padded(
        &mut self,
        full: &DeviceBuf,
        shard: &mut DeviceBuf,
    ) -> Result<(), DistError>;

    /// Every rank's `shard` (f32 or bf16) into `full`, in rank order.
    fn all_gather_padded(
        &mut self,
        shard: &DeviceBuf,
        full: &mut DeviceBuf,
    ) -> Result<(), DistError>;

    /// Waits for the collectives queued so far, at most the collective
    /// timeout, naming the ranks that do not answer past it.
    fn wait(&mut self, what: &str) -> Result<(), DistError>;
}

/// A whole of `total` elements must be `world` shards of `shard`.
pub(crate) fn check_sharded(
    what: &str,
    total: usize,
    shard: usize,
    world: usize,
) -> Result<(), DistError> {
    if total == shard * world {
        Ok(())
    } else {
        Err(DistError::Setup(format!(
            "{what} of {total} elements in shards of {shard} over {world} ranks"
        )))
    }
}

fn check_len(rank: usize, got: usize, want: usize) -> Result<(), DistError> {
    if got == want {
        Ok(())
    } else {
        Err(DistError::SizeMismatch { rank, got, want })
    }
}

/// `out[i] = sum over ranks r (in order) of all[r][offset + i]`.
fn sum_in_rank_order<T>(all: &[Vec<u8>], out: &mut [T], offset: usize) -> Result<(), DistError>
where
    T: bytemuck::Pod + Default + std::ops::AddAssign,
{
    let want = all.first().map_or(0, Vec::len);
    let size = std::mem::size_of::<T>();
    out.iter_mut().for_each(|v| *v = T::default());
    for (rank, bytes) in all.iter().enumerate() {
        check_len(rank, bytes.len(), want)?;
        let theirs: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
        let part = theirs
            .get(offset..offset + out.len())
            .ok_or(DistError::SizeMismatch {
                rank,
                got: bytes.len(),
                want: (offset + out.len()) * size,
            })?;
        out.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
    }
    Ok(())
}

/// A group of one: every collective is the identity (a single-process run).
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![mine.to_vec()])
    }
}
