//! Qwen2.5-VL: configuration, parameter table, checkpoint loading and the
//! graph (vision tower, merger, decoder) built from the CPU op library.

pub mod acts;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod device_train;
pub mod params;
pub mod positions;
pub mod qwen;
pub mod text;
pub mod vision;

pub use qwen::{
    ForwardOutput, ModelError, PackedForward, Qwen25Vl, SequenceInput, TrainForward, TrainSequence,
};
pub mod grad_util;
