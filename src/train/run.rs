//! `vppo-engine train`: the whole run. Prompts in a reproducible order ->
//! rollouts with dynamic-sampling refill -> one optimizer step per update
//! mini-batch -> metrics, checkpoints every `save_every` steps, a plot at
//! the end. A run resumes exactly from its latest checkpoint: weights,
//! optimizer moments, data position and every seed (all derived from the
//! run seed and the rollout-batch index) come back as they were.

use super::checkpoint::{
    checkpoint_dirs, latest_checkpoint, load_training_checkpoint, save_training_checkpoint,
    TrainingState,
};
use super::config::{AlgoName, TrainConfig};
use super::data_parallel::{gather_rollouts, prompt_share, update_step};
use super::metrics::{MetricsLog, StepMetrics, ValMetrics};
use super::optimizer::{AdamW, Policy, WeightPrecision};
pub use super::ranks::Membership;
use super::ranks::{agree, join_group, save_sharded, zero_error, Ranks};
use super::refill::fill;
use super::retention;
use super::reward_command::RewardCommand;
use super::run_error::io;
pub use super::run_error::RunError;
use super::source::{DataOrder, Mix, PromptSource};
use super::step::{
    collect_rollouts_with, update_parts_on, update_plan, AccuracyReward, Algo, Prompt, RewardFn,
    Rollouts, StepConfig, StepError,
};
use super::tensorboard::{numeric_fields, EventWriter};
use super::validation;
use super::warmup::warmup_step;
use crate::backend::cpu::adamw::AdamWConfig;
use crate::backend::{local_ordinal, open_local_gpu, Device};
use crate::builtin::{write_model_dir, CountingTask, TinySizes};
use crate::data::prompt::PromptFormat;
use crate::data::Columns;
use crate::distributed::Collective;
use crate::model::engine::Engine;
use crate::model::Qwen25Vl;
use crate::ops::cpu::CpuBackend;
use crate::ops::cpu_bf16::CpuBf16Backend;
use crate::ops::Backend;
use crate::ops::Precision;
use crate::pipeline::{Pipeline, PipelineError};
use crate::processor::image::ImageProcessorConfig;
use crate::processor::text::TextProcessor;
use crate::rl::{PolicyLossConfig, VppoConfig};
use crate::rollout::sampling::SamplingParams;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const WARMUP_FILE: &str = "warmup.jsonl";
pub const PLOT_FILE: &str = "reward.png";
/// TensorBoard event files, under the run directory.
pub const TB_DIR: &str = "tb";
/// The frozen initial weights the KL loss compares with, when the run
/// starts from the built-in model (a given `model` is its own reference).
pub const REFERENCE_DIR: &str = "reference-model";
const BASE_MODEL_DIR: &str = "base-model";
/// Rollout batches in a row without an update before the run gives up.
const MAX_BATCHES_WITHOUT_UPDATE: usize = 20;
/// Updates in a row skipped for a non-finite loss or gradient norm before
/// the run stops: one can be a fluke, several mean the run has diverged.
pub const MAX_SKIPPED_IN_A_ROW: u64 = 3;
/// Keeps the warm-up's problems apart from the RL prompts.
const WARMUP_SEED_SALT: u64 = 0x5EED_0F5F;

/// Writes `path` through a temporary sibling and a rename (never torn).
fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Updates skipped because the loss or the gradient norm was not finite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Skips {
    /// In the whole run (kept across a resume through the metrics).
    total: u64,
    /// Since the last update that went through.
    in_a_row: u64,
}

impl Skips {
    fn resume(total: u64) -> Self {
        Self { total, in_a_row: 0 }
    }

    /// Records one update; true when it was skipped. The optimizer skips a
    /// non-finite gradient norm itself; a non-finite loss counts as skipped
    /// too (its gradient cannot be trusted).
    fn record(&mut self, loss: f64, optimizer_skipped: bool) -> bool {
        let skipped = optimizer_skipped || !loss.is_finite();
        if skipped {
            self.total += 1;
            self.in_a_row += 1;
        } else {
            self.in_a_row = 0;
        }
        skipped
    }

