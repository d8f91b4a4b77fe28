//! Why a training run stops: every error `train` reports, each naming the
//! file or setting at fault.

use super::checkpoint::CheckpointError;
use super::config::ConfigError;
use super::metrics::MetricsError;
use super::retention::RetentionError;
use super::source::SourceError;
use super::step::StepError;
use super::tensorboard::TensorBoardError;
use super::validation::ValError;
use crate::builtin::BuiltinError;
use crate::pipeline::PipelineError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Builtin(#[from] BuiltinError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("device=cuda: {0}")]
    Device(String),
    #[error(transparent)]
    RunDir(#[from] super::run_dir::RunDirError),
    #[error(transparent)]
    Output(#[from] crate::outputs::OutputError),
    #[error("{0}")]
    Diverged(String),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Validation(#[from] ValError),
    #[error(transparent)]
    Retention(#[from] RetentionError),
    #[error(transparent)]
    TensorBoard(#[from] TensorBoardError),
    #[error(transparent)]
    GpuPlan(#[from] super::memory_plan::GpuPlanError),
}

/// An i/o error as a [`RunError`] naming `path`.
pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> RunError + '_ {
    move |e| RunError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
