//! vppo-engine: VPPO reinforcement-learning fine-tuning of Qwen2.5-VL.
//!
//! Layers (arrows point down only): `cli` -> ... -> `backend`. The CPU backend
//! is the reference every CUDA kernel is tested against and the fallback when
//! no GPU is present.

pub mod alloc_stats;
pub mod backend;
pub mod bench_rollout;
pub mod builtin;
pub mod cli_values;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod info;
pub mod kernels;
pub mod model;
pub mod model_bench;
pub mod nvtx;
pub mod ops;
pub mod outputs;
pub mod pipeline;
pub mod processor;
pub mod reward;
pub mod rl;
pub mod rollout;
pub mod safetensors_io;
pub mod score;
pub mod train;
