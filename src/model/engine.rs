//! The model on one backend: its weights in that backend's buffers, the
//! gradients training accumulates there, and the passes the trainer and the
//! sampler ask for (scoring, VPPO's dual pass, a training forward and its
//! backward), all through the one generic graph. On the CPU backend this
//! is the host model's twin; on a GPU it replaces a hand-written device
//! copy of the graph.

use super::acts::Save;
use super::config::ModelConfig;
use super::error::ModelError;
use super::forward::{Forward, Scored};
use super::graph::{GatherWeights, Graph};
use super::input::{packed_inputs, SequenceInput, TrainSequence};
use super::params::{ParamLayout, Tensors};
use super::plan::HostPlan;
use super::qwen::Qwen25Vl;
use crate::backend::desc::{image_mask_seed, PatchGeometry};
use crate::ops::{Backend, Precision};

/// Log-probs (and entropies) of the response tokens of one or more
/// sequences, sequences concatenated.
#[derive(Debug, Clone, Default)]
pub struct Logprobs {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// An image processor as the patch-embed op needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchProcessor {
    pub geometry: PatchGeometry,
    /// `processor::image::normalize_lut` of the processor.
    pub lut: [[f32; 256]; 3],
}

/// A training forward awaiting its backward.
struct Pending<B: Backend> {
    fwd: Forward<B>,
    scored: Scored<B>,
}

pub struct Engine<B: Backend> {
    pub be: B,
    pub config: ModelConfig,
    pub layout: ParamLayout,
    /// One buffer per parameter, in [`ParamLayout`] order, in the
    /// precision's dtype (the graph's activations follow it).
    pub weights: Vec<B::Buf>,
    pub precision: Precision,
    /// Accumulated gradients (fp32 in either precision) (allocated by the first training forward).
    pub grads: Option<Vec<B::Buf>>,
    pending: Option<Pending<B>>,
}

impl<B: Backend> Engine<B> {
    /// Uploads every weight of `model` (fp32) to `be`, once.
    pub fn new(be: B, model: &Qwen25Vl) -> Result<Self, ModelError> {
        Self::with_precision(be, model, Precision::Fp32)
    }

    /// Uploads every weight of `model` to `be` in `precision` (bf16:
    /// rounded to nearest-even), once.
    pub fn with_precision(
        be: B,
        model: &Qwen25Vl,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let weights = model
            .weights
            .0
            .iter()
            .map(|w| match precision {
                Precision::Fp32 => be.upload(w),
                Precision::Bf16 => be.cast(&be.upload(w)?, precision.dtype()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            be,
            config: model.config.clone(),
            layout: model.layout.clone(),
            weights,
            precision,
            grads: None,
            pending: None,
        })
    }

    pub fn graph(&self) -> Graph<'_, B> {
        Graph::new(&self.be, &self.config, &self.layout, &self.weights)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The packed forward of `inputs` (pixels from their rows).
    fn run(
        &self,
        plan: &HostPlan,
        inputs: &[&SequenceInput],
        save: Save,
    ) -> Result<Forward<B>, ModelError> {
        let (ids, pixels) = packed_inputs(inputs);
        let pixels = match plan.vision {
            Some(_) => Some(self.be.upload(&pixels)?),
            None => None,
        };
        Ok(self.graph().forward(plan, &ids, pixels, save, None)?)
    }

    /// The response log-probs and entropies of `batch` from ONE packed
    /// forward (no activations kept).
    pub fn logprobs(&self, batch: &[TrainSequence]) -> Result<Logprobs, ModelError> {
        Ok(self.logprobs_with_forward(batch)?.0)
    }

    fn logprobs_with_forward(
        &self,
        batch: &[TrainSequence],
    ) -> Result<(Logprobs, Forward<B>, HostPlan), ModelError> {
        let plan = train_plan(&self.config, batch)?;
        let inputs: Vec<&SequenceInput> = batch.iter().map(|s| &s.input).collect();
        let fwd = self.run(&plan, &inputs, Save::Nothing)?;
        let scored = self.graph().score(&fwd, &plan)?;
        let lp = Logprobs {
            logprobs: scored.logprobs,
            entropy: scored.entropy,
        };
        Ok((lp, fwd, plan))
    }

    /// The log-probs of the response tokens of `seq` and their logits
    /// `[response, vocab]` (what `score` writes).
    pub fn response_logits(&self, seq: &TrainSequence) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let (lp, fwd, plan) = self.logprobs_with_forward(std::slice::from_ref(seq))?;
        let be = &self.be;
        let h = self.config.text.hidden_size;
        let rows = be.index(&plan.response_rows)?;
        let logits = self
            .graph()
            .lm_head(&be.gather_rows(&fwd.hidden, &rows, h)?)?;
        Ok((lp.logprobs, be.download(&logits)?))
    }

