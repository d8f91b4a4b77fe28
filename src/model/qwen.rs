//! Qwen2.5-VL as one object on the host: load a checkpoint directory, run
//! the forward on packed sequences with images, and (for training) the
//! chunked loss head and the backward through the whole graph: the generic
//! graph (`graph.rs` and the layers) on the CPU backend.

use super::acts::Save;
use super::checkpoint::{Checkpoint, LoadError, NameLayout};
use super::config::{ConfigError, ModelConfig};
use super::forward::{Forward, Scored};
use super::graph::Graph;
use super::params::{ParamLayout, Tensors};
use super::plan::HostPlan;
use super::positions::{MropePositions, PositionError};
use crate::backend::cpu::OpError;
use crate::ops::cpu::CpuBackend;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("checkpoint directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Positions(#[from] PositionError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("the batch has {tokens} image tokens but the images give {features} features")]
    ImageTokens { tokens: usize, features: usize },
    #[error("pixel_values has {len} values, not a multiple of the patch size {patch_dim}")]
    PixelShape { len: usize, patch_dim: usize },
    #[error("sequence {seq}: prompt length {prompt_len} leaves no response in {len} tokens")]
    NoResponse {
        seq: usize,
        prompt_len: usize,
        len: usize,
    },
    #[error("the two forwards compared by response_kl score different tokens")]
    ForwardsDiffer,
    #[error("loss gradients have {found} entries for {expected} response tokens")]
    GradLength { expected: usize, found: usize },
    #[error("backward called without a training forward before it")]
    NoPendingForward,
    #[error(
        "the device optimizer keeps fp32 weights; with bf16 model weights AdamW runs on the host"
    )]
    DeviceOptimizer,
    #[error("the fused dual pass needs the image processor on the device (set_image_processor)")]
    NoImageProcessor,
    #[error(
        "the fused dual pass needs the resized image bytes of the input (build it from images)"
    )]
    NoResizedImages,
    #[error("CUDA device: {0}")]
    Device(#[from] crate::backend::cuda::CudaError),
}

impl From<crate::ops::Error> for ModelError {
    fn from(e: crate::ops::Error) -> Self {
        match e {
            crate::ops::Error::Op(e) => Self::Op(e),
            crate::ops::Error::Device(e) => Self::Device(e),
        }
    }
}

impl From<cudarc::driver::DriverError> for ModelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Device(e.into())
    }
}

/// One token sequence and its images (already processed).
#[derive(Debug, Clone, Default)]
pub struct SequenceInput {
    pub ids: Vec<u32>,
    /// Concatenated `[N, patch_dim]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// Patch grid `(t, h, w)` of each image.
    pub grids: Vec<[usize; 3]>,
    /// Each image after smart_resize, as 8-bit RGB (empty when the input
    /// was built from `pixel_values` alone): the GPU embeds patches, and
    /// draws VPPO's perturbed copy, straight from these bytes.
    pub resized: Vec<crate::processor::image::RgbImage>,
}

/// Forward results of one sequence.
pub struct ForwardOutput {
    /// Final-norm hidden states `[T, hidden]`.
    pub hidden: Vec<f32>,
    pub positions: MropePositions,
    /// Vision tower + merger output `[image tokens, hidden]`, in scatter order.
    pub vision_embeds: Vec<f32>,
}

/// A training sequence: the model input and where its response starts.
#[derive(Debug, Clone)]
pub struct TrainSequence {
    pub input: SequenceInput,
    pub prompt_len: usize,
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

/// The packed token ids and pixel rows of `inputs`.
pub fn packed_inputs(inputs: &[&SequenceInput]) -> (Vec<u32>, Vec<f32>) {
    let ids = inputs.iter().flat_map(|s| s.ids.iter().copied()).collect();
    let pixels = inputs
        .iter()
        .flat_map(|s| s.pixel_values.iter().copied())
        .collect();
    (ids, pixels)
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
