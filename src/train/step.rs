//! One RL step of the recipe on a batch of prompts: rollouts, rewards,
//! dynamic sampling, old and perturbed-image log-probs, GRPO advantages,
//! the VPPO objective (TAS + TGF + dual-clip loss), backward, AdamW.
//! `--algo dapo` is the same step without the perturbed pass; `grpo` also
//! drops dynamic sampling and uses a symmetric clip.

use super::optimizer::{AdamW, StepReport};
use crate::model::acts::Save;
use crate::model::params::Tensors;
use crate::model::{ModelError, SequenceInput, TrainSequence};
use crate::pipeline::{Pipeline, PipelineError};
use crate::reward::accuracy_reward;
use crate::rl::objective::{mean_dependency, micro_batch_objective, MicroBatch, VppoConfig};
use crate::rl::shaping::dependency_range;
use crate::rl::{blacken_patches, group_advantages, keep_group, PolicyLossConfig};
use crate::rollout::generate::{eos_ids, Generator};
use crate::rollout::sampling::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// DAPO + the visual-dependency pass (TAS and TGF).
    Vppo,
    /// The same recipe without the perturbed-image pass.
    Dapo,
    /// Symmetric clip, no dynamic sampling, no perturbed pass.
    Grpo,
}

#[derive(Debug, Clone)]
pub struct StepConfig {
    pub algo: Algo,
    /// Responses per prompt.
    pub n: usize,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Keep groups whose mean reward is strictly inside (low, high).
    pub dynamic_sampling: Option<(f32, f32)>,
    pub vppo: VppoConfig,
    pub loss: PolicyLossConfig,
    /// Probability of blackening each 14x14 tile in the perturbed pass.
    pub blacken_p: f64,
    /// Responses per forward/backward chunk (gradient accumulation).
    pub micro_batch: usize,
    /// Recompute activations in the backward (less memory).
    pub recompute: bool,
}

impl StepConfig {
    /// The published recipe's settings for `algo`.
    pub fn recipe(algo: Algo) -> Self {
        let mut loss = PolicyLossConfig::default();
        let mut dynamic_sampling = Some((0.01, 0.99));
        if algo == Algo::Grpo {
            loss.clip_high = 0.2;
            dynamic_sampling = None;
        }
        Self {
            algo,
            n: 8,
            sampling: SamplingParams::default(),
            max_new_tokens: 2048,
            dynamic_sampling,
            vppo: VppoConfig::default(),
            loss,
            blacken_p: 0.5,
            micro_batch: 8,
            recompute: false,
        }
    }
}

/// A training prompt: its model input and ground-truth answer.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input: SequenceInput,
    pub answer: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    pub responses: usize,
    pub mean_reward: f32,
    pub kept_groups: usize,
    pub dropped_groups: usize,
    pub mean_response_tokens: f32,
    pub loss: f64,
    pub clip_fraction: f32,
    /// `None` when no group survived (no update).
    pub optimizer: Option<StepReport>,
}

