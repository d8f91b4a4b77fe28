//! Training machinery: the optimizer over the parameter table and
//! checkpoints (Hub-layout weights + resumable training state).

pub mod checkpoint;
pub mod config;
pub mod data_parallel;
pub mod memory_plan;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod ranks;
pub mod refill;
pub mod retention;
pub mod reward_command;
pub mod run;
pub mod run_dir;
pub mod run_error;
pub mod source;
pub mod step;
pub mod tensorboard;
pub mod validation;
pub mod warmup;
pub mod zero;
