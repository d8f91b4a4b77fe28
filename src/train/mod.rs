//! Training machinery: the optimizer over the parameter table and
//! checkpoints (Hub-layout weights + resumable training state).

pub mod checkpoint;
pub mod config;
pub mod optimizer;
pub mod step;