/// Runs one step; updates `pipeline.model.weights` through `optimizer`.
pub fn train_step(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<StepStats, PipelineError> {
    let mut stats = StepStats::default();
    // 1. Rollouts and rewards.
    let inputs: Vec<SequenceInput> = prompts.iter().map(|p| p.input.clone()).collect();
    let samples = {
        let mut generator = Generator::new(&pipeline.model, eos_ids(&pipeline.model.dir));
        generator.generate(&inputs, cfg.n, &cfg.sampling, cfg.max_new_tokens, seed)?
    };
    let mut rewards = Vec::with_capacity(samples.len());
    for s in &samples {
        let text = pipeline.text.decode(&s.token_ids, true)?;
        rewards.push(accuracy_reward(&text, &prompts[s.prompt_index].answer));
    }
    stats.responses = samples.len();
    stats.mean_reward = rewards.iter().sum::<f32>() / rewards.len().max(1) as f32;
    // 2. Dynamic sampling, then GRPO advantages of the kept groups.
    let mut batch = Vec::new();
    let mut advantages = Vec::new();
    for (g, group) in rewards.chunks(cfg.n).enumerate() {
        if cfg
            .dynamic_sampling
            .is_some_and(|(lo, hi)| !keep_group(group, lo, hi))
        {
            stats.dropped_groups += 1;
            continue;
        }
        stats.kept_groups += 1;
        advantages.extend(group_advantages(group, cfg.n));
        for s in &samples[g * cfg.n..(g + 1) * cfg.n] {
            let mut input = prompts[g].input.clone();
            input.ids.extend(&s.token_ids);
            batch.push(TrainSequence {
                input,
                prompt_len: prompts[g].input.ids.len(),
            });
        }
    }
    if batch.is_empty() {
        return Ok(stats);
    }
    let lens: Vec<usize> = batch
        .iter()
        .map(|s| s.input.ids.len() - s.prompt_len)
        .collect();
    let total_tokens: usize = lens.iter().sum();
    stats.mean_response_tokens = total_tokens as f32 / lens.len() as f32;
    let model = &pipeline.model;
    let chunks: Vec<std::ops::Range<usize>> = (0..batch.len())
        .step_by(cfg.micro_batch.max(1))
        .map(|a| a..(a + cfg.micro_batch.max(1)).min(batch.len()))
        .collect();
    // 3. Old log-probs (current weights, no gradient) and, for VPPO, the
    //    same tokens with a freshly blackened image per response.
    let logprobs_of = |seqs: &[TrainSequence]| -> Result<Vec<f32>, ModelError> {
        Ok(model.train_forward(seqs, Save::Nothing)?.logprobs)
    };
    let mut lp_old = Vec::with_capacity(total_tokens);
    for r in &chunks {
        lp_old.extend(logprobs_of(&batch[r.clone()])?);
    }
    let lp_perturbed = if cfg.algo == Algo::Vppo {
        let mut out = Vec::with_capacity(total_tokens);
        for r in &chunks {
            let perturbed: Vec<TrainSequence> = batch[r.clone()]
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let mut s = s.clone();
                    let mask_seed =
                        seed ^ ((r.start + k) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    blacken_patches(
                        &mut s.input.pixel_values,
                        &pipeline.images,
                        cfg.blacken_p,
                        mask_seed,
                    );
                    s
                })
                .collect();
            out.extend(logprobs_of(&perturbed)?);
        }
        Some(out)
    } else {
        None
    };
    let range = lp_perturbed.as_ref().and_then(|lp_mask| {
        let dep = crate::rl::visual_dependency(&lp_old, lp_mask);
        dependency_range(&mean_dependency(&dep, &lens))
    });
    // 4. Loss and gradients, micro-batch by micro-batch, then one AdamW step.
    let save = if cfg.recompute {
        Save::Inputs
    } else {
        Save::All
    };
    let mut grads = Tensors::zeros(&model.layout);
    let mut clipped = 0.0;
    for r in &chunks {
        let tok = lens[..r.start].iter().sum::<usize>()..lens[..r.end].iter().sum::<usize>();
        let fwd = model.train_forward(&batch[r.clone()], save)?;
        let mb = MicroBatch {
            lp_new: &fwd.logprobs,
            lp_old: &lp_old[tok.clone()],
            lp_perturbed: lp_perturbed.as_ref().map(|l| &l[tok.clone()]),
            response_lens: &lens[r.clone()],
            advantages: &advantages[r.clone()],
        };
        let objective = micro_batch_objective(&mb, &cfg.vppo, &cfg.loss, range, total_tokens)
            .map_err(ModelError::from)?;
        stats.loss += objective.loss;
        clipped += objective.clip_fraction * tok.len() as f32;
        let zeros = vec![0.0; fwd.logprobs.len()];
        model.train_backward(&fwd, &objective.token_grads, &zeros, &mut grads)?;
    }
    stats.clip_fraction = clipped / total_tokens as f32;
    stats.optimizer = Some(optimizer.step(&mut pipeline.model.weights, &mut grads));
    Ok(stats)
}
