//! A run's ranks: how a process joins its data-parallel group, what each
//! rank holds (its ZeRO shards), the decisions only rank 0 takes, and the
//! checkpoint every rank writes a part of.

use super::checkpoint::{checkpoint_dirs, TrainingState};
use super::config::TrainConfig;
use super::optimizer::AdamW;
use super::retention;
use super::run_error::{io, RunError};
use super::step::StepError;
use super::zero::ShardedAdamW;
use crate::backend::{open_local_gpu, Device};
use crate::distributed::Collective;
use crate::model::engine::Engine;
use crate::model::Qwen25Vl;
use crate::ops::Backend;
use std::path::{Path, PathBuf};

/// How this process takes part in a run.
pub enum Membership {
    /// The whole run in this process.
    Single,
    /// A rank started by a launcher (torchrun, srun, `vppo-engine launch`):
    /// it joins its group at the rendezvous (NCCL on GPUs, TCP on the CPU).
    Launched(crate::distributed::World),
    /// A rank handed its group (in-process ranks: tests, CPU runs).
    Given(Box<dyn Collective>),
}

/// A data-parallel save: rank 0 makes the temporary folder, every rank
/// writes its optimizer shard into it, rank 0 adds the weights and the
/// state with the shard manifest and renames it into place. Each stage
/// waits for every rank's outcome, so a rank that fails or dies leaves
/// only a temporary folder (removed on resume) and the last checkpoint.
#[allow(clippy::too_many_arguments)]
pub(super) fn save_sharded<B: Backend>(
    ranks: &mut Ranks<'_, B>,
    be: &B,
    out: &Path,
    model: &mut Qwen25Vl,
    optimizer: &AdamW,
    state: &TrainingState,
    keep: usize,
    mark_best: bool,
) -> Result<Option<PathBuf>, RunError> {
    let rank = ranks.group.rank();
    let tmp = super::checkpoint::sharded_tmp_dir(out, state.step);
    let made = if rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io(&tmp))
    } else {
        Ok(())
    };
    all_ok(&mut *ranks.group, made)?;
    let written = ranks
        .zero
        .download(be)
        .map_err(|e| RunError::Device(format!("copying the optimizer shard back: {e}")))
        .and_then(|[master, exp_avg, exp_avg_sq]| {
            let shard = super::checkpoint::OptimizerShard {
                rank,
                world_size: ranks.zero.world_size,
                master: ranks.zero.bf16_model.then_some(master.as_slice()),
                exp_avg: &exp_avg,
                exp_avg_sq: &exp_avg_sq,
            };
            super::checkpoint::write_optimizer_shard(&tmp, &model.layout, &shard)
                .map_err(RunError::from)
        });
    all_ok(&mut *ranks.group, written)?;
    let finished = if rank == 0 {
        super::checkpoint::finish_sharded_checkpoint(
            out,
            &tmp,
            model,
            optimizer,
            ranks.zero.world_size,
            ranks.zero.bf16_model,
            state,
        )
        .map_err(RunError::from)
        .and_then(|dir| {
            if mark_best {
                retention::set_best(out, &dir)?;
            }
            retention::prune(out, &checkpoint_dirs(out)?, keep, &dir)?;
            Ok(Some(dir))
        })
    } else {
        Ok(None)
    };
    if finished.is_err() && rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let dir = all_ok(&mut *ranks.group, finished)?;
    if let Some(dir) = &dir {
        model.dir = dir.clone();
    }
    Ok(dir)
}

/// Every rank's outcome of a stage: this rank's value if all succeeded,
/// else an error naming the first rank that failed and why.
fn all_ok<T>(group: &mut dyn Collective, mine: Result<T, RunError>) -> Result<T, RunError> {
    let message = match &mine {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let all = group
        .exchange(message.as_bytes())
        .map_err(StepError::from)?;
    let failed = all.iter().enumerate().find(|(_, m)| !m.is_empty());
    match (mine, failed) {
        (Ok(_), Some((rank, why))) => Err(RunError::Usage(format!(
            "rank {rank} failed: {}",
            String::from_utf8_lossy(why)
        ))),
        (mine, _) => mine,
    }
}

/// Rank 0's `value` on every rank (a decision only rank 0 can take, such
/// as a new best validation).
pub(super) fn agree<B: Backend>(
    ranks: Option<&mut Ranks<'_, B>>,
    value: bool,
) -> Result<bool, RunError> {
    let Some(ranks) = ranks else {
        return Ok(value);
    };
    let mut v = [f32::from(u8::from(value))];
    ranks.group.broadcast(&mut v, 0).map_err(StepError::from)?;
    Ok(v[0] != 0.0)
}

pub(super) fn zero_error(e: super::zero::ZeroError) -> RunError {
    match e {
        super::zero::ZeroError::Dist(e) => StepError::Dist(e).into(),
        super::zero::ZeroError::Model(e) => StepError::Model(e).into(),
    }
}

/// A data-parallel rank's group and its shard of the optimizer state.
pub(super) struct Ranks<'g, B: Backend> {
    pub(super) group: &'g mut dyn Collective,
    pub(super) zero: ShardedAdamW<B>,
}

impl<'g, B: Backend> Ranks<'g, B> {
    /// This rank's shard of `optimizer` (whose whole state is then
    /// dropped: each rank keeps only its shard) on `engine`'s backend.
    pub(super) fn new(
        group: &'g mut dyn Collective,
        optimizer: &mut AdamW,
        weights: &crate::model::params::Tensors,
        engine: &Engine<B>,
        zero_stage: usize,
    ) -> Result<Self, RunError> {
        let mut zero =
            ShardedAdamW::from_full(optimizer, weights, engine, group.rank(), group.world_size())
                .map_err(|e| RunError::Device(format!("sharding the optimizer state: {e}")))?;
        zero.zero3 = zero_stage == 3;
        let empty = crate::model::params::Tensors(Vec::new());
        optimizer.exp_avg = empty.clone();
        optimizer.exp_avg_sq = empty;
        optimizer.master = None;
        Ok(Self { group, zero })
    }
}

/// Joins the run's group: none for a single process; NCCL (with its TCP
/// rendezvous) for launched GPU ranks, TCP for launched CPU ranks.
pub(super) fn join_group(
    membership: Membership,
    cfg: &TrainConfig,
) -> Result<Option<Box<dyn Collective>>, RunError> {
    let timeout = std::time::Duration::from_secs_f64(cfg.collective_timeout_s);
    match membership {
        Membership::Single => Ok(None),
        Membership::Given(group) if group.world_size() == 1 => Ok(None),
        Membership::Given(group) => Ok(Some(group)),
        Membership::Launched(world) => {
            if cfg.device.resolve(false) == Device::Cuda {
                let gpu = open_local_gpu().map_err(RunError::Device)?;
                let group = crate::distributed::nccl::NcclGroup::join(&gpu, &world, timeout)
                    .map_err(StepError::from)?;
                return Ok(Some(Box::new(group)));
            }
            let group = crate::distributed::tcp::TcpGroup::join(
                &world.master,
                world.rank,
                world.world_size,
                timeout,
            )
            .map_err(StepError::from)?;
            Ok(Some(Box::new(group)))
        }
    }
}
