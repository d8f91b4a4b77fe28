//! One RL step of the recipe on a batch of prompts: rollouts, rewards,
//! dynamic sampling, old and perturbed-image log-probs, GRPO advantages,
//! the VPPO objective (TAS + TGF + dual-clip loss), backward, AdamW.
//! `--algo dapo` is the same step without the perturbed pass; `grpo` also
//! drops dynamic sampling and uses a symmetric clip.

use super::optimizer::{AdamW, Policy, StepReport};
use crate::model::acts::Save;
use crate::model::engine::{Engine, Logprobs, PatchProcessor};
use crate::model::graph::GatherWeights;
use crate::model::params::Tensors;
use crate::model::{ModelError, Qwen25Vl, SequenceInput, TrainSequence};
use crate::ops::cpu::CpuBackend;
use crate::ops::Backend;
use crate::pipeline::{Pipeline, PipelineError};
use crate::processor::image::normalize_lut;
use crate::reward::accuracy_reward;
use crate::rl::balance::balanced_partitions;
use crate::rl::objective::{mean_dependency, Shaping, VppoConfig};
use crate::rl::shaping::dependency_range;
use crate::rl::{
    group_advantages, keep_group, perturb_images, perturb_loaded_images, visual_dependency,
    DependencyEstimator, KlEstimator, PerturbSpace, Perturbation, PolicyLossConfig,
};
use crate::rollout::generate::{eos_ids, Generator, RolloutLimits};
use crate::rollout::sampling::SamplingParams;

/// What a step reports instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The custom reward program failed or answered wrongly.
    #[error("reward_command: {0}")]
    Reward(String),
    #[error("the KL loss is on, but the rollouts carry no reference log-probs")]
    NoReference,
    /// A data-parallel rank failed, hung or disagreed.
    #[error(transparent)]
    Dist(#[from] crate::distributed::DistError),
}

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
    /// Probability of perturbing each 14x14 tile in the perturbed pass.
    pub blacken_p: f64,
    /// What a perturbed tile becomes (black by default).
    pub perturbation: Perturbation,
    /// Tiles on the ViT's patches (fused on the GPU) or, as the reference,
    /// on the image before the processor's resize (host path).
    pub perturb_space: PerturbSpace,
    /// k3 from the sampled tokens' log-probs, or the exact KL.
    pub dependency: DependencyEstimator,
    /// Responses per forward/backward chunk (gradient accumulation); also
    /// the responses TAS's mean is taken over.
    pub micro_batch: usize,
    /// Parts a rollout batch is balanced into before the updates (the
    /// reference's data-parallel ranks): each part has its own TAS range.
    pub tas_partitions: usize,
    /// The most tokens (prompt + response, summed over the responses) one
    /// packed forward/backward may hold (verl's `ppo_max_token_len_per_gpu`):
    /// a micro-batch's responses run as few packed batches under it, in
    /// order (a longer response runs alone). The update's shaping (TAS, the
    /// loss's token count) is the micro-batch's whatever the packing; the
    /// dual pass counts both the original and its perturbed twin.
    pub max_tokens_per_micro_batch: usize,
    /// Recompute activations in the backward (less memory).
    pub recompute: bool,
    /// Continuous batching and KV-cache limits of the rollouts.
    pub rollout: RolloutLimits,
    /// The KL-to-reference loss term: its estimator and coefficient
    /// (`None`: off, as in the VPPO recipe). Needs reference log-probs in
    /// the rollouts.
    pub kl: Option<(KlEstimator, f64)>,
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
            perturbation: Perturbation::Black,
            perturb_space: PerturbSpace::Patches,
            dependency: DependencyEstimator::K3,
            micro_batch: 16,
            tas_partitions: 8,
            max_tokens_per_micro_batch: DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
            recompute: false,
            rollout: RolloutLimits::default(),
            kl: None,
        }
    }
}

/// A training prompt: its model input and ground-truth answer.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input: SequenceInput,
    pub answer: String,
    /// The problem text as the data has it (what a custom reward sees).
    pub problem: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    pub responses: usize,
    pub mean_reward: f32,
    /// Fraction of responses with the full reward (a correct answer).
    pub accuracy: f32,
    pub kept_groups: usize,
    pub dropped_groups: usize,
    /// Over every generated response, kept or not.
    pub mean_response_tokens: f32,
    pub loss: f64,
    pub clip_fraction: f32,
    /// `None` when no group survived (no update).
    pub optimizer: Option<StepReport>,
    /// Extra metrics of a custom reward (means over the responses).
    pub reward_extra: Vec<(String, f64)>,
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
    /// Each response's index in its generation batch (`prompt * n +
    /// sample`): which prompt it answers.
    pub sample_ids: Vec<usize>,
    pub lp_old: Vec<f32>,
    /// Token visual dependency (VPPO only), from the original and the
    /// perturbed-image pass with the rollout weights.
    pub dependency: Option<Vec<f32>>,
    /// The response tokens' log-probs under the frozen reference model
    /// (only with the KL loss).
    pub lp_ref: Option<Vec<f32>>,
    /// Responses per group.
    pub group_size: usize,
    pub stats: StepStats,
}

impl Rollouts {
    pub fn groups(&self) -> usize {
        self.batch.len() / self.group_size.max(1)
    }

