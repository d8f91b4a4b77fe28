//! Rollouts: prefill and decode with a paged KV cache, sampling, batching
//! of live sequences, on the model of any backend.

pub mod decode_graph;
pub mod generate;
pub mod kv_cache;
pub mod sampling;
pub mod scheduler;
