//! The whole model over packed sequences: the embedding, the vision tower
//! and the image scatter, the decoder, and the loss head (log-prob and
//! entropy of every response token, chunk by chunk over the vocabulary)
//! with its backward through everything. Written once over [`Backend`].

use super::acts::Save;
use super::graph::Graph;
use super::plan::HostPlan;
use super::text::{KvSink, TextActs};
use super::vision::{VisionActs, VisionInputs};
use crate::backend::desc::RopeFreqs;
use crate::ops::{Backend, Buffer, Result, WeightGrads};

/// Response rows per lm_head chunk: bounds the `[rows, vocab]` logits held
/// at once (training never holds the full `[T, vocab]`).
pub const LOSS_CHUNK_ROWS: usize = 256;

/// A host plan's index arrays and rotary table on the backend.
pub struct PlanInputs<B: Backend> {
    pub ids: B::Ids,
    pub cu: B::Seqlens,
    pub rope: B::Rope,
    /// Packed rows holding image tokens, in scatter order.
    pub image_rows: B::Index,
    /// The other rows, and their ids (the embedding's backward).
    pub text_rows: B::Index,
    pub text_ids: B::Ids,
    pub vision: Option<VisionInputs<B>>,
}

impl<B: Backend> PlanInputs<B> {
    pub fn upload(g: &Graph<'_, B>, plan: &HostPlan, ids: &[u32]) -> Result<Self> {
        let (tc, be) = (&g.cfg.text, g.be);
        let t = plan.shape.tokens;
        let freqs = RopeFreqs::mrope(tc.mrope_section, tc.head_dim, tc.rope_theta);
        let streams: Vec<&[i32]> = plan.text_positions.chunks(t.max(1)).collect();
        let mut is_image = vec![false; t];
        for &r in &plan.image_rows {
            is_image[r as usize] = true;
        }
        let text_rows: Vec<i32> = (0..t as i32).filter(|&r| !is_image[r as usize]).collect();
        let text_ids: Vec<u32> = text_rows.iter().map(|&r| ids[r as usize]).collect();
        Ok(Self {
            ids: be.ids(ids)?,
            cu: be.seqlens(&plan.cu_text)?,
            rope: be.rope(&freqs, &streams[..3.min(streams.len())])?,
            image_rows: be.index(&plan.image_rows)?,
            text_rows: be.index(&text_rows)?,
            text_ids: be.ids(&text_ids)?,
            vision: plan
                .vision
                .as_ref()
                .map(|v| VisionInputs::upload(g, v))
                .transpose()?,
        })
    }
}

/// A forward over packed sequences, with what a backward needs.
pub struct Forward<B: Backend> {
    pub inputs: PlanInputs<B>,
    /// Final-norm hidden states `[T, hidden]`.
    pub hidden: B::Buf,
    /// Vision tower + merger output `[image tokens, hidden]`, scatter order.
    pub vision_embeds: Option<B::Buf>,
    pub pixels: Option<B::Buf>,
    pub vision_acts: Option<VisionActs<B>>,
    pub text_acts: Option<TextActs<B>>,
}

/// One lm_head chunk of a scored forward: its rows, targets, and what the
/// backward of the log-prob head reads.
pub struct HeadChunk<B: Backend> {
    /// Index range into the forward's response tokens.
    pub range: std::ops::Range<usize>,
    pub rows: B::Index,
    pub targets: B::Ids,
    pub lse: B::Buf,
    pub entropy: B::Buf,
}

/// Log-prob and entropy of every response token of a forward.
pub struct Scored<B: Backend> {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
    pub chunks: Vec<HeadChunk<B>>,
}

