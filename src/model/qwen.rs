//! Qwen2.5-VL as one object on the host: load a checkpoint directory, run
//! the forward on packed sequences with images, and (for training) the
//! chunked loss head and the backward through the whole graph: the generic
//! graph (`graph.rs` and the layers) on the CPU backend.

use super::acts::Save;
use super::checkpoint::{Checkpoint, NameLayout};
use super::config::ModelConfig;
use super::error::ModelError;
use super::forward::{Forward, Scored};
use super::graph::Graph;
use super::input::{packed_inputs, SequenceInput, TrainSequence};
use super::params::{ParamLayout, Tensors};
use super::plan::HostPlan;
use super::positions::MropePositions;
use crate::ops::cpu::CpuBackend;
use std::path::{Path, PathBuf};

/// Forward results of one sequence.
pub struct ForwardOutput {
    /// Final-norm hidden states `[T, hidden]`.
    pub hidden: Vec<f32>,
    pub positions: MropePositions,
    /// Vision tower + merger output `[image tokens, hidden]`, in scatter order.
    pub vision_embeds: Vec<f32>,
}

/// A training forward over packed sequences: the response tokens' log-probs
/// and entropies, and what the backward needs.
pub struct TrainForward {
    pub plan: HostPlan,
    /// `log p(token)` of every response token, sequences concatenated.
    pub logprobs: Vec<f32>,
    /// Entropy of the next-token distribution at the same positions.
    pub entropy: Vec<f32>,
    /// Response tokens per sequence.
    pub response_lens: Vec<usize>,
    fwd: Forward<CpuBackend>,
    scored: Scored<CpuBackend>,
}

pub struct Qwen25Vl {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub weights: Tensors,
    /// The weight-name layout of the checkpoint it came from.
    pub names: NameLayout,
}

impl Qwen25Vl {
    /// Loads `config.json` and the weights of a Hugging Face checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotADirectory(dir.to_path_buf()));
        }
        let config = ModelConfig::load(dir)?;
        let layout = ParamLayout::new(&config);
        let ckpt = Checkpoint::open(dir)?;
        let weights = ckpt.load_params(&layout)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            layout,
            weights,
            names: ckpt.layout,
        })
    }

    /// The generic graph on the CPU backend over these weights.
    pub fn graph(&self) -> Graph<'_, CpuBackend> {
        Graph::new(&CpuBackend, &self.config, &self.layout, &self.weights.0)
    }

    /// Runs vision tower, image scatter and decoder on one sequence.
    pub fn forward(&self, input: &SequenceInput) -> Result<ForwardOutput, ModelError> {
        let plan = HostPlan::new(&self.config, input, None)?;
        let fwd = self.run(&plan, &[input], Save::Nothing)?;
        Ok(ForwardOutput {
            hidden: fwd.hidden,
            positions: plan.positions.into_iter().next().expect("one sequence"),
            vision_embeds: fwd.vision_embeds.unwrap_or_default(),
        })
    }

    /// The packed forward of `inputs` under `plan`.
    fn run(
        &self,
        plan: &HostPlan,
        inputs: &[&SequenceInput],
        save: Save,
    ) -> Result<Forward<CpuBackend>, ModelError> {
        let (ids, pixels) = packed_inputs(inputs);
        let pixels = plan.vision.is_some().then_some(pixels);
        Ok(self.graph().forward(plan, &ids, pixels, save, None)?)
    }

    /// Logits of the selected rows of a forward's hidden states.
    pub fn logits(&self, out: &ForwardOutput, rows: &[usize]) -> Vec<f32> {
        let h = self.config.text.hidden_size;
        let mut selected = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            selected.extend_from_slice(&out.hidden[r * h..(r + 1) * h]);
        }
        self.graph()
            .lm_head(&selected)
            .expect("the CPU head has no failure mode")
    }

    /// Training forward over several sequences packed into one batch (no
    /// padding): all images through the vision tower together, each
    /// sequence its own M-RoPE positions and causal span, keeping the
    /// activations `save` asks for; then the log-prob and entropy of every
    /// response token, chunk by chunk over the vocabulary head.
    pub fn train_forward(
        &self,
        batch: &[TrainSequence],
        save: Save,
    ) -> Result<TrainForward, ModelError> {
        let inputs: Vec<&SequenceInput> = batch.iter().map(|s| &s.input).collect();
        let lens: Vec<Option<usize>> = batch.iter().map(|s| Some(s.prompt_len)).collect();
        let plan = HostPlan::packed(&self.config, &inputs, &lens)?;
        let fwd = self.run(&plan, &inputs, save)?;
        let scored = self.graph().score(&fwd, &plan)?;
        Ok(TrainForward {
            logprobs: scored.logprobs.clone(),
            entropy: scored.entropy.clone(),
            response_lens: plan.response_lens.clone(),
            plan,
            fwd,
            scored,
        })
    }

    /// Exact per-token KL(p_a || p_b) over the full vocabulary between the
    /// next-token distributions of two training forwards of the same tokens
    /// (VPPO's dependency with the original and the perturbed image).
    pub fn response_kl(&self, a: &TrainForward, b: &TrainForward) -> Result<Vec<f32>, ModelError> {
        if a.plan.targets != b.plan.targets
            || a.plan.response_rows != b.plan.response_rows
            || a.response_lens != b.response_lens
        {
            return Err(ModelError::ForwardsDiffer);
        }
        let rows = &a.plan.response_rows;
        Ok(self.graph().response_kl(&a.fwd, rows, &b.fwd, rows)?)
    }

    /// Backward of a loss given as its gradient w.r.t. each response
    /// token's log-prob and entropy (`d_logprob`, `d_entropy`, in
    /// [`TrainForward::logprobs`] order). Accumulates every parameter's
    /// gradient into `grads`.
    pub fn train_backward(
        &self,
        fwd: &TrainForward,
        d_logprob: &[f32],
        d_entropy: &[f32],
        grads: &mut Tensors,
    ) -> Result<(), ModelError> {
        let n = fwd.logprobs.len();
        for found in [d_logprob.len(), d_entropy.len()] {
            if found != n {
                return Err(ModelError::GradLength { expected: n, found });
            }
        }
        if fwd.fwd.text_acts.is_none() {
            return Err(ModelError::NoPendingForward);
        }
        self.graph()
            .backward(&fwd.fwd, &fwd.scored, d_logprob, d_entropy, &mut grads.0)?;
        Ok(())
    }
}
