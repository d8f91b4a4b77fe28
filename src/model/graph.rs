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
use crate::ops::{Backend, Buffer, Result};

/// Where the whole weights of a unit come from when this rank holds only
/// shards of them.
pub trait GatherWeights<B: Backend> {
    /// The whole weights of parameters `ids`, in order, made on `be`.
    fn gather(&self, be: &B, ids: &[ParamId]) -> Result<Vec<B::Buf>>;

    /// Takes this rank's whole gradients of `ids` out of `grads` (leaving
    /// them empty): the source keeps the ranks' sum of its own shard.
    fn scatter_grads(&self, be: &B, ids: &[ParamId], grads: &mut [B::Buf]) -> Result<()>;
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

    /// Whether units are gathered from other ranks as they run (ZeRO-3).
    pub fn gathers_units(&self) -> bool {
        self.source.is_some()
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
        self.with_unit(root, f)
    }

    /// [`Self::with_unit`] for a backward: the unit's gradients in `g` are
    /// allocated whole for the call, then handed to the source (which
    /// keeps its shard of their sum over ranks) and freed.
    pub fn with_unit_grads<R>(
        &self,
        ids: &[ParamId],
        g: &mut [B::Buf],
        f: impl FnOnce(&Graph<'_, B>, &mut [B::Buf]) -> Result<R>,
    ) -> Result<R> {
        let Some(source) = self.source else {
            return f(self, g);
        };
        for id in ids {
            if g[id.0].is_empty() {
                g[id.0] = self.be.zeros(self.layout.specs[id.0].numel())?;
            }
        }
        let out = self.with_unit(ids, |unit| f(unit, &mut *g))?;
        source.scatter_grads(self.be, ids, g)?;
        Ok(out)
    }

    /// [`Self::with_unit_grads`] over the root unit.
    pub fn with_root_grads<R>(
        &self,
        g: &mut [B::Buf],
        f: impl FnOnce(&Graph<'_, B>, &mut [B::Buf]) -> Result<R>,
    ) -> Result<R> {
        let root = self.layout.root_ids();
        self.with_unit_grads(root, g, f)
    }

    /// The vision units' gathers of a forward without images: with a
    /// source, every rank must gather the same units in the same order.
    pub fn visit_vision_fwd(&self) -> Result<()> {
        if self.source.is_none() {
            return Ok(());
        }
        for i in 0..self.layout.vision.blocks.len() {
            self.with_unit(self.layout.vision_block_ids(i), |_| Ok(()))?;
        }
        Ok(())
    }

    /// The vision units' gathers and (zero) gradient hand-overs of a
    /// backward without images.
    pub fn visit_vision_bwd(&self, g: &mut [B::Buf]) -> Result<()> {
        if self.source.is_none() {
            return Ok(());
        }
        for i in (0..self.layout.vision.blocks.len()).rev() {
            self.with_unit_grads(self.layout.vision_block_ids(i), g, |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Every collective of one training forward and backward, without the
    /// compute: a rank with fewer packed passes in an optimizer step than
    /// another runs these, so the ranks' gathers stay in step.
    pub fn idle_pass(&self, g: &mut [B::Buf]) -> Result<()> {
        let layers = self.layout.text.layers.len();
        self.with_root(|root| {
            root.visit_vision_fwd()?;
            for l in 0..layers {
                root.with_unit(root.layout.text_layer_ids(l), |_| Ok(()))?;
            }
            Ok(())
        })?;
        self.with_root_grads(g, |root, g| {
            for l in (0..layers).rev() {
                root.with_unit_grads(root.layout.text_layer_ids(l), g, |_, _| Ok(()))?;
            }
            root.visit_vision_bwd(g)
        })
    }
}