    /// The log-probs of `a` and of `b` (the same tokens with other images),
    /// and with `exact` the per-token KL(p_a || p_b) over the vocabulary.
    pub fn logprobs_pair(
        &self,
        a: &[TrainSequence],
        b: &[TrainSequence],
        exact: bool,
    ) -> Result<(Logprobs, Logprobs, Option<Vec<f32>>), ModelError> {
        let (la, fa, plan_a) = self.logprobs_with_forward(a)?;
        let (lb, fb, plan_b) = self.logprobs_with_forward(b)?;
        if plan_a.targets != plan_b.targets || plan_a.response_rows != plan_b.response_rows {
            return Err(ModelError::ForwardsDiffer);
        }
        let kl = if exact {
            let rows = &plan_a.response_rows;
            Some(self.graph().response_kl(&fa, rows, &fb, rows)?)
        } else {
            None
        };
        Ok((la, lb, kl))
    }

    /// VPPO's fused dual pass over a micro-batch: the sequences of `seqs`
    /// and their patch-blackened twins (each patch with probability `p`;
    /// image `i` of sequence `s` drawn from `image_mask_seed(seeds[s], i)`)
    /// through the vision tower and the decoder as ONE packed batch, both
    /// pixel sets made by the patch-embed op from the resized image bytes.
    /// Returns the originals' and the twins' log-probs (sequences
    /// concatenated), and with `exact` the per-token KL between them.
    pub fn dual_logprobs(
        &self,
        seqs: &[TrainSequence],
        images: &PatchProcessor,
        seeds: &[u64],
        p: f64,
        exact: bool,
    ) -> Result<(Logprobs, Logprobs, Option<Vec<f32>>), ModelError> {
        assert_eq!(seqs.len(), seeds.len(), "one mask seed per sequence");
        if seqs
            .iter()
            .any(|s| s.input.resized.len() != s.input.grids.len())
        {
            return Err(ModelError::NoResizedImages);
        }
        let be = &self.be;
        let mut originals = Vec::new();
        let mut twins = Vec::new();
        for (seq, &seed) in seqs.iter().zip(seeds) {
            for (i, img) in seq.input.resized.iter().enumerate() {
                let (orig, twin) = be.patch_embed(
                    &images.geometry,
                    &images.lut,
                    &img.data,
                    img.width,
                    img.height,
                    Some((image_mask_seed(seed, i), p)),
                )?;
                originals.push(orig);
                twins.push(twin.expect("a mask was asked for"));
            }
        }
        let parts: Vec<&B::Buf> = originals.iter().chain(&twins).collect();
        let pixels = be.concat(&parts)?;
        drop((originals, twins));
        let inputs: Vec<&SequenceInput> = seqs.iter().chain(seqs).map(|s| &s.input).collect();
        let lens: Vec<Option<usize>> = seqs
            .iter()
            .chain(seqs)
            .map(|s| Some(s.prompt_len))
            .collect();
        let plan = HostPlan::packed(&self.config, &inputs, &lens)?;
        let (ids, _) = packed_inputs(&inputs);
        let pixels = plan.vision.as_ref().map(|_| pixels);
        let graph = self.graph();
        let fwd = graph.forward(&plan, &ids, pixels, Save::Nothing, None)?;
        let scored = graph.score(&fwd, &plan)?;
        // The originals' rows come first, then the twins'.
        let half = scored.logprobs.len() / 2;
        let split = |v: &[f32]| (v[..half].to_vec(), v[half..].to_vec());
        let (lp_a, lp_b) = split(&scored.logprobs);
        let (ent_a, ent_b) = split(&scored.entropy);
        let kl = if exact {
            let (rows_a, rows_b) = plan.response_rows.split_at(half);
            Some(graph.response_kl(&fwd, rows_a, &fwd, rows_b)?)
        } else {
            None
        };
        Ok((
            Logprobs {
                logprobs: lp_a,
                entropy: ent_a,
            },
            Logprobs {
                logprobs: lp_b,
                entropy: ent_b,
            },
            kl,
        ))
    }

    /// Training forward of `batch` packed into one pass, keeping what
    /// `save` asks for; its backward ([`Self::train_backward`]) must come
    /// next.
    pub fn train_forward(
        &mut self,
        batch: &[TrainSequence],
        save: Save,
    ) -> Result<Logprobs, ModelError> {
        self.train_forward_from(batch, save, None)
    }

    /// [`Self::train_forward`] with every unit's weights gathered from
    /// `source` as it runs (ZeRO-3: this engine holds none of them whole).
    pub fn train_forward_from(
        &mut self,
        batch: &[TrainSequence],
        save: Save,
        source: Option<&dyn GatherWeights<B>>,
    ) -> Result<Logprobs, ModelError> {
        let plan = train_plan(&self.config, batch)?;
        let inputs: Vec<&SequenceInput> = batch.iter().map(|s| &s.input).collect();
        let (ids, pixels) = packed_inputs(&inputs);
        let pixels = match plan.vision {
            Some(_) => Some(self.be.upload(&pixels)?),
            None => None,
        };
        let (fwd, scored) = self.graph().gathering(source).with_root(|g| {
            let fwd = g.forward(&plan, &ids, pixels, save, None)?;
            let scored = g.score(&fwd, &plan)?;
            Ok((fwd, scored))
        })?;
        let lp = Logprobs {
            logprobs: scored.logprobs.clone(),
            entropy: scored.entropy.clone(),
        };
        self.pending = Some(Pending { fwd, scored });
        Ok(lp)
    }