    /// Too many skipped in a row: the run has diverged.
    fn diverged(&self) -> bool {
        self.in_a_row >= MAX_SKIPPED_IN_A_ROW
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    /// Mean reward over the first and the last fifth of the optimizer steps.
    pub reward_first_fifth: f64,
    pub reward_last_fifth: f64,
    pub seconds: f64,
    pub checkpoint: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// Data set rows skipped as corrupt and as too long (each row once).
    pub skipped_rows: (usize, usize),
    /// Updates skipped for a non-finite loss or gradient norm.
    pub skipped_steps: u64,
    /// The last validation (step, avg@n accuracy), if the run validates.
    pub last_validation: Option<(u64, f64)>,
    /// The checkpoint with the best validation accuracy (`best`).
    pub best: Option<PathBuf>,
    /// This process's rank (0 in a single-process run); rank 0 reports.
    pub rank: usize,
}

/// Mean reward over the first and last fifth of the steps.
pub fn reward_fifths(records: &[StepMetrics]) -> (f64, f64) {
    let k = (records.len() / 5).max(1).min(records.len());
    let mean =
        |r: &[StepMetrics]| r.iter().map(|m| m.reward_mean).sum::<f64>() / r.len().max(1) as f64;
    (mean(&records[..k]), mean(&records[records.len() - k..]))
}

/// The step settings the config describes.
pub fn step_config(cfg: &TrainConfig) -> StepConfig {
    let algo = match cfg.algo {
        AlgoName::Vppo => Algo::Vppo,
        AlgoName::Dapo => Algo::Dapo,
        AlgoName::Grpo => Algo::Grpo,
    };
    let mut step = StepConfig::recipe(algo);
    step.n = cfg.group_size;
    step.sampling = SamplingParams {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        top_k: 0,
    };
    step.max_new_tokens = cfg.max_response_tokens;
    step.rollout = crate::rollout::generate::RolloutLimits::new(
        cfg.max_num_seqs,
        cfg.max_num_batched_tokens,
        cfg.kv_cache_blocks,
        cfg.kv_cache_memory_fraction,
    )
    .eager(cfg.enforce_eager);
    step.dynamic_sampling = (cfg.dynamic_sampling && algo != Algo::Grpo).then_some((0.01, 0.99));
    step.vppo = VppoConfig {
        beta_min: cfg.tas_beta_min,
        tgf_ratio: cfg.tgf_ratio,
    };
    step.loss = PolicyLossConfig {
        clip_low: cfg.clip_low,
        // GRPO clips symmetrically.
        clip_high: if algo == Algo::Grpo {
            cfg.clip_low
        } else {
            cfg.clip_high
        },
        clip_dual: (cfg.clip_dual > 0.0).then_some(cfg.clip_dual),
        entropy_penalty: cfg.entropy_penalty,
    };
    step.blacken_p = cfg.blacken_p;
    step.perturbation = cfg.perturbation;
    step.perturb_space = cfg.perturb_space;
    step.dependency = cfg.dependency;
    step.micro_batch = cfg.micro_batch;
    step.max_tokens_per_micro_batch = cfg.max_tokens_per_micro_batch;
    step.tas_partitions = cfg.tas_partitions;
    step.recompute = cfg.recompute;
    step.kl = cfg.use_kl_loss.then_some((cfg.kl_estimator, cfg.kl_coef));
    step
}

/// AdamW for `model`: with bf16 weights it keeps their fp32 masters.
fn new_optimizer(model: &Qwen25Vl, cfg: &TrainConfig, lr: f64, precision: Precision) -> AdamW {
    let precision = match precision {
        Precision::Bf16 => WeightPrecision::Bf16Model,
        Precision::Fp32 => WeightPrecision::Fp32,
    };
    AdamW::new(
        &model.weights,
        AdamWConfig {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
        Some(cfg.max_grad_norm),
        precision,
    )
}

/// A seed for rollout batch `index`, generation attempt `attempt`.
fn rollout_seed(seed: u64, index: u64, attempt: u64) -> u64 {
    let mut x = seed
        ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ attempt.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    // splitmix64 finaliser: nearby indices give unrelated streams.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn load_pipeline(dir: &Path, model: Qwen25Vl, cfg: &TrainConfig) -> Result<Pipeline, RunError> {
    let mut images = ImageProcessorConfig::load(dir).map_err(PipelineError::from)?;
    // As the reference: the recipe's bounds in the data loading, then the
    // checkpoint's processor with its own bounds.
    images.dataset_pixels = Some((cfg.min_pixels, cfg.max_pixels));
    Ok(Pipeline::new(
        model,
        TextProcessor::load(dir).map_err(PipelineError::from)?,
        images,
    )?)
}

fn prompt_format(cfg: &TrainConfig) -> PromptFormat {
    PromptFormat {
        suffix: cfg.prompt_suffix.clone(),
        max_prompt_tokens: cfg.max_prompt_tokens,
    }
}

/// The prompt source at a run's position: `position` rows (a mix: draws),
/// and for a mix, `mix_positions` rows of each of its data sets.
fn open_source(
    cfg: &TrainConfig,
    position: u64,
    mix_positions: Option<Vec<u64>>,
) -> Result<PromptSource, RunError> {
    let Some(data) = &cfg.data else {
        return Ok(PromptSource::builtin(
            CountingTask::new(cfg.builtin_grid, cfg.seed),
            prompt_format(cfg),
            position,
        ));
    };
    let open = |path: &Path, at: u64, order: DataOrder| {
        PromptSource::dataset(path, Columns::default(), prompt_format(cfg), order, at)
    };
    match data.paths() {
        // One data set as the reference reads it: epochs restart for as
        // long as the run (its length counted from the rows) asks, each
        // epoch's last incomplete rollout batch dropped.
        [one] => Ok(open(
            one,
            position,
            DataOrder {
                shuffle: cfg.shuffle,
                seed: cfg.seed,
                batch: cfg.rollout_batch as u64,
                epochs: None,
            },
        )?),
        many => {
            let at = mix_positions.unwrap_or_else(|| vec![0; many.len()]);
            if at.len() != many.len() {
                return Err(RunError::Usage(format!(
                    "the checkpoint was saved with {} data files, the config names {}: \
                     a resumed run must keep its data list",
                    at.len(),
                    many.len()
                )));
            }
            let sources = many
                .iter()
                .zip(at)
                .enumerate()
                .map(|(i, (p, at))| {
                    // A mix ends when a drawn file runs out.
                    let order = DataOrder {
                        shuffle: cfg.shuffle,
                        seed: cfg.seed.wrapping_add(i as u64),
                        batch: 1,
                        epochs: Some(cfg.epochs as u64),
                    };
                    open(p, at, order)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PromptSource::Mix(Box::new(Mix::new(
                sources,
                &cfg.data_weights,
                cfg.seed,
                position,
            ))))
        }
    }
}

/// Rollout batches a run over `rows` rows makes: `floor(rows / batch)` per
/// epoch (the reference's data loader drops the last incomplete batch), at
/// least one.
pub fn training_length(rows: u64, batch: usize, epochs: usize) -> u64 {
    (rows / batch.max(1) as u64).max(1) * epochs as u64
}

fn next_prompts(
    source: &mut PromptSource,
    pipeline: &Pipeline,
    count: usize,
) -> Result<Vec<Prompt>, RunError> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        match source.next_prompt(pipeline)? {
            Some(p) => out.push(p),
            None => break,
        }
    }
    Ok(out)
}

/// [`save`] after bringing the host's weights and optimizer state up to
/// date with the device's (where the optimizer steps); data-parallel ranks
/// save together ([`save_sharded`]).
#[allow(clippy::too_many_arguments)]
fn save_from<B: Backend>(
    policy: &mut Policy<B>,
    ranks: Option<&mut Ranks<'_, B>>,
    out: &Path,
    pipeline: &mut Pipeline,
    optimizer: &mut AdamW,
    state: &TrainingState,
    keep: usize,
    mark_best: bool,
) -> Result<Option<PathBuf>, RunError> {
    policy
        .sync_to_host(&mut pipeline.model.weights, optimizer)
        .map_err(|e| RunError::Device(format!("copying the weights back: {e}")))?;
    match ranks {
        None => save(out, &mut pipeline.model, optimizer, state, keep, mark_best).map(Some),
        Some(ranks) => save_sharded(
            ranks,
            &policy.engine.be,
            out,
            &mut pipeline.model,
            optimizer,
            state,
            keep,
            mark_best,
        ),
    }
}

/// The model, optimizer and state of a training checkpoint.
fn resume_from(
    dir: &Path,
    cfg: &TrainConfig,
) -> Result<(Pipeline, AdamW, TrainingState), RunError> {
    let (model, optimizer, state) = load_training_checkpoint(dir)?;
    Ok((load_pipeline(dir, model, cfg)?, optimizer, state))
}

/// A fresh run from the model in `dir`: a new optimizer, step 0.
fn start_from(
    dir: &Path,
    cfg: &TrainConfig,
    precision: Precision,
) -> Result<(Pipeline, AdamW, TrainingState), RunError> {
    let model = Qwen25Vl::load(dir).map_err(PipelineError::from)?;
    let optimizer = new_optimizer(&model, cfg, cfg.lr, precision);
    let state = TrainingState {
        step: 0,
        seed: cfg.seed,
        data_position: 0,
        extra: serde_json::json!({"rollout_batches": 0, "warmup_done": false}),
    };
    Ok((load_pipeline(dir, model, cfg)?, optimizer, state))
}

/// What a rank other than 0 starts from, once rank 0 has set the run up:
/// the latest checkpoint if there is one (a resumed run, or the warm-up's),
/// else the model rank 0 started from with a fresh optimizer.
fn follow_setup(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
) -> Result<(RunParts, Option<Qwen25Vl>), RunError> {
    let precision = cfg.precision.on(cfg.device.resolve(false));
    let (pipeline, optimizer, state) = match latest_checkpoint(out)? {
        Some(dir) => resume_from(&dir, cfg)?,
        None => {
            let dir = cfg
                .model
                .clone()
                .unwrap_or_else(|| out.join(BASE_MODEL_DIR));
            start_from(&dir, cfg, precision)?
        }
    };
    let metrics = MetricsLog::follow(&out.join(METRICS_FILE), resume.then_some(state.step))?;
    let reference = if cfg.use_kl_loss {
        // Rank 0 has written the built-in reference by now.
        Some(reference_model(cfg, out, &pipeline.model, true)?)
    } else {
        None
    };
    let parts = RunParts {
        pipeline,
        optimizer,
        state,
        metrics,
        val_data: None,
        tensorboard: None,
    };
    Ok((parts, reference))
}

/// Validation during a run: the held-out data, the eval settings, and the
/// best accuracy so far (from the metrics, so a resumed run knows it).
struct Validator {
    data: PathBuf,
    opts: crate::eval::EvalOptions,
    val_n: usize,
    best: Option<f64>,
    /// The step of the last validation.
    last: Option<u64>,
    /// Skipped rows are reported once: every validation meets the same.
    reported_skips: bool,
}

impl Validator {
    fn new(data: PathBuf, cfg: &TrainConfig, done: &[ValMetrics]) -> Self {
        Self {
            data,
            opts: validation::options(cfg),
            val_n: cfg.val_n,
            best: done.iter().map(|v| v.accuracy).reduce(f64::max),
            last: done.last().map(|v| v.step),
            reported_skips: false,
        }
    }

