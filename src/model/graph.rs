//! The graph's `self`: a backend, the model's configuration and parameter
//! table, and its weights in that backend's buffers. Every layer's forward
//! and backward (`block.rs`, `vision.rs`, `text.rs`, `head.rs`,
//! `forward.rs`) is a method of [`Graph`], written once for all backends.

use super::config::ModelConfig;
use super::params::{ParamId, ParamLayout};
use crate::ops::Backend;

pub struct Graph<'m, B: Backend> {
    pub be: &'m B,
    pub cfg: &'m ModelConfig,
    pub layout: &'m ParamLayout,
    /// One buffer per parameter, in [`ParamLayout`] order.
    pub w: &'m [B::Buf],
}

impl<'m, B: Backend> Graph<'m, B> {
    pub fn new(be: &'m B, cfg: &'m ModelConfig, layout: &'m ParamLayout, w: &'m [B::Buf]) -> Self {
        Self { be, cfg, layout, w }
    }

    pub fn w(&self, id: ParamId) -> &'m B::Buf {
        &self.w[id.0]
    }

    /// The vocabulary head: `lm_head`, or the embedding when tied.
    pub fn head_id(&self) -> ParamId {
        let t = &self.layout.text;
        t.lm_head.unwrap_or(t.embed)
    }
}
