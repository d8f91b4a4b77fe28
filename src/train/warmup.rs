//! Supervised warm-up: a few steps of next-token cross-entropy on the
//! reference responses (`\boxed{answer}` then end of turn), so RL starts
//! from a policy that sometimes answers correctly instead of a zero reward.

use super::optimizer::{AdamW, StepReport};
use super::step::Prompt;
use crate::model::acts::Save;
use crate::model::params::Tensors;
use crate::model::TrainSequence;
use crate::pipeline::{Pipeline, PipelineError};

/// The response the warm-up teaches for `answer`.
pub fn reference_response(answer: &str) -> String {
    format!("\\boxed{{{answer}}}")
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupStats {
    /// Mean token cross-entropy before the step.
    pub loss: f64,
    /// Mean probability of the reference tokens.
    pub token_prob: f64,
    pub optimizer: StepReport,
}

/// One cross-entropy step on `prompts` with their reference responses.
pub fn warmup_step(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    prompts: &[Prompt],
    end_of_turn: u32,
    micro_batch: usize,
) -> Result<WarmupStats, PipelineError> {
    let mut batch = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut input = p.input.clone();
        let prompt_len = input.ids.len();
        input.ids.extend(
            pipeline
                .text
                .encode(&reference_response(&p.answer), false)?,
        );
        input.ids.push(end_of_turn);
        batch.push(TrainSequence { input, prompt_len });
    }
    let total: usize = batch.iter().map(|s| s.input.ids.len() - s.prompt_len).sum();
    let model = &pipeline.model;
    let mut grads = Tensors::zeros(&model.layout);
    let (mut loss, mut prob) = (0.0f64, 0.0f64);
    for chunk in batch.chunks(micro_batch.max(1)) {
        let fwd = model.train_forward(chunk, Save::All)?;
        loss -= fwd.logprobs.iter().map(|&l| l as f64).sum::<f64>();
        prob += fwd.logprobs.iter().map(|&l| (l as f64).exp()).sum::<f64>();
        let d_logprob = vec![-1.0 / total as f32; fwd.logprobs.len()];
        let zeros = vec![0.0; fwd.logprobs.len()];
        model.train_backward(&fwd, &d_logprob, &zeros, &mut grads)?;
    }
    let report = optimizer.step(&mut pipeline.model.weights, &mut grads);
    Ok(WarmupStats {
        loss: loss / total as f64,
        token_prob: prob / total as f64,
        optimizer: report,
    })
}