    /// Validates the weights on `engine` after `step` updates: the record
    /// goes to metrics.jsonl and TensorBoard; true when its accuracy is the
    /// best of the run so far.
    fn run<B: Backend>(
        &mut self,
        pipeline: &Pipeline,
        engine: &Engine<B>,
        step: u64,
        metrics: &mut MetricsLog,
        tb: &mut Option<EventWriter>,
        progress: &Progress,
    ) -> Result<bool, RunError> {
        let (v, rows) = validation::validate(pipeline, engine, &self.data, &self.opts, step)?;
        if rows.corrupt + rows.too_long > 0 && !self.reported_skips {
            self.reported_skips = true;
            progress.warn(&format!(
                "validation data {}: {} corrupt and {} too-long rows skipped",
                self.data.display(),
                rows.corrupt,
                rows.too_long
            ));
        }
        progress.line(&format!(
            "validation at step {}: accuracy (avg@{}) {:.4} on {} problems, mean length {:.1} ({:.1} s)",
            v.step, self.val_n, v.accuracy, v.problems, v.response_len_mean, v.seconds
        ));
        log_scalars(tb, v.step, &v)?;
        let is_best = self.best.is_none_or(|b| v.accuracy > b);
        if is_best {
            self.best = Some(v.accuracy);
        }
        self.last = Some(step);
        metrics.push_val(v)?;
        Ok(is_best)
    }
}

struct Progress {
    bar: ProgressBar,
    /// Plain lines instead of a bar when stderr is not a terminal (CI, logs).
    plain: bool,
    /// A data-parallel rank other than 0: rank 0 speaks for the run.
    silent: bool,
}

impl Progress {
    fn new(total: Option<u64>, enabled: bool) -> Self {
        let plain = enabled && !std::io::stderr().is_terminal();
        let bar = if !enabled || plain {
            ProgressBar::hidden()
        } else if let Some(total) = total {
            ProgressBar::new(total)
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed}<{eta}]")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self {
            bar,
            plain,
            silent: false,
        }
    }

    fn silent() -> Self {
        Self {
            bar: ProgressBar::hidden(),
            plain: false,
            silent: true,
        }
    }

    fn line(&self, text: &str) {
        if self.silent {
            return;
        }
        if self.plain {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    /// A line that `--quiet` does not hide: something the user must know
    /// (skipped rows, skipped updates, removed leftovers).
    fn warn(&self, text: &str) {
        if self.silent {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}

/// Runs (or, with `resume`, continues) the training run in `out`.
/// `overrides` are the command line's `key=value` settings, also applied
/// on top of a resumed run's saved config.
pub fn run(
    config_file: Option<&Path>,
    overrides: &[String],
    out: Option<&Path>,
    resume: bool,
    show_progress: bool,
) -> Result<RunSummary, RunError> {
    let world =
        crate::distributed::World::from_env().map_err(|e| RunError::Usage(e.to_string()))?;
    let membership = if world.is_distributed() {
        Membership::Launched(world)
    } else {
        Membership::Single
    };
    run_as(
        membership,
        config_file,
        overrides,
        out,
        resume,
        show_progress,
    )
}

/// [`run`] as a member of a data-parallel group. Rank 0 checks and sets up
/// the run directory, writes the metrics, the progress and the
/// checkpoints' shared files; every rank rolls out its share of each batch,
/// trains on its share of each step's micro-batches and writes its shard
/// of the optimizer state. The run directory must be one every rank sees
/// (one node, or a shared file system).
pub fn run_as(
    membership: Membership,
    config_file: Option<&Path>,
    overrides: &[String],
    out: Option<&Path>,
    resume: bool,
    show_progress: bool,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let (rank, world_size) = match &membership {
        Membership::Single => (0, 1),
        Membership::Launched(world) => (world.rank, world.world_size),
        Membership::Given(group) => (group.rank(), group.world_size()),
    };
    let lead = rank == 0;
    let (cfg, out) = if resume {
        let out = out.ok_or_else(|| RunError::Usage("--resume needs the run directory".into()))?;
        let saved = out.join(CONFIG_FILE);
        if !saved.is_file() {
            return Err(RunError::Usage(format!(
                "{} holds no run to resume (no {CONFIG_FILE})",
                out.display()
            )));
        }
        (
            TrainConfig::resolve(Some(&saved), overrides)?,
            out.to_path_buf(),
        )
    } else {
        let cfg = TrainConfig::resolve(config_file, overrides)?;
        let out = out
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cfg.output_dir.clone());
        if lead && (out.join(METRICS_FILE).exists() || out.join("latest").exists()) {
            return Err(RunError::Usage(format!(
                "{} already holds a run: continue it with --resume {0}, or choose another --out",
                out.display()
            )));
        }
        let inputs: Vec<&Path> = cfg
            .model
            .iter()
            .chain(cfg.data.iter().flat_map(|d| d.paths()))
            .chain(&cfg.val_data)
            .map(PathBuf::as_path)
            .collect();
        // The lock file of a run starting there is answered by the lock below.
        if lead {
            crate::outputs::check_new_dir("--out", &out, &inputs, &[super::run_dir::LOCK_FILE])?;
        }
        (cfg, out)
    };
    // Before anything is written or the warm-up runs, which can take long.
    if let Some(v) = &cfg.val_data {
        if !v.is_file() {
            return Err(RunError::Usage(format!(
                "val_data = {}: no such file (parquet or JSONL with problem, answer, images)",
                v.display()
            )));
        }
    }
    if cfg.device == Device::Cuda && !crate::backend::gpu_usable() {
        return Err(RunError::Device(
            crate::backend::kernelless_gpu().unwrap_or_else(|| {
                "no usable CUDA device (no driver, no GPU, or no kernels in this build); \
                 use device=cpu, or device=auto to fall back to the CPU"
                    .into()
            }),
        ));
    }
    // The memory plan on the GPU, before anything is written or allocated
    // there (the built-in model's shapes are known once it is written).
    let on_gpu = cfg.device.resolve(false) == Device::Cuda;
    let mut gpu_plan = match (&cfg.model, on_gpu) {
        (Some(dir), true) => {
            let shapes = crate::model::config::ModelConfig::load(dir)
                .map_err(|e| RunError::Usage(e.to_string()))?;
            Some(super::memory_plan::check_local_gpu(
                &cfg, &shapes, world_size,
            )?)
        }
        _ => None,
    };
    let mut group = join_group(membership, &cfg)?;
    if let Some(group) = group.as_mut() {
        if !lead {
            // Rank 0 sets the run up; this rank starts from what it wrote.
            group.barrier().map_err(StepError::from)?;
            let (parts, reference) = follow_setup(&cfg, &out, resume)?;
            let progress = Progress::silent();
            return train_on_device(
                parts,
                reference,
                Some(&mut **group),
                &cfg,
                &out,
                &progress,
                started,
            );
        }
    }
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    // Two runs in one directory would overwrite each other's checkpoints.
    let _lock = super::run_dir::lock(&out)?;
    if !resume {
        // Checked again under the lock: another run may have started here.
        if let Some(name) = crate::outputs::first_entry(&out, &[super::run_dir::LOCK_FILE])? {
            return Err(crate::outputs::OutputError::NotEmpty {
                flag: "--out",
                out: out.clone(),
                example: name,
            }
            .into());
        }
    }
    let leftovers = super::run_dir::remove_leftovers(&out)?;
    let checkpoint = if resume {
        let latest = latest_checkpoint(&out)?;
        let saved = checkpoint_dirs(&out)?;
        if latest.is_none() {
            if let Some(newest) = saved.last() {
                // Starting over would overwrite these checkpoints.
                return Err(RunError::Usage(format!(
                    "{}/latest is missing, but the run has {} checkpoint(s), the newest {}: \
                     restore it (e.g. `echo {} > {}/latest`) and resume again",
                    out.display(),
                    saved.len(),
                    newest.display(),
                    newest
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    out.display()
                )));
            }
        }
        latest
    } else {
        None
    };
    let cfg_path = out.join(CONFIG_FILE);
    write_file_atomically(&cfg_path, cfg.to_toml().as_bytes())?;
    let progress = Progress::new(
        (cfg.max_steps > 0).then_some(cfg.max_steps as u64),
        show_progress,
    );
    for path in &leftovers {
        progress.warn(&format!(
            "removed {} (left by an interrupted save)",
            path.display()
        ));
    }

    // The one place training picks its device, and so its precision.
    let device = cfg.device.resolve(false);
    let precision = cfg.precision.on(device);
    // The model: the latest checkpoint of a resumed run, else the given
    // checkpoint, else a freshly written built-in one.
    let (mut pipeline, mut optimizer, mut state) = match &checkpoint {
        Some(dir) => {
            progress.line(&format!("resuming from {}", dir.display()));
            resume_from(dir, &cfg)?
        }
        None => {
            let dir = match &cfg.model {
                Some(dir) => dir.clone(),
                None => {
                    let dir = out.join(BASE_MODEL_DIR);
                    let task = CountingTask::new(cfg.builtin_grid, cfg.seed);
                    write_model_dir(
                        &dir,
                        &TinySizes::default(),
                        task.image_size(),
                        &task.corpus(),
                        cfg.seed,
                    )?;
                    dir
                }
            };
            start_from(&dir, &cfg, precision)?
        }
    };
    let metrics = MetricsLog::open(&out.join(METRICS_FILE), resume.then_some(state.step))?;
    let val_data = match (&cfg.val_data, cfg.is_builtin()) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(validation::write_builtin_split(&out, cfg.builtin_grid)?),
        (None, false) => None,
    };
    let tensorboard = if cfg.tensorboard {
        Some(EventWriter::create(
            &out.join(TB_DIR),
            // TensorBoard drops the logged events at and after this step:
            // the resumed run's first update is the step after the checkpoint.
            resume.then_some(state.step + 1),
        )?)
    } else {
        None
    };

    if cfg.warmup_steps > 0 && state.extra["warmup_done"] != true {
        warmup(&mut pipeline, &cfg, &out, &progress)?;
        optimizer = new_optimizer(&pipeline.model, &cfg, cfg.lr, precision);
        state.extra["warmup_done"] = true.into();
        save(
            &out,
            &mut pipeline.model,
            &optimizer,
            &state,
            cfg.keep_checkpoints,
            false,
        )?;
    }
    // The KL loss's reference: the weights RL starts from, frozen.
    let reference = if cfg.use_kl_loss {
        Some(reference_model(&cfg, &out, &pipeline.model, resume)?)
    } else {
        None
    };

    let parts = RunParts {
        pipeline,
        optimizer,
        state,
        metrics,
        val_data,
        tensorboard,
    };
    if let Some(group) = group.as_mut() {
        // Everything the other ranks load is written.
        group.barrier().map_err(StepError::from)?;
        progress.line(&format!(
            "data parallel over {} ranks, ZeRO-{} (each rank owns 1/{0} of the gradients, master weights and moments{})",
            group.world_size(),
            cfg.zero_stage,
            if cfg.zero_stage == 3 {
                ", and of the weights outside rollouts"
            } else {
                ""
            }
        ));
    }
    if let (Some(plan), true) = (gpu_plan.as_ref(), on_gpu) {
        progress.line(&format!(
            "memory plan: peak {:.2} GiB of the {:.2} GiB free on the GPU (`vppo-engine plan` prints the table)",
            plan.peak_bytes() as f64 / (1u64 << 30) as f64,
            plan.gpu_bytes as f64 / (1u64 << 30) as f64
        ));
    }
    let _ = gpu_plan.take();
    train_on_device(
        parts,
        reference,
        group.as_mut().map(|g| &mut **g as &mut dyn Collective),
        &cfg,
        &out,
        &progress,
        started,
    )
}

/// The training loop on the run's device and precision.
fn train_on_device(
    parts: RunParts,
    reference: Option<Qwen25Vl>,
    group: Option<&mut dyn Collective>,
    cfg: &TrainConfig,
    out: &Path,
    progress: &Progress,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let device = cfg.device.resolve(false);
    let precision = cfg.precision.on(device);
    match device {
        Device::Cuda => {
            if cfg.model.is_none() {
                // The built-in model's shapes are known once it is written.
                let world_size = group.as_ref().map_or(1, |g| g.world_size());
                super::memory_plan::check_local_gpu(cfg, &parts.pipeline.model.config, world_size)?;
            }
            let gpu = open_local_gpu().map_err(RunError::Device)?;
            let name = gpu.context().name().unwrap_or_default();
            let engine = Engine::with_precision(gpu, &parts.pipeline.model, precision)
                .map_err(|e| RunError::Device(format!("uploading the model: {e}")))?;
            progress.line(&format!(
                "training on CUDA device {} {name} in {} (rollouts, log-probs, backward, AdamW)",
                local_ordinal(),
                precision_words(precision),
            ));
            let reference = match &reference {
                Some(model) => {
                    let gpu = open_local_gpu().map_err(RunError::Device)?;
                    Some(Engine::with_precision(gpu, model, precision).map_err(|e| {
                        RunError::Device(format!("uploading the reference model: {e}"))
                    })?)
                }
                None => None,
            };
            train_loop(
                Policy::new(engine),
                reference,
                parts,
                group,
                cfg,
                out,
                progress,
                started,
            )
        }
        _ => {
            progress.line(&format!(
                "training on the CPU in {}",
                precision_words(precision)
            ));
            match precision {
                Precision::Fp32 => {
                    let be = (CpuBackend, precision);
                    cpu_train_loop(be, reference, parts, group, cfg, out, progress, started)
                }
                Precision::Bf16 => {
                    let be = (CpuBf16Backend, precision);
                    cpu_train_loop(be, reference, parts, group, cfg, out, progress, started)
                }
            }
        }
    }
}

fn precision_words(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16 (fp32 masters, moments, statistics and gradients)",
    }
}

