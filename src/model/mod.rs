//! Qwen2.5-VL: configuration, parameter table, checkpoint loading and the
//! graph (vision tower, merger, decoder, loss head, decode step), written
//! once over the op layer's `Backend`.

pub mod acts;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod forward;
pub mod graph;
pub mod input;
pub mod kv_cache;
pub mod params;
pub mod plan;
pub mod positions;
pub mod qwen;
pub mod text;
pub mod vision;

pub use error::ModelError;
pub use input::{SequenceInput, TrainSequence};
pub use qwen::{ForwardOutput, Qwen25Vl, TrainForward};