    /// Adds the kept groups of another generation batch (dynamic sampling's
    /// refill); both must come from the same weights.
    pub fn append(&mut self, other: Rollouts) {
        let (a, b) = (self.stats.clone(), other.stats.clone());
        let responses = a.responses + b.responses;
        let weighted = |x: f32, y: f32| {
            (x * a.responses as f32 + y * b.responses as f32) / responses.max(1) as f32
        };
        self.batch.extend(other.batch);
        self.advantages.extend(other.advantages);
        self.lens.extend(other.lens);
        self.sample_ids.extend(other.sample_ids);
        self.lp_old.extend(other.lp_old);
        if let (Some(mine), Some(theirs)) = (&mut self.dependency, other.dependency) {
            mine.extend(theirs);
        }
        if let (Some(mine), Some(theirs)) = (&mut self.lp_ref, other.lp_ref) {
            mine.extend(theirs);
        }
        self.stats.responses = responses;
        self.stats.mean_reward = weighted(a.mean_reward, b.mean_reward);
        self.stats.accuracy = weighted(a.accuracy, b.accuracy);
        self.stats.kept_groups += other.stats.kept_groups;
        self.stats.dropped_groups += other.stats.dropped_groups;
        self.stats.mean_response_tokens = weighted(a.mean_response_tokens, b.mean_response_tokens);
    }

    /// Puts response `order[i]` at position i (every per-response and
    /// per-token array alike). Groups no longer sit together afterwards:
    /// only the updates' layout reads the batch after this.
    pub fn reorder(&mut self, order: &[usize]) {
        let mut starts = Vec::with_capacity(self.lens.len());
        let mut at = 0;
        for &l in &self.lens {
            starts.push(at);
            at += l;
        }
        let lens = &self.lens;
        self.lp_old = gather_tokens(&self.lp_old, order, &starts, lens);
        self.dependency = self
            .dependency
            .as_deref()
            .map(|v| gather_tokens(v, order, &starts, lens));
        self.lp_ref = self
            .lp_ref
            .as_deref()
            .map(|v| gather_tokens(v, order, &starts, lens));
        self.batch = order.iter().map(|&i| self.batch[i].clone()).collect();
        self.advantages = order.iter().map(|&i| self.advantages[i]).collect();
        self.lens = order.iter().map(|&i| self.lens[i]).collect();
        self.sample_ids = order.iter().map(|&i| self.sample_ids[i]).collect();
    }

    /// Keeps the first `groups` groups (a full batch after refilling).
    pub fn truncate_groups(&mut self, groups: usize) {
        let keep = groups * self.group_size;
        if keep >= self.batch.len() {
            return;
        }
        let tokens: usize = self.lens[..keep].iter().sum();
        self.batch.truncate(keep);
        self.advantages.truncate(keep);
        self.lens.truncate(keep);
        self.sample_ids.truncate(keep);
        self.lp_old.truncate(tokens);
        if let Some(dep) = &mut self.dependency {
            dep.truncate(tokens);
        }
        if let Some(r) = &mut self.lp_ref {
            r.truncate(tokens);
        }
    }
}

/// The token spans `starts[i]..starts[i] + lens[i]` of `v`, for `i` in
/// `order`, one after another.
fn gather_tokens(v: &[f32], order: &[usize], starts: &[usize], lens: &[usize]) -> Vec<f32> {
    order
        .iter()
        .flat_map(|&i| v[starts[i]..starts[i] + lens[i]].iter().copied())
        .collect()
}

fn mean_len(lens: &[usize]) -> f32 {
    lens.iter().sum::<usize>() as f32 / lens.len().max(1) as f32
}

/// verl's default `ppo_max_token_len_per_gpu`.
pub const DEFAULT_MAX_TOKENS_PER_MICRO_BATCH: usize = 16_384;