/// [`train_loop`] on a CPU backend (`CpuBackend` for fp32, its bf16 twin).
#[allow(clippy::too_many_arguments)]
fn cpu_train_loop<B: Backend + Copy>(
    (be, precision): (B, Precision),
    reference: Option<Qwen25Vl>,
    parts: RunParts,
    group: Option<&mut dyn Collective>,
    cfg: &TrainConfig,
    out: &Path,
    progress: &Progress,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let engine = Engine::with_precision(be, &parts.pipeline.model, precision)
        .map_err(PipelineError::from)?;
    let reference = match &reference {
        Some(model) => {
            Some(Engine::with_precision(be, model, precision).map_err(PipelineError::from)?)
        }
        None => None,
    };
    train_loop(
        Policy::new(engine),
        reference,
        parts,
        group,
        cfg,
        out,
        progress,
        started,
    )
}

/// The frozen reference of the KL loss: the given `model`, or (built-in)
/// the warmed-up weights RL starts from, saved once under
/// `reference-model/` so a resumed run compares with the same weights.
/// Its engine stores the weights in the run's precision, as the policy's.
fn reference_model(
    cfg: &TrainConfig,
    out: &Path,
    current: &Qwen25Vl,
    resume: bool,
) -> Result<Qwen25Vl, RunError> {
    let dir = match &cfg.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = out.join(REFERENCE_DIR);
            if !dir.join("config.json").is_file() {
                if resume {
                    return Err(RunError::Usage(format!(
                        "use_kl_loss: {} is missing, and the reference (the weights RL \
                         started from) cannot be rebuilt on resume",
                        dir.display()
                    )));
                }
                super::checkpoint::save_hub_checkpoint(
                    current,
                    &dir,
                    super::checkpoint::SaveDtype::F32,
                    2 << 30,
                )?;
            }
            dir
        }
    };
    Ok(Qwen25Vl::load(&dir).map_err(PipelineError::from)?)
}

