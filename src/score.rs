//! `vppo-engine score`: the log-probability of a response given a prompt
//! with images, under a checkpoint: the engine's "old log-probs".

use crate::model::acts::Save;
use crate::model::engine::Engine;
use crate::model::params::Tensors;
use crate::model::TrainSequence;
use crate::ops::cpu::CpuBackend;
use crate::ops::Backend;
use crate::pipeline::{Pipeline, PipelineError};
use crate::safetensors_io::{write_atomic, OwnedTensor, WriteError};
use std::path::{Path, PathBuf};

/// What `score` computes for one (prompt, images, response).
pub struct Scored {
    /// Prompt + response ids.
    pub input_ids: Vec<u32>,
    pub prompt_len: usize,
    /// `log p(response_i | everything before it)`.
    pub response_logprobs: Vec<f32>,
    /// `[R, vocab]` logits at the positions that predict each response token.
    pub response_logits: Vec<f32>,
    pub vocab: usize,
}

impl Pipeline {
    /// [`Pipeline::score_on`] on the CPU.
    pub fn score(
        &self,
        images: &[PathBuf],
        prompt: &str,
        response: &str,
    ) -> Result<Scored, PipelineError> {
        let engine = Engine::new(CpuBackend, &self.model)?;
        self.score_on(&engine, images, prompt, response)
    }

    /// Scores `response` with the model forward, lm_head and log-probs on
    /// `engine`'s backend.
    pub fn score_on<B: Backend>(
        &self,
        engine: &Engine<B>,
        images: &[PathBuf],
        prompt: &str,
        response: &str,
    ) -> Result<Scored, PipelineError> {
        let (input, prompt_len) = self.prepare(images, prompt, response)?;
        let seq = TrainSequence { input, prompt_len };
        let (response_logprobs, response_logits) = engine.response_logits(&seq)?;
        Ok(Scored {
            input_ids: seq.input.ids,
            prompt_len,
            response_logprobs,
            response_logits,
            vocab: self.model.config.text.vocab_size,
        })
    }
}

impl Pipeline {
    /// The gradient of `sum(response_logprobs)` w.r.t. every parameter (f32),
    /// activations recomputed layer by layer to bound memory.
    pub fn logprob_sum_grad(
        &self,
        images: &[PathBuf],
        prompt: &str,
        response: &str,
    ) -> Result<Tensors, PipelineError> {
        let (input, prompt_len) = self.prepare(images, prompt, response)?;
        let batch = [TrainSequence { input, prompt_len }];
        let fwd = self.model.train_forward(&batch, Save::Inputs)?;
        let n = fwd.logprobs.len();
        let mut grads = Tensors::zeros(&self.model.layout);
        self.model
            .train_backward(&fwd, &vec![1.0; n], &vec![0.0; n], &mut grads)?;
        Ok(grads)
    }

    /// Writes gradients under the checkpoint's own tensor names and shapes
    /// (for a tied head the embedding carries both contributions).
    pub fn save_grads(&self, grads: &Tensors, path: &Path) -> Result<(), WriteError> {
        let tensors: Vec<OwnedTensor> = self
            .model
            .layout
            .specs
            .iter()
            .zip(&grads.0)
            .map(|(spec, g)| {
                OwnedTensor::f32(&self.model.names.file_name(&spec.name), &spec.shape, g)
            })
            .collect();
        write_atomic(path, &tensors)
    }
}

impl Scored {
    /// Writes `input_ids` (i64 [T]), `response_logprobs` (f32 [R]) and
    /// `response_logits` (f32 [R, V]) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), WriteError> {
        let ids: Vec<i64> = self.input_ids.iter().map(|&v| v as i64).collect();
        let r = self.response_logprobs.len();
        write_atomic(
            path,
            &[
                OwnedTensor::i64("input_ids", &[ids.len()], &ids),
                OwnedTensor::f32("response_logprobs", &[r], &self.response_logprobs),
                OwnedTensor::f32("response_logits", &[r, self.vocab], &self.response_logits),
            ],
        )
    }
}
