//! The Qwen2 decoder with M-RoPE over packed sequences, the lm_head, and
//! the decode step over a paged KV cache. Each layer's forward returns the
//! activations its backward will need.

use super::acts::{Save, SavedBlock};
use super::block::{BlockWiring, Qkv};
use super::graph::Graph;
use super::kv_cache::{DecodeBatch, KvStore};
use crate::backend::desc::PagedShape;
use crate::ops::{Backend, Buffer, Result, WeightRows};

/// Activations of a whole decoder forward (kept only when training).
pub struct TextActs<B: Backend> {
    pub layers: Vec<SavedBlock<B>>,
    pub final_in: B::Buf,
    pub final_rstd: B::Buf,
}

/// Where a prefill writes each layer's roped keys and values: the cache
/// and the slot of every row.
pub struct KvSink<'a, B: Backend> {
    pub store: &'a mut KvStore<B>,
    pub slots: &'a B::Index,
}

impl<B: Backend> Graph<'_, B> {
    /// Runs the decoder on input embeddings `x[T, hidden]` (packed sequences
    /// delimited by `cu`), returning the final-norm hidden states. With
    /// `kv`, each layer's post-RoPE keys and values go to the cache (prefill).
    pub fn decoder_fwd(
        &self,
        mut x: B::Buf,
        rope: &B::Rope,
        cu: &B::Seqlens,
        save: Save,
        mut kv: Option<KvSink<'_, B>>,
    ) -> Result<(B::Buf, Option<TextActs<B>>)> {
        let (cfg, p, be) = (&self.cfg.text, &self.layout.text, self.be);
        let mut layers = Vec::new();
        for (l, lp) in p.layers.iter().enumerate() {
            let ids = self.layout.text_layer_ids(l);
            let acts = self.with_unit(ids, |unit| {
                unit.block_fwd(&BlockWiring::text(cfg, lp), &mut x, rope, cu)
            })?;
            if let Some(sink) = kv.as_mut() {
                sink.store.write_rows(be, l, &acts.k, &acts.v, sink.slots)?;
            }
            layers.extend(SavedBlock::keep(acts, save));
        }
        let (out, rstd) =
            be.rmsnorm_fwd(&x, self.w(p.norm), cfg.hidden_size, cfg.rms_norm_eps as f32)?;
        let acts = (save != Save::Nothing).then_some(TextActs {
            layers,
            final_in: x,
            final_rstd: rstd,
        });
        Ok((out, acts))
    }

    /// Backward of [`Self::decoder_fwd`] from the gradient w.r.t. the
    /// final-norm hidden states; returns the gradient w.r.t. the input
    /// embeddings.
    pub fn decoder_bwd(
        &self,
        acts: &TextActs<B>,
        rope: &B::Rope,
        cu: &B::Seqlens,
        d_hidden: &B::Buf,
        g: &mut [B::Buf],
    ) -> Result<B::Buf> {
        let (cfg, p, be) = (&self.cfg.text, &self.layout.text, self.be);
        let mut dx = be.rmsnorm_bwd(
            d_hidden,
            &acts.final_in,
            self.w(p.norm),
            &acts.final_rstd,
            cfg.hidden_size,
            &mut g[p.norm.0],
        )?;
        for (l, (lp, saved)) in p.layers.iter().zip(&acts.layers).enumerate().rev() {
            let wiring = BlockWiring::text(cfg, lp);
            let ids = self.layout.text_layer_ids(l);
            self.with_unit_grads(ids, g, |unit, g| {
                let mut recomputed = None;
                let layer = unit.block_acts(&wiring, saved, rope, cu, &mut recomputed)?;
                unit.block_bwd(&wiring, layer, rope, cu, &mut dx, g)
            })?;
        }
        Ok(dx)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]` (the tied
    /// embedding serves as the head when there is no lm_head).
    pub fn lm_head(&self, hidden: &B::Buf) -> Result<B::Buf> {
        let tc = &self.cfg.text;
        let head = WeightRows {
            weight: self.w(self.head_id()),
            bias: None,
            rows: 0..tc.vocab_size,
        };
        let h = tc.hidden_size;
        self.be.linear_fwd(hidden, hidden.len() / h, h, &head)
    }

    /// One decode step for `B` sequences, one new token each: `x[B, hidden]`
    /// are the new tokens' embeddings, `rope` their positions; `batch`
    /// holds the cache slots reserved for them and each sequence's block
    /// table and length (the new token counted). Writes the new keys and
    /// values into the cache, attends over each sequence's cache and
    /// returns the final-norm hidden states `[B, hidden]`.
    pub fn decode_step(
        &self,
        mut x: B::Buf,
        rope: &B::Rope,
        store: &mut KvStore<B>,
        batch: &DecodeBatch<B>,
    ) -> Result<B::Buf> {
        let (cfg, p, be) = (&self.cfg.text, &self.layout.text, self.be);
        let hd = cfg.head_dim;
        let shape = PagedShape {
            block_size: store.block_size,
            q_heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        for (l, lp) in p.layers.iter().enumerate() {
            let wiring = BlockWiring::text(cfg, lp);
            let ids = self.layout.text_layer_ids(l);
            self.with_unit(ids, |unit| {
                let Qkv { q, k, v, .. } = unit.qkv_fwd(&wiring, &x, rope)?;
                store.write_rows(be, l, &k, &v, &batch.slots)?;
                let attn = be.paged_attention(
                    &shape,
                    &q,
                    &store.k[l],
                    &store.v[l],
                    &batch.tables,
                    batch.stride,
                    &batch.lens,
                )?;
                unit.o_residual(&wiring, &attn, &mut x)?;
                unit.mlp_fwd(&wiring, &mut x)
            })?;
        }
        let (out, _) =
            be.rmsnorm_fwd(&x, self.w(p.norm), cfg.hidden_size, cfg.rms_norm_eps as f32)?;
        Ok(out)
    }
}