/// What a run carries from its setup into the training loop.
struct RunParts {
    pipeline: Pipeline,
    optimizer: AdamW,
    state: TrainingState,
    metrics: MetricsLog,
    /// Held-out data validated on (none: no validation).
    val_data: Option<PathBuf>,
    tensorboard: Option<EventWriter>,
}

/// Writes a record's numbers to TensorBoard, when it is on.
fn log_scalars<T: serde::Serialize>(
    tb: &mut Option<EventWriter>,
    step: u64,
    record: &T,
) -> Result<(), RunError> {
    if let Some(tb) = tb {
        let v = serde_json::to_value(record).expect("metrics serialize");
        tb.scalars(step, &numeric_fields(&v))?;
    }
    Ok(())
}

/// The RL loop on the policy's backend: rollout batches, mini-batch
/// updates, metrics and checkpoints until `max_steps` or the data ends.
#[allow(clippy::too_many_arguments)]
fn train_loop<B: Backend>(
    mut policy: Policy<B>,
    reference: Option<Engine<B>>,
    parts: RunParts,
    group: Option<&mut dyn Collective>,
    cfg: &TrainConfig,
    out: &Path,
    progress: &Progress,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let RunParts {
        mut pipeline,
        mut optimizer,
        mut state,
        mut metrics,
        val_data,
        mut tensorboard,
    } = parts;
    let mut ranks = match group {
        Some(group) => Some(Ranks::new(
            group,
            &mut optimizer,
            &pipeline.model.weights,
            &policy.engine,
            cfg.zero_stage,
        )?),
        None => None,
    };
    let step_cfg = step_config(cfg);
    let mix_positions: Option<Vec<u64>> =
        serde_json::from_value(state.extra["data_positions"].clone()).ok();
    let mut source = open_source(cfg, state.data_position, mix_positions)?;
    // The reference's length: whole rollout batches per epoch, times the
    // epochs (one data set and no max_steps).
    let rollout_batches = match (&source, cfg.max_steps) {
        (PromptSource::Dataset { .. }, 0) => source
            .rows()
            .map(|rows| training_length(rows, cfg.rollout_batch, cfg.epochs)),
        _ => None,
    };
    if let Some(total) = rollout_batches {
        progress
            .bar
            .set_length(total * (cfg.rollout_batch / cfg.mini_batch) as u64);
    }
    let reward: Box<dyn RewardFn> = match &cfg.reward_command {
        Some(command) => Box::new(RewardCommand {
            command: command.clone(),
            timeout: std::time::Duration::from_secs_f64(cfg.reward_timeout_s),
        }),
        None => Box::new(AccuracyReward),
    };
    let mut validator = val_data.map(|data| Validator::new(data, cfg, &metrics.val));
    if let Some(v) = validator.as_mut() {
        if cfg.val_before_train && state.step == 0 && v.last.is_none() {
            let best = v.run(
                &pipeline,
                &policy.engine,
                0,
                &mut metrics,
                &mut tensorboard,
                progress,
            )?;
            // The warm-up's checkpoint holds these weights.
            if let (true, Some(latest)) = (best, latest_checkpoint(out)?) {
                if latest.ends_with(super::checkpoint::checkpoint_dir_name(0)) {
                    retention::set_best(out, &latest)?;
                }
            }
        }
    }
    let mut rollout_index = state.extra["rollout_batches"].as_u64().unwrap_or(0);
    let mut last_saved = state.step;
    progress.bar.set_position(state.step);
    progress
        .bar
        .set_prefix(format!("{:?}", cfg.algo).to_lowercase());
    let mini_groups = cfg.mini_batch;
    let mut batches_without_update = 0usize;
    let mut skips = Skips::resume(metrics.records.last().map_or(0, |m| m.skipped_steps));
    'run: while cfg.max_steps == 0 || state.step < cfg.max_steps as u64 {
        if rollout_batches.is_some_and(|total| rollout_index >= total) {
            break;
        }
        let t0 = Instant::now();
        let step_before_batch = state.step;
        let filled = fill(
            cfg.rollout_batch,
            cfg.max_gen_batches,
            step_cfg.dynamic_sampling.is_some(),
            MAX_BATCHES_WITHOUT_UPDATE as u64,
            |attempt| -> Result<Option<Rollouts>, RunError> {
                let prompts = next_prompts(&mut source, &pipeline, cfg.rollout_batch)?;
                if prompts.is_empty() {
                    return Ok(None);
                }
                let seed = rollout_seed(cfg.seed, rollout_index, attempt);
                let Some(ranks) = ranks.as_mut() else {
                    return Ok(Some(collect_rollouts_with(
                        &pipeline,
                        &policy.engine,
                        reference.as_ref(),
                        &prompts,
                        0,
                        &step_cfg,
                        seed,
                        reward.as_ref(),
                    )?));
                };
                let share = prompt_share(prompts.len(), &*ranks.group);
                let mine = collect_rollouts_with(
                    &pipeline,
                    &policy.engine,
                    reference.as_ref(),
                    &prompts[share.clone()],
                    share.start,
                    &step_cfg,
                    seed,
                    reward.as_ref(),
                )?;
                Ok(Some(gather_rollouts(&mut *ranks.group, mine, &prompts)?))
            },
        )?;
        let gen_batches = filled.tries;
        let Some(mut rollouts) = filled.rollouts else {
            progress.line("the data set is exhausted");
            break 'run;
        };
        rollouts.truncate_groups(cfg.rollout_batch);
        let rollout_time = t0.elapsed().as_secs_f64();
        let groups = rollouts.groups();
        let stats = rollouts.stats.clone();
        if groups < cfg.rollout_batch && step_cfg.dynamic_sampling.is_some() {
            progress.line(&format!(
                "rollout batch {rollout_index}: {groups} of {} groups informative after {gen_batches} generation batches ({} filtered)",
                cfg.rollout_batch, stats.dropped_groups
            ));
        }
        let updates = update_plan(&mut rollouts, mini_groups, &step_cfg);
        if let Some(ranks) = ranks.as_mut() {
            // ZeRO-3: the update gathers each unit's weights as it runs.
            ranks.zero.release(&mut policy.engine).map_err(zero_error)?;
        }
        for range in &updates {
            let t1 = Instant::now();
            let u = match ranks.as_mut() {
                None => update_parts_on(
                    &mut policy,
                    &mut pipeline.model.weights,
                    &mut optimizer,
                    &rollouts,
                    range,
                    &step_cfg,
                )?,
                Some(ranks) => {
                    let u = update_step(
                        &mut policy,
                        &mut ranks.zero,
                        &mut *ranks.group,
                        &rollouts,
                        range,
                        &step_cfg,
                    )?;
                    optimizer.step = ranks.zero.step;
                    u
                }
            };
            state.step += 1;
            // The optimizer already left the weights alone on a non-finite
            // gradient norm; a non-finite loss counts as skipped too.
            if skips.record(u.loss, u.optimizer.skipped) {
                progress.warn(&format!(
                    "step {}: update skipped (loss {}, gradient norm {}); {} skipped so far",
                    state.step, u.loss, u.optimizer.grad_norm, skips.total
                ));
            }
            let step_time = t1.elapsed().as_secs_f64() + rollout_time / updates.len() as f64;
            let m = StepMetrics {
                step: state.step,
                rollout_batch: rollout_index,
                reward_mean: stats.mean_reward as f64,
                accuracy: stats.accuracy as f64,
                loss: u.loss,
                entropy: u.entropy,
                visual_dependency_mean: u.visual_dependency_mean,
                tgf_kept_frac: u.tgf_kept_frac as f64,
                adv_scale_min: u.adv_scale_min as f64,
                adv_scale_max: u.adv_scale_max as f64,
                response_len_mean: stats.mean_response_tokens as f64,
                filtered_groups: stats.dropped_groups,
                groups: range.iter().map(|r| r.len()).sum::<usize>() / cfg.group_size,
                gen_batches,
                clip_fraction: u.clip_fraction as f64,
                grad_norm: u.optimizer.grad_norm,
                step_time_s: step_time,
                tokens_per_s: u.tokens as f64 / step_time.max(1e-9),
                skipped_steps: skips.total,
                kl_mean: u.kl_mean,
                extra: stats.reward_extra.iter().cloned().collect(),
            };
            log_scalars(&mut tensorboard, m.step, &m)?;
            progress.bar.set_position(state.step);
            progress.bar.set_message(format!(
                "reward {:.3} dep {} {:.0} tok/s",
                m.reward_mean,
                m.visual_dependency_mean
                    .map_or("-".to_string(), |d| format!("{d:.3}")),
                m.tokens_per_s
            ));
            if progress.plain {
                eprintln!(
                    "step {:>4} reward {:.3} acc {:.3} loss {:+.4} entropy {:.3} dep {} kept {:.2} len {:.1} {:.0} tok/s",
                    m.step,
                    m.reward_mean,
                    m.accuracy,
                    m.loss,
                    m.entropy,
                    m.visual_dependency_mean.map_or("-".into(), |d| format!("{d:.4}")),
                    m.tgf_kept_frac,
                    m.response_len_mean,
                    m.tokens_per_s
                );
            }
            metrics.push(m)?;
            if skips.diverged() {
                return Err(RunError::Diverged(format!(
                    "{} updates in a row (up to step {}) had a non-finite loss or gradient norm \
                     (last: loss {}, gradient norm {}), and were skipped; stopping. The weights \
                     are unchanged since the last good update and no checkpoint of them was \
                     written now ({} holds the last one). Lower lr or check the data",
                    skips.in_a_row,
                    state.step,
                    u.loss,
                    u.optimizer.grad_norm,
                    out.display()
                )));
            }
        }
        if let Some(ranks) = ranks.as_mut() {
            // Validation, saving and the next rollouts sample from the
            // whole weights.
            ranks
                .zero
                .materialize(&mut policy.engine, &mut *ranks.group)
                .map_err(zero_error)?;
        }
        if updates.is_empty() {
            // Uncapped, the refill already gave up after that many
            // generation batches without a kept group: stop now.
            batches_without_update += if cfg.max_gen_batches == 0 {
                gen_batches as usize
            } else {
                1
            };
            progress.line(&format!(
                "rollout batch {rollout_index}: every group filtered out (mean reward {:.3}); no update",
                stats.mean_reward
            ));
            if batches_without_update >= MAX_BATCHES_WITHOUT_UPDATE {
                return Err(RunError::Usage(format!(
                    "{MAX_BATCHES_WITHOUT_UPDATE} {} batches in a row had no group with mixed rewards \
                     (last mean reward {:.3}): every response is right, or every one is wrong. \
                     Check the answers in the data, max_response_tokens, or the warm-up",
                    if cfg.max_gen_batches == 0 { "generation" } else { "rollout" },
                    stats.mean_reward
                )));
            }
        } else {
            batches_without_update = 0;
        }
        rollout_index += 1;
        state.data_position = source.position();
        if let Some(positions) = source.mix_positions() {
            state.extra["data_positions"] = positions.into();
        }
        state.extra["rollout_batches"] = rollout_index.into();
        let done = (cfg.max_steps > 0 && state.step >= cfg.max_steps as u64)
            || rollout_batches.is_some_and(|total| rollout_index >= total);
        let mut new_best = false;
        if let Some(v) = validator.as_mut() {
            if validation::due(cfg.val_freq, step_before_batch, state.step) || done {
                new_best = v.run(
                    &pipeline,
                    &policy.engine,
                    state.step,
                    &mut metrics,
                    &mut tensorboard,
                    progress,
                )?;
            }
        }
        let new_best = agree(ranks.as_mut(), new_best)?;
        // A new best is saved now, whatever save_every says, so `best`
        // names the weights that were validated.
        if state.step / cfg.save_every as u64 > last_saved / cfg.save_every as u64
            || done
            || new_best
        {
            save_from(
                &mut policy,
                ranks.as_mut(),
                out,
                &mut pipeline,
                &mut optimizer,
                &state,
                cfg.keep_checkpoints,
                new_best,
            )?;
            last_saved = state.step;
        }
    }
    progress.bar.finish_and_clear();
    let mut new_best = false;
    if let Some(v) = validator.as_mut() {
        if v.last != Some(state.step) && state.step > 0 {
            new_best = v.run(
                &pipeline,
                &policy.engine,
                state.step,
                &mut metrics,
                &mut tensorboard,
                progress,
            )?;
        }
    }
    let new_best = agree(ranks.as_mut(), new_best)?;
    if state.step != last_saved || new_best {
        save_from(
            &mut policy,
            ranks.as_mut(),
            out,
            &mut pipeline,
            &mut optimizer,
            &state,
            cfg.keep_checkpoints,
            new_best,
        )?;
    }
    let plot = out.join(PLOT_FILE);
    let title = format!(
        "{} on {} ({} steps)",
        format!("{:?}", cfg.algo).to_lowercase(),
        cfg.data
            .as_ref()
            .map_or("the built-in counting task".to_string(), |d| d.to_string()),
        state.step
    );
    let lead = ranks.as_ref().is_none_or(|r| r.group.rank() == 0);
    let written =
        lead.then(|| super::plot::write_plot(&metrics.records, &metrics.val, &title, &plot));
    let plot = match written {
        None => None,
        Some(Ok(())) => Some(plot),
        Some(Err(e)) => {
            progress.warn(&format!("warning: no plot: {e}"));
            None
        }
    };
    if let Some(skipped) = source.skipped() {
        if skipped.corrupt + skipped.too_long > 0 {
            progress.warn(&format!(
                "skipped rows: {} corrupt, {} too long (e.g. {})",
                skipped.corrupt,
                skipped.too_long,
                skipped.examples.join("; ")
            ));
        }
    }
    let (first, last) = reward_fifths(&metrics.records);
    Ok(RunSummary {
        steps: state.step,
        reward_first_fifth: first,
        reward_last_fifth: last,
        seconds: started.elapsed().as_secs_f64(),
        checkpoint: latest_checkpoint(out)?,
        plot,
        skipped_rows: source.skipped().map_or((0, 0), |s| (s.corrupt, s.too_long)),
        skipped_steps: skips.total,
        last_validation: metrics.val.last().map(|v| (v.step, v.accuracy)),
        best: retention::best_checkpoint(out),
        rank: ranks.as_ref().map_or(0, |r| r.group.rank()),
    })
}