/// `range` (indices into `batch`) cut into consecutive packs of at most
/// `budget` tokens (`copies` forwards of each sequence counted), each at
/// least one sequence: the packed batches of one micro-batch.
pub fn token_packs(
    batch: &[TrainSequence],
    range: std::ops::Range<usize>,
    budget: usize,
    copies: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut packs = Vec::new();
    let (mut start, mut tokens) = (range.start, 0usize);
    for i in range.clone() {
        let t = batch[i].input.ids.len() * copies;
        if i > start && tokens + t > budget {
            packs.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += t;
    }
    if start < range.end {
        packs.push(start..range.end);
    }
    packs
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
/// (VPPO) perturbed log-probs of every kept response with the current
/// weights, on the CPU.
pub fn collect_rollouts(
    pipeline: &Pipeline,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<Rollouts, StepError> {
    let engine = Engine::new(CpuBackend, &pipeline.model)?;
    collect_rollouts_on(pipeline, &engine, prompts, cfg, seed)
}

/// [`collect_rollouts`] with generation and the old / perturbed log-probs
/// on `engine` (its weights must equal the pipeline model's).
pub fn collect_rollouts_on<B: Backend>(
    pipeline: &Pipeline,
    engine: &Engine<B>,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<Rollouts, StepError> {
    collect_rollouts_with(
        pipeline,
        engine,
        None,
        prompts,
        0,
        cfg,
        seed,
        &AccuracyReward,
    )
}

/// The rewards of a batch of responses, in order, and a custom reward's
/// extra named metrics (means over the responses).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scored {
    pub rewards: Vec<f32>,
    pub extra: Vec<(String, f64)>,
}

/// How responses are scored: the recipe's accuracy reward, or an external
/// program (`reward_command`). Extra per-response metrics are averaged and
/// logged.
pub trait RewardFn {
    /// One reward per response, in order, and extra named metrics (means
    /// over the responses).
    fn score(&self, prompts: &[Prompt], responses: &[(usize, String)])
        -> Result<Scored, StepError>;
}

/// The VPPO accuracy reward (the default).
pub struct AccuracyReward;

impl RewardFn for AccuracyReward {
    fn score(
        &self,
        prompts: &[Prompt],
        responses: &[(usize, String)],
    ) -> Result<Scored, StepError> {
        Ok(Scored {
            rewards: responses
                .iter()
                .map(|(p, text)| accuracy_reward(text, &prompts[*p].answer))
                .collect(),
            extra: Vec::new(),
        })
    }
}

/// [`collect_rollouts_on`] with a reward function and, for the KL loss,
/// the frozen `reference` model whose log-probs of every kept response are
/// taken here (rollout phase). `prompts` start at index `first_prompt` of
/// the generation batch (a data-parallel rank's share): a sample's tokens
/// and its perturbation mask depend on its global (prompt, sample) only.
#[allow(clippy::too_many_arguments)]
pub fn collect_rollouts_with<B: Backend>(
    pipeline: &Pipeline,
    engine: &Engine<B>,
    reference: Option<&Engine<B>>,
    prompts: &[Prompt],
    first_prompt: usize,
    cfg: &StepConfig,
    seed: u64,
    reward: &dyn RewardFn,
) -> Result<Rollouts, StepError> {
    let mut stats = StepStats::default();
    let inputs: Vec<SequenceInput> = prompts.iter().map(|p| p.input.clone()).collect();
    let samples = {
        let _nvtx = crate::nvtx::range("rollout");
        let eos = eos_ids(&pipeline.model.dir);
        let mut generator = Generator::new(engine, eos).with_limits(cfg.rollout);
        generator.first_prompt = first_prompt;
        generator.generate(&inputs, cfg.n, &cfg.sampling, cfg.max_new_tokens, seed)?
    };
    let mut texts = Vec::with_capacity(samples.len());
    for s in &samples {
        let text = pipeline
            .text
            .decode(&s.token_ids, true)
            .map_err(PipelineError::from)?;
        texts.push((s.prompt_index, text));
    }
    let Scored { rewards, extra } = reward.score(prompts, &texts)?;
    stats.reward_extra = extra;
    stats.responses = samples.len();
    stats.mean_reward = rewards.iter().sum::<f32>() / rewards.len().max(1) as f32;
    stats.accuracy =
        rewards.iter().filter(|&&r| r >= 1.0).count() as f32 / rewards.len().max(1) as f32;
    let mut batch = Vec::new();
    let mut advantages = Vec::new();
    // Each kept response's index in the whole generation batch.
    let mut sample_ids = Vec::new();
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
        sample_ids.extend((0..cfg.n).map(|i| (first_prompt + g) * cfg.n + i));
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
    let generated: Vec<usize> = samples.iter().map(|s| s.token_ids.len()).collect();
    stats.mean_response_tokens = mean_len(&generated);
    let (lp_old, dependency) = old_logprobs(pipeline, engine, &batch, &sample_ids, cfg, seed)?;
    let lp_ref = match (reference, cfg.kl) {
        (Some(reference), Some(_)) => {
            let _nvtx = crate::nvtx::range("reference_logprobs");
            let mut lp = Vec::with_capacity(lp_old.len());
            for r in chunks(0..batch.len(), cfg.micro_batch) {
                for pack in token_packs(&batch, r, cfg.max_tokens_per_micro_batch, 1) {
                    lp.extend(reference.logprobs(&batch[pack])?.logprobs);
                }
            }
            Some(lp)
        }
        _ => None,
    };
    Ok(Rollouts {
        batch,
        advantages,
        lens,
        sample_ids,
        lp_old,
        dependency,
        lp_ref,
        group_size: cfg.n,
        stats,
    })
}

/// The old log-probs of every response of `batch`, and (VPPO) each token's
/// visual dependency from a pass with perturbed images, with the weights
/// that generated the responses. `sample_ids[i]` names response i in its
/// generation batch: its perturbation mask's seed.
fn old_logprobs<B: Backend>(
    pipeline: &Pipeline,
    engine: &Engine<B>,
    batch: &[TrainSequence],
    sample_ids: &[usize],
    cfg: &StepConfig,
    seed: u64,
) -> Result<(Vec<f32>, Option<Vec<f32>>), StepError> {
    let vppo = cfg.algo == Algo::Vppo;
    let _nvtx = crate::nvtx::range(if vppo {
        "old_and_perturbed_logprobs"
    } else {
        "old_logprobs"
    });
    let exact = cfg.dependency == DependencyEstimator::ExactKl;
    // A fresh mask per response.
    let mask_seed = |i: usize| seed ^ (sample_ids[i] as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let dependency_of = |a: &Logprobs, b: &Logprobs, kl: Option<Vec<f32>>| {
        kl.unwrap_or_else(|| visual_dependency(&a.logprobs, &b.logprobs))
    };
    let (mut lp_old, mut dependency) = (Vec::new(), vppo.then(Vec::new));
    // Black tiles on images with their resized bytes: the fused dual pass
    // (original + masked twin in one forward, the twin's pixels made by the
    // patch-embed op). Otherwise packed micro-batches, the perturbed copies
    // made on the host.
    let fused = vppo
        && cfg.perturbation == Perturbation::Black
        && cfg.perturb_space == PerturbSpace::Patches
        && batch
            .iter()
            .all(|s| s.input.resized.len() == s.input.grids.len());
    if let (true, Some(dependency)) = (fused, dependency.as_mut()) {
        let images = PatchProcessor {
            geometry: pipeline.images.geometry(),
            lut: normalize_lut(&pipeline.images),
        };
        for r in chunks(0..batch.len(), cfg.micro_batch) {
            for pack in token_packs(batch, r, cfg.max_tokens_per_micro_batch, 2) {
                let seeds: Vec<u64> = pack.clone().map(mask_seed).collect();
                let (a, b, kl) =
                    engine.dual_logprobs(&batch[pack], &images, &seeds, cfg.blacken_p, exact)?;
                dependency.extend(dependency_of(&a, &b, kl));
                lp_old.extend(a.logprobs);
            }
        }
        return Ok((lp_old, Some(std::mem::take(dependency))));
    }
    let perturbed = |i: usize| {
        let mut s = batch[i].clone();
        let input = &s.input;
        if cfg.perturb_space == PerturbSpace::Pixels && input.loaded.len() == input.grids.len() {
            s.input.pixel_values = perturb_loaded_images(
                &input.loaded,
                &input.resized,
                &pipeline.images,
                cfg.perturbation,
                cfg.blacken_p,
                mask_seed(i),
            );
            return s;
        }
        perturb_images(
            &mut s.input.pixel_values,
            &s.input.grids,
            &pipeline.images,
            cfg.perturbation,
            cfg.blacken_p,
            mask_seed(i),
        );
        s
    };
    let packs = chunks(0..batch.len(), cfg.micro_batch)
        .into_iter()
        .flat_map(|r| token_packs(batch, r, cfg.max_tokens_per_micro_batch, 1));
    for r in packs {
        let original = &batch[r.clone()];
        match &mut dependency {
            Some(dependency) => {
                let masked: Vec<TrainSequence> = r.clone().map(perturbed).collect();
                let (a, b, kl) = engine.logprobs_pair(original, &masked, exact)?;
                dependency.extend(dependency_of(&a, &b, kl));
                lp_old.extend(a.logprobs);
            }
            None => lp_old.extend(engine.logprobs(original)?.logprobs),
        }
    }
    Ok((lp_old, dependency))
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateStats {
    pub loss: f64,
    pub clip_fraction: f32,
    /// Mean negative log-prob of the mini-batch's response tokens under the
    /// policy being updated.
    pub entropy: f64,
    /// Mean token visual dependency (`None` without the perturbed pass).
    pub visual_dependency_mean: Option<f64>,
    /// Mean KL-to-reference estimate per token (`None` without the KL loss).
    pub kl_mean: Option<f64>,
    /// Fraction of response tokens TGF kept.
    pub tgf_kept_frac: f32,
    pub adv_scale_min: f32,
    pub adv_scale_max: f32,
    /// Response tokens in the mini-batch.
    pub response_tokens: usize,
    /// All tokens (prompt + response) in the mini-batch.
    pub tokens: usize,
    pub optimizer: StepReport,
}

/// One optimizer step on the groups `groups` of a rollout batch (an update
/// mini-batch), on the CPU: the pipeline model's weights are updated.
pub fn update(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let mut policy = Policy::new(Engine::new(CpuBackend, &pipeline.model)?);
    let host = &mut pipeline.model.weights;
    let stats = update_on(&mut policy, host, optimizer, rollouts, groups, cfg)?;
    policy.sync_to_host(host, optimizer)?;
    Ok(stats)
}

/// [`update`] on the policy's backend: the forward, backward and AdamW
/// step run there (see [`Policy::optimizer_step`]; `host` are the host's
/// weights, which the bf16 path updates and uploads).
pub fn update_on<B: Backend>(
    policy: &mut Policy<B>,
    host: &mut Tensors,
    optimizer: &mut AdamW,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let n = rollouts.group_size;
    let responses = groups.start * n..groups.end * n;
    update_parts_on(
        policy,
        host,
        optimizer,
        rollouts,
        std::slice::from_ref(&responses),
        cfg,
    )
}

/// [`update_on`] for one step of an [`update_plan`]: the union of the
/// parts' mini-batches (response ranges).
pub fn update_parts_on<B: Backend>(
    policy: &mut Policy<B>,
    host: &mut Tensors,
    optimizer: &mut AdamW,
    rollouts: &Rollouts,
    parts: &[std::ops::Range<usize>],
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let _nvtx = crate::nvtx::range("update");
    let mut stats = accumulate_parts(&mut policy.engine, rollouts, parts, cfg)?;
    if skip_non_finite_loss(&mut policy.engine, &mut stats)? {
        return Ok(stats);
    }
    stats.optimizer = policy.optimizer_step(optimizer, host)?;
    Ok(stats)
}

/// A non-finite loss poisons the gradients: the step is skipped (the
/// gradients zeroed, the report marked), as a non-finite gradient norm
/// skips it. True when it was.
pub fn skip_non_finite_loss<B: Backend>(
    engine: &mut Engine<B>,
    stats: &mut UpdateStats,
) -> Result<bool, StepError> {
    if stats.loss.is_finite() {
        return Ok(false);
    }
    engine.zero_grads()?;
    stats.optimizer = StepReport {
        grad_norm: f64::NAN,
        skipped: true,
    };
    Ok(true)
}

/// The reference's update layout over a full rollout batch: the responses
/// are balanced by sequence length into `cfg.tas_partitions` parts (its
/// greatest common divisor with a step's responses) of equal count (the batch is reordered part after part), each part is cut
/// into mini-batches of `mini_groups * n / parts` responses, and step i
/// trains on every part's i-th mini-batch. One part keeps the batch's
/// order: mini-batches of `mini_groups` consecutive groups.
pub fn update_plan(
    rollouts: &mut Rollouts,
    mini_groups: usize,
    cfg: &StepConfig,
) -> Vec<Vec<std::ops::Range<usize>>> {
    let total = rollouts.batch.len();
    let per_step = mini_groups * rollouts.group_size;
    // Every step takes the same count from every part (small settings
    // would otherwise leave parts empty and change the number of steps).
    let parts = gcd(cfg.tas_partitions.max(1), per_step.max(1));
    if parts == 1 {
        return chunks(0..total, per_step)
            .into_iter()
            .map(|r| vec![r])
            .collect();
    }
    let seqlens: Vec<usize> = rollouts.batch.iter().map(|s| s.input.ids.len()).collect();
    let partition = balanced_partitions(&seqlens, parts);
    rollouts.reorder(&partition.concat());
    let per_part = per_step / parts;
    let mut ranges = Vec::with_capacity(parts);
    let mut start = 0;
    for p in &partition {
        ranges.push(chunks(start..start + p.len(), per_part));
        start += p.len();
    }
    let steps = ranges.iter().map(Vec::len).max().unwrap_or(0);
    (0..steps)
        .map(|i| ranges.iter().filter_map(|r| r.get(i).cloned()).collect())
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The loss and parameter gradients of an update mini-batch (the groups
/// `groups` of a rollout batch) on the CPU: TAS's dependency range and the
/// loss's token count are over this mini-batch; gradients accumulate
/// micro-batch by micro-batch. `optimizer` in the stats is left empty.
pub fn mini_batch_gradients(
    model: &Qwen25Vl,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<(Tensors, UpdateStats), StepError> {
    let mut engine = Engine::new(CpuBackend, model)?;
    mini_batch_gradients_on(&mut engine, rollouts, groups, cfg)
}

/// [`mini_batch_gradients`] on `engine`'s backend, the gradients brought
/// back to the host.
pub fn mini_batch_gradients_on<B: Backend>(
    engine: &mut Engine<B>,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<(Tensors, UpdateStats), StepError> {
    let stats = accumulate(engine, rollouts, groups, cfg)?;
    let mut grads = Tensors::zeros(&engine.layout);
    engine.take_grads(&mut grads)?;
    Ok((grads, stats))
}

/// A micro-batch's responses and its part's TAS range.
pub type MicroBatch = (std::ops::Range<usize>, Option<(f32, f32)>);

/// The micro-batches of an optimizer step's parts (response ranges), each
/// with its part's TAS range: the min and max of the responses' mean
/// dependency over that part's mini-batch (`None` without dependencies).
pub fn micro_batches(
    rollouts: &Rollouts,
    parts: &[std::ops::Range<usize>],
    micro_batch: usize,
) -> Vec<MicroBatch> {
    let offset = |i: usize| rollouts.lens[..i].iter().sum::<usize>();
    parts
        .iter()
        .flat_map(|part| {
            let tokens = offset(part.start)..offset(part.end);
            let range = rollouts.dependency.as_ref().and_then(|dep| {
                dependency_range(&mean_dependency(&dep[tokens], &rollouts.lens[part.clone()]))
            });
            chunks(part.clone(), micro_batch)
                .into_iter()
                .map(move |r| (r, range))
        })
        .collect()
}

/// The micro-batch loop: each micro-batch's shaping (TAS over it, TGF) is
/// fixed first, then its responses go through one packed forward, the
/// objective gives each token's gradient, and the backward accumulates
/// into the engine's gradients.
fn accumulate<B: Backend>(
    engine: &mut Engine<B>,
    rollouts: &Rollouts,
    groups: std::ops::Range<usize>,
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let n = rollouts.group_size;
    let responses = groups.start * n..groups.end * n;
    accumulate_parts(engine, rollouts, std::slice::from_ref(&responses), cfg)
}

/// [`accumulate`] over an optimizer step made of several parts' mini-batches
/// (`parts`: response ranges): TAS's range is each part's own, its mean
/// each micro-batch's within that part; the loss's token count is the
/// whole step's.
fn accumulate_parts<B: Backend>(
    engine: &mut Engine<B>,
    rollouts: &Rollouts,
    parts: &[std::ops::Range<usize>],
    cfg: &StepConfig,
) -> Result<UpdateStats, StepError> {
    let micro = micro_batches(rollouts, parts, cfg.micro_batch);
    let total = step_tokens(rollouts, parts);
    let sums = accumulate_micro_batches(engine, rollouts, &micro, total, cfg, None)?;
    Ok(sums.stats(rollouts, parts))
}

/// Response tokens of an optimizer step's parts (the loss's denominator).
pub fn step_tokens(rollouts: &Rollouts, parts: &[std::ops::Range<usize>]) -> usize {
    parts.iter().flat_map(|r| &rollouts.lens[r.clone()]).sum()
}

/// What the micro-batches of an optimizer step add up (over a
/// data-parallel rank's share of them, before the ranks' sums are added).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateSums {
    pub loss: f64,
    /// Clipped response tokens.
    pub clipped: f64,
    pub neg_logprob: f64,
    pub dependency: f64,
    /// Response tokens TGF kept.
    pub kept: f64,
    pub kl: f64,
    pub scale_min: f32,
    pub scale_max: f32,
}

impl UpdateSums {
    /// The sums as numbers ranks add, and the extremes ranks take the max
    /// of (the minimum negated).
    pub fn to_sums(&self) -> ([f64; 6], [f64; 2]) {
        (
            [
                self.loss,
                self.clipped,
                self.neg_logprob,
                self.dependency,
                self.kept,
                self.kl,
            ],
            [-(self.scale_min as f64), self.scale_max as f64],
        )
    }

    pub fn from_sums(sums: [f64; 6], extremes: [f64; 2]) -> Self {
        let [loss, clipped, neg_logprob, dependency, kept, kl] = sums;
        Self {
            loss,
            clipped,
            neg_logprob,
            dependency,
            kept,
            kl,
            scale_min: -extremes[0] as f32,
            scale_max: extremes[1] as f32,
        }
    }

    /// The step's statistics over `parts` (the optimizer's report empty).
    pub fn stats(&self, rollouts: &Rollouts, parts: &[std::ops::Range<usize>]) -> UpdateStats {
        let total_tokens = step_tokens(rollouts, parts);
        let denom = total_tokens.max(1) as f64;
        UpdateStats {
            loss: self.loss,
            clip_fraction: (self.clipped / denom) as f32,
            entropy: self.neg_logprob / denom,
            visual_dependency_mean: rollouts
                .dependency
                .as_ref()
                .map(|_| self.dependency / denom),
            kl_mean: rollouts.lp_ref.as_ref().map(|_| self.kl / denom),
            tgf_kept_frac: (self.kept / denom) as f32,
            adv_scale_min: self.scale_min,
            adv_scale_max: self.scale_max,
            response_tokens: total_tokens,
            tokens: parts
                .iter()
                .flat_map(|r| &rollouts.batch[r.clone()])
                .map(|s| s.input.ids.len())
                .sum(),
            optimizer: StepReport::default(),
        }
    }
}

/// The micro-batch loop over `micro` (an optimizer step's micro-batches,
/// or a rank's share of them), the loss normalised by the whole step's
/// `total_tokens`: gradients accumulate into the engine's. With `source`
/// (ZeRO-3) the model gathers each unit's weights from it as it runs.
pub fn accumulate_micro_batches<B: Backend>(
    engine: &mut Engine<B>,
    rollouts: &Rollouts,
    micro: &[MicroBatch],
    total_tokens: usize,
    cfg: &StepConfig,
    source: Option<&dyn GatherWeights<B>>,
) -> Result<UpdateSums, StepError> {
    let offset = |i: usize| rollouts.lens[..i].iter().sum::<usize>();
    let save = if cfg.recompute {
        Save::Inputs
    } else {
        Save::All
    };
    let kl = match (cfg.kl, &rollouts.lp_ref) {
        (Some((estimator, coef)), Some(lp_ref)) => Some((estimator, coef, lp_ref)),
        (Some(_), None) => return Err(StepError::NoReference),
        _ => None,
    };
    let mut sums = UpdateSums {
        loss: 0.0,
        clipped: 0.0,
        neg_logprob: 0.0,
        dependency: 0.0,
        kept: 0.0,
        kl: 0.0,
        scale_min: f32::INFINITY,
        scale_max: f32::NEG_INFINITY,
    };
    for (r, range) in micro.iter().cloned() {
        let tok = offset(r.start)..offset(r.end);
        let shaping = Shaping::of(
            rollouts.dependency.as_ref().map(|d| &d[tok.clone()]),
            &rollouts.lens[r.clone()],
            &rollouts.advantages[r.clone()],
            &cfg.vppo,
            range,
        )
        .map_err(ModelError::from)?;
        sums.dependency += shaping.dependency_sum;
        sums.kept += shaping.kept_tokens() as f64;
        for &s in &shaping.scales {
            sums.scale_min = sums.scale_min.min(s);
            sums.scale_max = sums.scale_max.max(s);
        }
        // The micro-batch's responses as packed batches under the token
        // budget; the shaping above stays the micro-batch's.
        for pack in token_packs(
            &rollouts.batch,
            r.clone(),
            cfg.max_tokens_per_micro_batch,
            1,
        ) {
            let tok = offset(pack.start)..offset(pack.end);
            let at = tok.start - offset(r.start)..tok.end - offset(r.start);
            let lp_new = engine
                .train_forward_from(&rollouts.batch[pack], save, source)?
                .logprobs;
            let mut policy = cfg.loss.evaluate(
                &lp_new,
                &rollouts.lp_old[tok.clone()],
                &shaping.token_advantages[at.clone()],
                &shaping.mask[at],
                total_tokens,
            );
            if let Some((estimator, coef, lp_ref)) = kl {
                // On every response token (TGF masks only the policy term).
                let k = estimator.loss(&lp_new, &lp_ref[tok.clone()], coef, total_tokens);
                policy.loss += k.loss;
                sums.kl += k.kl_sum;
                for (g, kg) in policy.token_grads.iter_mut().zip(&k.token_grads) {
                    *g += kg;
                }
            }
            sums.loss += policy.loss;
            sums.clipped += (policy.clip_fraction * tok.len() as f32) as f64;
            sums.neg_logprob -= lp_new.iter().map(|&l| l as f64).sum::<f64>();
            let zeros = vec![0.0; policy.token_grads.len()];
            engine.train_backward_from(&policy.token_grads, &zeros, source)?;
        }
    }
    Ok(sums)
}

/// Rollouts and one update over every kept group: the whole rollout batch
/// as a single mini-batch, on the CPU.
pub fn train_step(
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    prompts: &[Prompt],
    cfg: &StepConfig,
    seed: u64,
) -> Result<StepStats, StepError> {
    let rollouts = collect_rollouts(pipeline, prompts, cfg, seed)?;
    let mut stats = rollouts.stats.clone();
    if rollouts.groups() > 0 {
        let update = update(pipeline, optimizer, &rollouts, 0..rollouts.groups(), cfg)?;
        stats.loss = update.loss;
        stats.clip_fraction = update.clip_fraction;
        stats.optimizer = Some(update.optimizer);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_packs_fill_the_budget_in_order_and_never_leave_a_sequence_out() {
        let seq = |n: usize| TrainSequence {
            input: SequenceInput {
                ids: vec![0; n],
                ..SequenceInput::default()
            },
            prompt_len: 1,
        };
        let batch: Vec<TrainSequence> = [5, 5, 5, 12, 3, 4].into_iter().map(seq).collect();
        assert_eq!(
            token_packs(&batch, 0..6, 10, 1),
            vec![0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(token_packs(&batch, 1..5, 20, 2), vec![1..3, 3..4, 4..5]);
        assert_eq!(token_packs(&batch, 0..6, 1 << 20, 2), vec![0..6]);
        assert_eq!(
            token_packs(&batch, 2..2, 10, 1),
            Vec::<std::ops::Range<usize>>::new()
        );
    }

    /// A fake generation batch: `groups` kept groups of `n` responses, the
    /// response of group g, sample i having g + i + 1 tokens whose old
    /// log-probs all equal `tag`.
    fn batch(groups: usize, n: usize, tag: f32, dropped: usize, reward: f32) -> Rollouts {
        let mut r = Rollouts {
            batch: Vec::new(),
            advantages: Vec::new(),
            lens: Vec::new(),
            sample_ids: Vec::new(),
            lp_old: Vec::new(),
            dependency: Some(Vec::new()),
            lp_ref: None,
            group_size: n,
            stats: StepStats {
                responses: (groups + dropped) * n,
                mean_reward: reward,
                accuracy: reward,
                kept_groups: groups,
                dropped_groups: dropped,
                mean_response_tokens: 2.0,
                ..Default::default()
            },
        };
        for g in 0..groups {
            for i in 0..n {
                let len = g + i + 1;
                r.batch.push(TrainSequence {
                    input: SequenceInput {
                        ids: vec![0; 3 + len],
                        ..Default::default()
                    },
                    prompt_len: 3,
                });
                r.advantages.push(tag);
                r.lens.push(len);
                r.sample_ids.push(g * n + i);
                r.lp_old.extend(std::iter::repeat_n(tag, len));
                r.dependency
                    .as_mut()
                    .unwrap()
                    .extend(std::iter::repeat_n(-tag, len));
            }
        }
        r
    }

    #[test]
    fn dynamic_sampling_refill_appends_then_truncates_to_a_full_batch() {
        // Want 3 groups: the first generation batch kept 2 (dropped 2), the
        // refill kept 2 more (dropped 2); the batch keeps the first 3.
        let mut r = batch(2, 2, 1.0, 2, 0.25);
        r.append(batch(2, 2, 2.0, 2, 0.75));
        assert_eq!(
            (r.groups(), r.stats.kept_groups, r.stats.dropped_groups),
            (4, 4, 4)
        );
        assert_eq!(r.stats.responses, 16);
        assert!(
            (r.stats.mean_reward - 0.5).abs() < 1e-6,
            "response-weighted mean"
        );
        r.truncate_groups(3);
        assert_eq!(r.groups(), 3);
        assert_eq!(r.lens, vec![1, 2, 2, 3, 1, 2]);
        assert_eq!(r.advantages, vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
        // Token-level arrays cut at the same response boundary.
        let tokens: usize = r.lens.iter().sum();
        assert_eq!(r.lp_old.len(), tokens);
        assert_eq!(r.dependency.as_ref().unwrap().len(), tokens);
        assert_eq!(r.lp_old[..8], [1.0; 8]);
        assert_eq!(r.lp_old[8..], [2.0, 2.0, 2.0]);
        // Fewer groups than asked: nothing to cut.
        r.truncate_groups(10);
        assert_eq!(r.groups(), 3);
    }

    /// Two prompts of two responses: prompt A depends on the image (mean
    /// dependency 3 and 4), prompt B little (0 and 1). Each response's
    /// advantage is its original index, to find it after the reordering.
    fn two_prompts() -> Rollouts {
        let mut r = batch(0, 2, 0.0, 0, 0.0);
        for (i, (len, dep)) in [(7, 3.0), (17, 4.0), (8, 0.0), (18, 1.0)]
            .into_iter()
            .enumerate()
        {
            r.batch.push(TrainSequence {
                input: SequenceInput {
                    ids: vec![0; 3 + len],
                    ..Default::default()
                },
                prompt_len: 3,
            });
            r.advantages.push(i as f32);
            r.lens.push(len);
            r.sample_ids.push(i);
            r.lp_old.extend(std::iter::repeat_n(i as f32, len));
            r.dependency
                .as_mut()
                .unwrap()
                .extend(std::iter::repeat_n(dep, len));
        }
        r
    }

    /// Each original response's TAS scale under `cfg`'s layout, as the
    /// micro-batch loop computes them (one optimizer step: both groups).
    fn scales(cfg: &StepConfig) -> Vec<f32> {
        let mut r = two_prompts();
        let plan = update_plan(&mut r, 2, cfg);
        assert_eq!(plan.len(), 1, "one step over both prompts");
        let mut out = vec![f32::NAN; 4];
        let offset = |i: usize| r.lens[..i].iter().sum::<usize>();
        for (m, range) in micro_batches(&r, &plan[0], cfg.micro_batch) {
            let dep = &r.dependency.as_ref().unwrap()[offset(m.start)..offset(m.end)];
            let shaping = Shaping::of(
                Some(dep),
                &r.lens[m.clone()],
                &r.advantages[m.clone()],
                &cfg.vppo,
                range,
            )
            .unwrap();
            for (i, s) in m.zip(shaping.scales) {
                // The advantage tags the response; its tokens moved with it.
                assert_eq!(r.lp_old[offset(i)], r.advantages[i]);
                out[r.advantages[i] as usize] = s;
            }
        }
        out
    }

    #[test]
    fn tas_over_balanced_parts_favours_the_image_dependent_prompt() {
        let mut cfg = StepConfig::recipe(Algo::Vppo);
        cfg.micro_batch = 2;
        // The old layout: one part, micro-batches of one prompt's group, the
        // range over all four (0..4). Scales average 1 inside each group.
        cfg.tas_partitions = 1;
        let old = scales(&cfg);
        let want_old = [
            0.9 + 0.75 * (0.1 / 0.875),
            0.9 + 0.1 / 0.875,
            0.9,
            0.9 + 0.25 * (0.1 / 0.125),
        ];
        for (a, b) in old.iter().zip(want_old) {
            assert!((a - b).abs() < 1e-5, "{old:?}");
        }
        // The reference's: sequence lengths 10, 20, 11, 21 balance into
        // {20, 11} (responses 1, 2: dependency 4 and 0, range 0..4) and
        // {10, 21} (responses 0, 3: 3 and 1, range 1..3); each part's
        // micro-batch mixes the prompts, so A's responses get 1.1, B's 0.9.
        cfg.tas_partitions = 2;
        let reference = scales(&cfg);
        for (a, b) in reference.iter().zip([1.1, 1.1, 0.9, 0.9]) {
            assert!((a - b).abs() < 1e-5, "{reference:?}");
        }
    }

    #[test]
    fn the_plan_takes_the_ith_mini_batch_of_every_part() {
        // 4 groups of 2 (8 responses), 2 parts of 4, mini-batches of 2
        // groups: 2 responses per part per step, 2 steps.
        let mut r = batch(4, 2, 1.0, 0, 0.5);
        let mut cfg = StepConfig::recipe(Algo::Vppo);
        cfg.tas_partitions = 2;
        let plan = update_plan(&mut r, 2, &cfg);
        assert_eq!(plan, vec![vec![0..2, 4..6], vec![2..4, 6..8]]);
        // Token arrays follow their responses.
        let tokens: usize = r.lens.iter().sum();
        assert_eq!(r.dependency.as_ref().unwrap().len(), tokens);
        // One part: consecutive groups, no reordering.
        let mut r = batch(4, 2, 1.0, 0, 0.5);
        let lens = r.lens.clone();
        cfg.tas_partitions = 1;
        assert_eq!(update_plan(&mut r, 2, &cfg), vec![vec![0..4], vec![4..8]]);
        assert_eq!(r.lens, lens);
        // 8 parts, but a step holds only 2 responses (one group of 2): 2
        // parts, so the batch still makes 4 steps of 2.
        cfg.tas_partitions = 8;
        let plan = update_plan(&mut r, 1, &cfg);
        assert_eq!(plan.len(), 4);
        assert!(plan
            .iter()
            .all(|s| s.len() == 2 && s.iter().all(|r| r.len() == 1)));
    }
}
