//! The built-in default of `vppo-engine train`: a tiny Qwen2.5-VL model
//! written as a real checkpoint directory, a procedurally generated visual
//! task whose answers depend on the image, and the supervised warm-up that
//! gives RL a non-zero reward to start from.

pub mod model_dir;
pub mod task;

pub use model_dir::{write_model_dir, BuiltinError, TinySizes};
pub use task::{CountingTask, TaskItem};