/// Saves a training checkpoint (with `mark_best`, `best` names it), then
/// (with `keep` > 0) deletes all but the newest `keep` ones and the best;
/// the new one is complete and `latest` points at it before anything is
/// removed. The model's files (config, tokenizer) are
/// read from the checkpoint just written from then on, since the one it
/// was loaded from may be among those deleted.
fn save(
    out: &Path,
    model: &mut Qwen25Vl,
    optimizer: &AdamW,
    state: &TrainingState,
    keep: usize,
    mark_best: bool,
) -> Result<PathBuf, RunError> {
    let dir = save_training_checkpoint(out, model, optimizer, state, &mut |_| {})?;
    model.dir = dir.clone();
    if mark_best {
        retention::set_best(out, &dir)?;
    }
    retention::prune(out, &checkpoint_dirs(out)?, keep, &dir)?;
    Ok(dir)
}

/// The supervised warm-up on the built-in task, logged to `warmup.jsonl`.
fn warmup(
    pipeline: &mut Pipeline,
    cfg: &TrainConfig,
    out: &Path,
    progress: &Progress,
) -> Result<(), RunError> {
    let end_of_turn = pipeline
        .text
        .token_id("<|im_end|>")
        .ok_or_else(|| RunError::Usage("the tokenizer has no <|im_end|>".into()))?;
    // The warm-up trains the host model in fp32; RL then stores its result
    // in the run's precision.
    let mut optimizer = new_optimizer(&pipeline.model, cfg, cfg.warmup_lr, Precision::Fp32);
    let mut source = PromptSource::builtin(
        CountingTask::new(cfg.builtin_grid, cfg.seed ^ WARMUP_SEED_SALT),
        prompt_format(cfg),
        0,
    );
    let path = out.join(WARMUP_FILE);
    let mut log = String::new();
    progress.bar.set_prefix("warm-up");
    progress.bar.set_length(cfg.warmup_steps as u64);
    for step in 1..=cfg.warmup_steps {
        let prompts = next_prompts(&mut source, pipeline, cfg.warmup_batch)?;
        let s = warmup_step(
            pipeline,
            &mut optimizer,
            &prompts,
            end_of_turn,
            cfg.micro_batch,
        )?;
        log.push_str(&format!(
            "{{\"step\":{step},\"loss\":{:.6},\"token_prob\":{:.6}}}\n",
            s.loss, s.token_prob
        ));
        progress.bar.set_position(step as u64);
        progress.bar.set_message(format!("loss {:.3}", s.loss));
        if progress.plain && (step % 5 == 0 || step == cfg.warmup_steps) {
            eprintln!(
                "warm-up step {step:>3} loss {:.4} token prob {:.3}",
                s.loss, s.token_prob
            );
        }
    }
    write_file_atomically(&path, log.as_bytes())?;
    progress.bar.set_length(cfg.max_steps as u64);
    progress.bar.set_position(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_updates_are_counted_and_several_in_a_row_stop_the_run() {
        let mut s = Skips::resume(2);
        assert!(!s.record(0.5, false));
        assert!(s.record(f64::NAN, false), "a NaN loss is skipped");
        assert!(s.record(0.1, true), "the optimizer's skip counts");
        assert!(!s.diverged());
        assert!(!s.record(0.3, false), "a good update resets the streak");
        assert_eq!(
            s,
            Skips {
                total: 4,
                in_a_row: 0
            }
        );
        for k in 1..=MAX_SKIPPED_IN_A_ROW {
            assert!(!s.diverged());
            assert!(s.record(f64::INFINITY, false));
            assert_eq!(s.in_a_row, k);
        }
        assert!(s.diverged());
        assert_eq!(s.total, 4 + MAX_SKIPPED_IN_A_ROW);
    }
}
