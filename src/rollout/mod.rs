//! Rollouts: prefill and decode with a paged KV cache, sampling, batching
//! of live sequences.

pub mod device_generate;
pub mod generate;
pub mod kv_cache;
pub mod sampling;
