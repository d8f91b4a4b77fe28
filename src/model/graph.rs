//! The graph's `self`: a backend, the model's configuration and parameter
//! table, and its weights in that backend's buffers. Every layer's forward
//! and backward (`block.rs`, `vision.rs`, `text.rs`, `head.rs`,
//! `forward.rs`) is a method of [`Graph`], written once for all backends.
//!
//! Weights need not all be resident: with a [`GatherWeights`] source (the
//! trainer's ZeRO-3), each unit (a vision block, a decoder layer, and the
//! root: every parameter outside the blocks) is gathered whole just before
//! it runs and freed when it returns, through [`Graph::with_unit`].

use super::config::ModelConfig;
use super::params::{ParamId, ParamLayout};
use crate::ops::{Backend, Result};

/// Where the whole weights of a unit come from when this rank holds only
/// shards of them.
pub trait GatherWeights<B: Backend> {
    /// The whole weights of parameters `ids`, in order, made on `be`.
    fn gather(&self, be: &B, ids: &[ParamId]) -> Result<Vec<B::Buf>>;
}

pub struct Graph<'m, B: Backend> {
    pub be: &'m B,
    pub cfg: &'m ModelConfig,
    pub layout: &'m ParamLayout,
    /// One buffer per parameter, in [`ParamLayout`] order (empty for the
    /// parameters a gather source provides).
    pub w: &'m [B::Buf],
    /// Gathered units in scope: (ids, their whole weights).
    gathered: Vec<(&'m [ParamId], &'m [B::Buf])>,
    source: Option<&'m dyn GatherWeights<B>>,
}

impl<'m, B: Backend> Graph<'m, B> {
    pub fn new(be: &'m B, cfg: &'m ModelConfig, layout: &'m ParamLayout, w: &'m [B::Buf]) -> Self {
        Self {
            be,
            cfg,
            layout,
            w,
            gathered: Vec::new(),
            source: None,
        }
    }

    /// This graph with its units' weights gathered from `source`.
    pub fn gathering(mut self, source: Option<&'m dyn GatherWeights<B>>) -> Self {
        self.source = source;
        self
    }

    pub fn w(&self, id: ParamId) -> &'m B::Buf {
        for (ids, bufs) in &self.gathered {
            if let Some(i) = ids.iter().position(|&g| g == id) {
                return &bufs[i];
            }
        }
        &self.w[id.0]
    }

    /// The vocabulary head: `lm_head`, or the embedding when tied.
    pub fn head_id(&self) -> ParamId {
        let t = &self.layout.text;
        t.lm_head.unwrap_or(t.embed)
    }

    /// Runs `f` with the weights of `ids` whole: gathered from the source
    /// for the call and freed after it, or as they are without a source.
    pub fn with_unit<R>(
        &self,
        ids: &[ParamId],
        f: impl FnOnce(&Graph<'_, B>) -> Result<R>,
    ) -> Result<R> {
        let Some(source) = self.source else {
            return f(self);
        };
        let bufs = source.gather(self.be, ids)?;
        let mut gathered: Vec<(&[ParamId], &[B::Buf])> = self.gathered.clone();
        gathered.push((ids, &bufs));
        let unit = Graph {
            be: self.be,
            cfg: self.cfg,
            layout: self.layout,
            w: self.w,
            gathered,
            source: Some(source),
        };
        f(&unit)
    }

    /// [`Self::with_unit`] over the root unit: every parameter outside the
    /// vision blocks and decoder layers (patch embedding, merger, token
    /// embedding, final norm, head).
    pub fn with_root<R>(&self, f: impl FnOnce(&Graph<'_, B>) -> Result<R>) -> Result<R> {
        let root = self.layout.root_ids();
        self.with_unit(&root, f)
    }
}
