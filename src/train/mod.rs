//! Training machinery: the optimizer over the parameter table and
//! checkpoints (Hub-layout weights + resumable training state).

pub mod checkpoint;
pub mod config;
pub mod optimizer;
pub mod step;
pub mod source;
pub mod warmup;
pub mod metrics;
pub mod plot;
pub mod run;
