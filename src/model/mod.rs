//! Qwen2.5-VL: configuration, parameter table, checkpoint loading and the
//! graph (vision tower, merger, decoder) built from the CPU op library.

pub mod checkpoint;
pub mod config;
pub mod params;