impl<B: Backend> Graph<'_, B> {
    /// Embedding, vision tower (images in `pixels`, laid out by the plan),
    /// image scatter and decoder over the packed sequences of `plan`.
    pub fn forward(
        &self,
        plan: &HostPlan,
        ids: &[u32],
        pixels: Option<B::Buf>,
        save: Save,
        kv: Option<KvSink<'_, B>>,
    ) -> Result<Forward<B>> {
        let (tc, be) = (&self.cfg.text, self.be);
        let h = tc.hidden_size;
        let inputs = PlanInputs::upload(self, plan, ids)?;
        let mut x = be.embedding_fwd(&inputs.ids, self.w(self.layout.text.embed), h)?;
        let (mut vision_embeds, mut vision_acts) = (None, None);
        if let (Some(vi), Some(px)) = (&inputs.vision, &pixels) {
            let (embeds, acts) = self.vision_fwd(px, vi, save)?;
            be.scatter_rows(&embeds, &inputs.image_rows, h, &mut x)?;
            vision_embeds = Some(embeds);
            vision_acts = acts;
        } else {
            self.visit_vision_fwd()?;
        }
        let (hidden, text_acts) = self.decoder_fwd(x, &inputs.rope, &inputs.cu, save, kv)?;
        Ok(Forward {
            inputs,
            hidden,
            vision_embeds,
            pixels: if save == Save::Nothing { None } else { pixels },
            vision_acts,
            text_acts,
        })
    }

    /// The logits of response tokens `range` of `plan` (chunk rows).
    fn chunk_logits(&self, fwd: &Forward<B>, rows: &B::Index) -> Result<(B::Buf, B::Buf)> {
        let h = self.cfg.text.hidden_size;
        let hidden_rows = self.be.gather_rows(&fwd.hidden, rows, h)?;
        let logits = self.lm_head(&hidden_rows)?;
        Ok((hidden_rows, logits))
    }

    /// Log-prob and entropy of every response token of `plan`, chunk by
    /// chunk over the vocabulary head.
    pub fn score(&self, fwd: &Forward<B>, plan: &HostPlan) -> Result<Scored<B>> {
        let (vocab, be) = (self.cfg.text.vocab_size, self.be);
        let n = plan.response_rows.len();
        let (mut logprobs, mut entropy) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut chunks = Vec::new();
        for c0 in (0..n).step_by(LOSS_CHUNK_ROWS) {
            let range = c0..(c0 + LOSS_CHUNK_ROWS).min(n);
            let rows = be.index(&plan.response_rows[range.clone()])?;
            let targets = be.ids(&plan.targets[range.clone()])?;
            let (_, logits) = self.chunk_logits(fwd, &rows)?;
            let (lp, ent, lse) = be.token_logprob_fwd(&logits, vocab, &targets)?;
            logprobs.extend(be.download(&lp)?);
            entropy.extend(be.download(&ent)?);
            chunks.push(HeadChunk {
                range,
                rows,
                targets,
                lse,
                entropy: ent,
            });
        }
        Ok(Scored {
            logprobs,
            entropy,
            chunks,
        })
    }

    /// Exact per-token KL(p_a || p_b) over the full vocabulary between the
    /// next-token distributions at rows `rows_a` of forward `a` and rows
    /// `rows_b` of forward `b` (the same response tokens), chunk by chunk:
    /// never both `[T, vocab]` logits at once.
    pub fn response_kl(
        &self,
        a: &Forward<B>,
        rows_a: &[i32],
        b: &Forward<B>,
        rows_b: &[i32],
    ) -> Result<Vec<f32>> {
        let (vocab, be) = (self.cfg.text.vocab_size, self.be);
        let n = rows_a.len();
        assert_eq!(n, rows_b.len(), "response_kl: row counts differ");
        let mut kl = Vec::with_capacity(n);
        for c0 in (0..n).step_by(LOSS_CHUNK_ROWS) {
            let c1 = (c0 + LOSS_CHUNK_ROWS).min(n);
            let (_, la) = self.chunk_logits(a, &be.index(&rows_a[c0..c1])?)?;
            let (_, lb) = self.chunk_logits(b, &be.index(&rows_b[c0..c1])?)?;
            kl.extend(be.download(&be.softmax_kl_fwd(&la, &lb, vocab)?)?);
        }
        Ok(kl)
    }

    /// Backward of a loss given as its gradient w.r.t. each response
    /// token's log-prob and entropy (in [`Scored::logprobs`] order): GRPO
    /// and VPPO losses are a weighting, not new graph code. Accumulates
    /// every parameter's gradient into `g`.
    pub fn backward(
        &self,
        fwd: &Forward<B>,
        scored: &Scored<B>,
        d_logprob: &[f32],
        d_entropy: &[f32],
        g: &mut [B::Buf],
    ) -> Result<()> {
        let (tc, be) = (&self.cfg.text, self.be);
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let head = self.head_id();
        // Loss head, chunk by chunk: recompute the chunk's logits, take their
        // gradient, push it through the head. Response rows are distinct, so
        // scattering each chunk's rows is their sum.
        let mut d_hidden = be.zeros(fwd.hidden.len())?;
        for c in &scored.chunks {
            let (hidden_rows, logits) = self.chunk_logits(fwd, &c.rows)?;
            let d_logits = be.token_logprob_bwd(
                &logits,
                vocab,
                &c.targets,
                &c.lse,
                &c.entropy,
                &be.upload(&d_logprob[c.range.clone()])?,
                &be.upload(&d_entropy[c.range.clone()])?,
            )?;
            drop(logits);
            let d_rows = be
                .linear_bwd(
                    &d_logits,
                    &hidden_rows,
                    c.range.len(),
                    h,
                    self.w(head),
                    WeightGrads {
                        weight: &mut g[head.0],
                        bias: None,
                        rows: 0..vocab,
                    },
                    true,
                )?
                .expect("asked for dx");
            be.scatter_rows(&d_rows, &c.rows, h, &mut d_hidden)?;
        }
        let inputs = &fwd.inputs;
        let text_acts = fwd
            .text_acts
            .as_ref()
            .expect("a training forward keeps decoder activations");
        let d_embeds = self.decoder_bwd(text_acts, &inputs.rope, &inputs.cu, &d_hidden, g)?;
        // Image rows were replaced by vision features: their gradient goes to
        // the vision tower, the embedding rows of image tokens get none.
        let d_text = be.gather_rows(&d_embeds, &inputs.text_rows, h)?;
        be.embedding_bwd(
            &inputs.text_ids,
            &d_text,
            h,
            &mut g[self.layout.text.embed.0],
        )?;
        if let (Some(vacts), Some(vi), Some(px)) = (&fwd.vision_acts, &inputs.vision, &fwd.pixels) {
            let d_vision = be.gather_rows(&d_embeds, &inputs.image_rows, h)?;
            self.vision_bwd(vacts, vi, px, &d_vision, g)?;
        } else {
            self.visit_vision_bwd(g)?;
        }
        Ok(())
    }
}
