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

/// A rollout batch ready for updates: the kept groups' sequences with their
/// advantages and the log-probs taken before any update (old, and with the
/// blackened image for VPPO).
pub struct Rollouts {
    pub batch: Vec<TrainSequence>,
    /// One advantage per response.
    pub advantages: Vec<f32>,
    /// Response tokens per response.
    pub lens: Vec<usize>,
    pub lp_old: Vec<f32>,
    pub lp_perturbed: Option<Vec<f32>>,
    /// Responses per group.
    pub group_size: usize,
    pub stats: StepStats,
}

impl Rollouts {
    pub fn groups(&self) -> usize {
        self.batch.len() / self.group_size.max(1)
    }
}

/// Chunks of at most `size` consecutive items of `range`.
fn chunks(range: std::ops::Range<usize>, size: usize) -> Vec<std::ops::Range<usize>> {
    range
        .clone()
        .step_by(size.max(1))
        .map(|a| a..(a + size.max(1)).min(range.end))
        .collect()
}

/// Rollouts, rewards, dynamic sampling, GRPO advantages, then the old and
/// (VPPO) perturbed log-probs of every kept response with the current weights.
pub fn collect_rollouts(
    pipeline: &Pipeline,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<Rollouts, PipelineError> {
    let mut stats = StepStats::default();
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
    let lens: Vec<usize> = batch
        .iter()
        .map(|s| s.input.ids.len() - s.prompt_len)
        .collect();
    if !lens.is_empty() {
        stats.mean_response_tokens = lens.iter().sum::<usize>() as f32 / lens.len() as f32;
    }
    let model = &pipeline.model;
    let logprobs_of = |seqs: &[TrainSequence]| -> Result<Vec<f32>, ModelError> {
        Ok(model.train_forward(seqs, Save::Nothing)?.logprobs)
    };
    let mut lp_old = Vec::new();
    for r in chunks(0..batch.len(), cfg.micro_batch) {
        lp_old.extend(logprobs_of(&batch[r])?);
    }
    let lp_perturbed = if cfg.algo == Algo::Vppo {
        let mut out = Vec::new();
        for r in chunks(0..batch.len(), cfg.micro_batch) {
            let perturbed: Vec<TrainSequence> = r
                .clone()
                .map(|i| {
                    let mut s = batch[i].clone();
                    let mask_seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
    Ok(Rollouts {
        batch,
        advantages,
        lens,
        lp_old,
        lp_perturbed,
        group_size: cfg.n,
        stats,
    })
}

/// One optimizer step on the groups `groups` of a rollout batch (an update
/// mini-batch): TAS's dependency range and the loss's token count are over
/// this mini-batch; gradients accumulate micro-batch by micro-batch.
pub fn update(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<(f64, f32, StepReport), PipelineError> {
    let n = rollouts.group_size;
    let responses = groups.start * n..groups.end * n;
    let offset = |i: usize| rollouts.lens[..i].iter().sum::<usize>();
    let tokens = offset(responses.start)..offset(responses.end);
    let total_tokens = tokens.len();
    let range = rollouts.lp_perturbed.as_ref().and_then(|lp_mask| {
        let dep = crate::rl::visual_dependency(
            &rollouts.lp_old[tokens.clone()],
            &lp_mask[tokens.clone()],
        );
        dependency_range(&mean_dependency(&dep, &rollouts.lens[responses.clone()]))
    });
    let model = &pipeline.model;
    let save = if cfg.recompute {
        Save::Inputs
    } else {
        Save::All
    };
    let mut grads = Tensors::zeros(&model.layout);
    let (mut loss, mut clipped) = (0.0, 0.0);
    for r in chunks(responses, cfg.micro_batch) {
        let tok = offset(r.start)..offset(r.end);
        let fwd = model.train_forward(&rollouts.batch[r.clone()], save)?;
        let mb = MicroBatch {
            lp_new: &fwd.logprobs,
            lp_old: &rollouts.lp_old[tok.clone()],
            lp_perturbed: rollouts.lp_perturbed.as_ref().map(|l| &l[tok.clone()]),
            response_lens: &rollouts.lens[r.clone()],
            advantages: &rollouts.advantages[r.clone()],
        };
        let objective = micro_batch_objective(&mb, &cfg.vppo, &cfg.loss, range, total_tokens)
            .map_err(ModelError::from)?;
        loss += objective.loss;
        clipped += objective.clip_fraction * tok.len() as f32;
        let zeros = vec![0.0; fwd.logprobs.len()];
        model.train_backward(&fwd, &objective.token_grads, &zeros, &mut grads)?;
    }
    let report = optimizer.step(&mut pipeline.model.weights, &mut grads);
    Ok((loss, clipped / total_tokens.max(1) as f32, report))
}

/// Rollouts and one update over every kept group: the whole rollout batch
/// as a single mini-batch.
pub fn train_step(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<StepStats, PipelineError> {
    let rollouts = collect_rollouts(pipeline, prompts, cfg, seed)?;
    let mut stats = rollouts.stats.clone();
    if rollouts.groups() > 0 {
        let (loss, clip_fraction, report) =
            update(pipeline, optimizer, &rollouts, 0..rollouts.groups(), cfg)?;
        stats.loss = loss;
        stats.clip_fraction = clip_fraction;
        stats.optimizer = Some(report);
    }
    Ok(stats)
}