    /// Backward of the last [`Self::train_forward`] from the gradient of
    /// the loss w.r.t. each response token's log-prob and entropy;
    /// accumulates into [`Self::grads`].
    pub fn train_backward(
        &mut self,
        d_logprob: &[f32],
        d_entropy: &[f32],
    ) -> Result<(), ModelError> {
        self.train_backward_from(d_logprob, d_entropy, None)
    }

    /// [`Self::train_backward`] with the units' weights from `source`, as
    /// the forward took them.
    pub fn train_backward_from(
        &mut self,
        d_logprob: &[f32],
        d_entropy: &[f32],
        source: Option<&dyn GatherWeights<B>>,
    ) -> Result<(), ModelError> {
        let pending = self.pending.take().ok_or(ModelError::NoPendingForward)?;
        let n = pending.scored.logprobs.len();
        for found in [d_logprob.len(), d_entropy.len()] {
            if found != n {
                return Err(ModelError::GradLength { expected: n, found });
            }
        }
        self.allocate_grads(source.is_some())?;
        let mut grads = self.grads.take().expect("allocated above");
        let out = self
            .graph()
            .gathering(source)
            .with_root_grads(&mut grads, |g, grads| {
                g.backward(&pending.fwd, &pending.scored, d_logprob, d_entropy, grads)
            });
        self.grads = Some(grads);
        Ok(out?)
    }

    /// The gradient buffers, on first use: whole ones from the layout (the
    /// weights may be empty under ZeRO-3), or empty ones when a gather
    /// source hands each unit's out after its backward.
    fn allocate_grads(&mut self, by_unit: bool) -> Result<(), ModelError> {
        if self.grads.is_none() {
            let grads = self
                .layout
                .specs
                .iter()
                .map(|s| self.be.zeros(if by_unit { 0 } else { s.numel() }))
                .collect::<Result<Vec<_>, _>>()?;
            self.grads = Some(grads);
        }
        Ok(())
    }

    /// The gathers and gradient hand-overs of one training forward and
    /// backward without data (see [`Graph::idle_pass`]).
    pub fn idle_pass(&mut self, source: &dyn GatherWeights<B>) -> Result<(), ModelError> {
        self.allocate_grads(true)?;
        let mut grads = self.grads.take().expect("allocated above");
        let out = self.graph().gathering(Some(source)).idle_pass(&mut grads);
        self.grads = Some(grads);
        Ok(out?)
    }

    /// Adds the accumulated gradients into `into` and zeroes them.
    pub fn take_grads(&mut self, into: &mut Tensors) -> Result<(), ModelError> {
        let Some(grads) = self.grads.as_mut() else {
            return Ok(());
        };
        for (dst, g) in into.0.iter_mut().zip(grads.iter_mut()) {
            let host = self.be.download(g)?;
            for (d, v) in dst.iter_mut().zip(&host) {
                *d += v;
            }
            self.be.fill_zero(g)?;
        }
        Ok(())
    }

    /// Zeroes the accumulated gradients.
    pub fn zero_grads(&mut self) -> Result<(), ModelError> {
        if let Some(grads) = self.grads.as_mut() {
            for g in grads.iter_mut() {
                self.be.fill_zero(g)?;
            }
        }
        Ok(())
    }

    /// Replaces the weights with `weights` (after a host optimizer step),
    /// rounded to the weights' dtype.
    pub fn upload_weights(&mut self, weights: &Tensors) -> Result<(), ModelError> {
        for (dst, src) in self.weights.iter_mut().zip(&weights.0) {
            self.be.write(dst, src)?;
        }
        Ok(())
    }

    /// Copies the weights into `weights` (before a checkpoint).
    pub fn download_weights(&self, weights: &mut Tensors) -> Result<(), ModelError> {
        for (host, buf) in weights.0.iter_mut().zip(&self.weights) {
            *host = self.be.download(buf)?;
        }
        Ok(())
    }
}

/// The plan of a training batch: every sequence scored from its prompt on.
fn train_plan(cfg: &ModelConfig, batch: &[TrainSequence]) -> Result<HostPlan, ModelError> {
    let inputs: Vec<&SequenceInput> = batch.iter().map(|s| &s.input).collect();
    let lens: Vec<Option<usize>> = batch.iter().map(|s| Some(s.prompt_len)).collect();
    HostPlan::packed(cfg, &inputs, &lens)
}
