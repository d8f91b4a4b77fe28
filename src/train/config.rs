//! The training configuration: a TOML file whose defaults are the published
//! VPPO 7B recipe (shared/docs/vppo.md), every field overridable on the
//! command line as `key=value`, and the resolved config saved with the run.

use crate::ops::Precision;
use crate::rl::{DependencyEstimator, KlEstimator, PerturbSpace, Perturbation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("override `{given}`: {reason}")]
    Override { given: String, reason: String },
    #[error("invalid config: {reason}")]
    Invalid { reason: String },
}

/// `Ok` when `v` is a finite number in the range; else the range in words.
fn check_range(v: f64, lo: f64, hi: f64, lo_in: bool, hi_in: bool) -> Result<(), String> {
    let above = if lo_in { v >= lo } else { v > lo };
    let below = if hi_in { v <= hi } else { v < hi };
    if v.is_finite() && above && below {
        return Ok(());
    }
    Err(if hi == f64::MAX {
        format!("finite and {} {lo}", if lo_in { ">=" } else { ">" })
    } else {
        format!(
            "in {}{lo}, {hi}{}",
            if lo_in { "[" } else { "(" },
            if hi_in { "]" } else { ")" }
        )
    })
}

/// Which objective to train with (`vppo`, or the baselines `dapo`, `grpo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlgoName {
    Vppo,
    Dapo,
    Grpo,
}

/// `precision` in a config: a [`Precision`], or `auto` (by device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// bf16 on a GPU, fp32 on the CPU.
    Auto,
    Bf16,
    Fp32,
}

impl PrecisionSetting {
    /// The precision on `device` (`Cuda` or `Cpu`, resolved).
    pub fn on(self, device: crate::backend::Device) -> Precision {
        match (self, device) {
            (Self::Bf16, _) => Precision::Bf16,
            (Self::Fp32, _) => Precision::Fp32,
            (Self::Auto, crate::backend::Device::Cuda) => Precision::Bf16,
            (Self::Auto, _) => Precision::Fp32,
        }
    }
}

/// The old key `bf16 = true | false` as `precision`; `Err` names the
/// problem (not a boolean, or a `precision` it contradicts).
fn fold_bf16(table: &mut toml::Table) -> Result<(), String> {
    let Some(old) = table.remove("bf16") else {
        return Ok(());
    };
    let Some(on) = old.as_bool() else {
        return Err(format!(
            "bf16 = {old}: the old key takes true or false; write precision = \"bf16\" or \"fp32\""
        ));
    };
    let folded = if on { "bf16" } else { "fp32" };
    if let Some(given) = table.get("precision") {
        if given.as_str() != Some(folded) {
            return Err(format!(
                "bf16 = {on} contradicts precision = {given}: bf16 is the old name of \
                 precision (bf16 = {on} means precision = \"{folded}\"); keep precision only"
            ));
        }
    }
    table.insert("precision".into(), toml::Value::String(folded.into()));
    Ok(())
}

/// The training data: one parquet/JSONL file, or several mixed by
/// `data_weights` (`data = ["a.parquet", "b.jsonl"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataFiles {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl DataFiles {
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Self::One(p) => std::slice::from_ref(p),
            Self::Many(v) => v,
        }
    }
}

impl std::fmt::Display for DataFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        f.write_str(&names.join(" + "))
    }
}

/// EasyR1's names for fields this config calls otherwise: accepted in a
/// file and as overrides, resolved to ours.
const ALIASES: &[(&str, &str)] = &[("save_limit", "keep_checkpoints")];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face checkpoint directory (none: the built-in default model).
    pub model: Option<PathBuf>,
    /// Training data, parquet or JSONL, or a list of such files mixed by
    /// `data_weights` (none: the built-in default task).
    pub data: Option<DataFiles>,
    /// With several data files: the probability of drawing each next
    /// prompt from each (normalised; empty: equal). The mix is a pure
    /// function of the seed, so a resumed run draws the same.
    pub data_weights: Vec<f64>,
    /// Held-out data for validation during training (parquet or JSONL; for
    /// the built-in task, a fixed generated split when unset).
    pub val_data: Option<PathBuf>,
    /// Validate every this many optimizer steps (0: only before training
    /// and at the end).
    pub val_freq: usize,
    /// Validate once before the first update.
    pub val_before_train: bool,
    /// Samples per validation problem (val/accuracy is avg@val_n).
    pub val_n: usize,
    /// Validate on the first this many usable problems (0: all).
    pub val_max_samples: usize,
    /// Write every metric as a TensorBoard scalar under `<run>/tb/`.
    pub tensorboard: bool,
    /// Add KL(policy || frozen initial model) to the loss (EasyR1/verl
    /// `use_kl_loss`; off in the VPPO recipe).
    pub use_kl_loss: bool,
    pub kl_coef: f64,
    /// KL estimator per sampled token: k1, k2, k3 (= low_var_kl).
    pub kl_estimator: KlEstimator,
    /// Score responses with this program instead of the accuracy reward:
    /// run through `sh -c` once per rollout batch, JSON lines in and out.
    pub reward_command: Option<String>,
    /// Longest a reward_command batch may take, in seconds.
    pub reward_timeout_s: f64,
    /// Multi-process runs: how the state is sharded over the ranks. 2
    /// (ZeRO-2): each rank owns 1/N of the fp32 gradients, master weights
    /// and AdamW moments, and holds the whole bf16/fp32 model. 3 (ZeRO-3,
    /// FSDP): the model's weights are sharded too; the update gathers each
    /// block's just before it runs and frees them after, and the whole
    /// model is gathered only for rollouts, validation and saving.
    pub zero_stage: usize,
    /// Multi-process runs: how long a rank waits for the others at a
    /// collective before stopping with an error naming the missing ranks
    /// (NCCL's default watchdog is 30 minutes).
    pub collective_timeout_s: f64,
    pub output_dir: PathBuf,
    pub algo: AlgoName,
    pub seed: u64,
    /// Prompts per rollout batch.
    pub rollout_batch: usize,
    /// Responses per prompt.
    pub group_size: usize,
    /// Prompts per optimizer step (rollout_batch / mini_batch steps per rollout).
    pub mini_batch: usize,
    /// Passes over the data: the run makes `floor(rows / rollout_batch) x
    /// epochs` rollout batches when `max_steps = 0` (EasyR1's
    /// `total_epochs`), restarting the data whenever dynamic sampling needs
    /// more prompts.
    pub epochs: usize,
    /// Shuffle the data every epoch from `seed` (the reference's seeded
    /// `RandomSampler`); false reads it in file order.
    pub shuffle: bool,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub max_grad_norm: f64,
    pub clip_low: f32,
    pub clip_high: f32,
    /// Dual-clip constant for negative advantages (0 disables).
    pub clip_dual: f32,
    pub entropy_penalty: f32,
    pub tgf_ratio: f32,
    pub tas_beta_min: f32,
    /// Probability of perturbing each 14x14 tile in the perturbed pass.
    pub blacken_p: f64,
    /// What a perturbed tile becomes: black (the reference), grey, noise, blur.
    pub perturbation: Perturbation,
    /// Where the tiles are: `patches` (the ViT's 14x14 patches of the
    /// resized image; fused into the GPU's dual pass) or `pixels` (the
    /// reference's: 14-pixel tiles before the processor's resize; host path).
    pub perturb_space: PerturbSpace,
    /// Token visual dependency: k3 (the reference) or exact_kl (full vocabulary).
    pub dependency: DependencyEstimator,
    /// Dynamic sampling bounds on a group's mean accuracy (off for grpo).
    pub dynamic_sampling: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub max_response_tokens: usize,
    pub max_prompt_tokens: usize,
    /// Rollout sequences decoding or prefilling at once (vLLM's name).
    pub max_num_seqs: usize,
    /// Rows of one rollout step: a token per decoding sequence plus
    /// prompt chunks (vLLM's name); at least max_num_seqs.
    pub max_num_batched_tokens: usize,
    /// KV cache: this fraction of the device's free memory (vLLM's
    /// gpu_memory_utilization, of what is free after the weights); 0 sizes
    /// it for the whole rollout batch. Short of blocks, the youngest
    /// sequences are preempted and recomputed.
    pub kv_cache_memory_fraction: f64,
    /// KV cache of exactly this many 16-token blocks (0: unset); the
    /// budget on the CPU, and it wins over the fraction.
    pub kv_cache_blocks: usize,
    /// Decode steps launch op by op instead of replaying captured CUDA
    /// graphs (vLLM's name): for debugging and profiling.
    pub enforce_eager: bool,
    pub min_pixels: usize,
    pub max_pixels: usize,
    /// Appended to every problem after a blank line.
    pub prompt_suffix: String,
    /// Recompute activations in the backward (activation checkpointing).
    pub recompute: bool,
    /// What the weights and activations are stored in: `bf16` (bf16
    /// weights and activations over fp32 master weights and moments; fp32
    /// statistics, loss and gradient accumulation), `fp32`, or `auto`
    /// (bf16 on a GPU, fp32 on the CPU). The old `bf16 = true | false` is
    /// read as `precision = "bf16" | "fp32"`.
    pub precision: PrecisionSetting,
    /// Save a checkpoint every this many optimizer steps.
    pub save_every: usize,
    /// Keep only the newest this many checkpoints, plus the best by
    /// validation accuracy (0: keep all). EasyR1's `save_limit` is accepted.
    pub keep_checkpoints: usize,
    /// Stop at the end of the rollout batch that reaches this many optimizer
    /// steps (0: run `epochs` over the data).
    pub max_steps: usize,
    /// Responses per forward/backward chunk (gradient accumulation); TAS's
    /// mean is over one (EasyR1's `micro_batch_size_per_device_for_update`).
    pub micro_batch: usize,
    /// The most tokens (prompt + response, over the responses) one packed
    /// forward/backward holds (verl's `ppo_max_token_len_per_gpu`): the
    /// old and perturbed log-probs and the update run each micro-batch as
    /// packed batches under it (a longer response runs alone). It bounds
    /// activation memory only: TAS and the loss stay the micro-batch's.
    pub max_tokens_per_micro_batch: usize,
    /// Parts a rollout batch is balanced into by sequence length before the
    /// updates, as the reference's data-parallel ranks (its GPUs): TAS's
    /// range is over one part's mini-batch. 1 keeps the batch's order; a
    /// value that does not divide `mini_batch x group_size` is reduced to
    /// their greatest common divisor.
    pub tas_partitions: usize,
    /// Dynamic sampling: generation batches tried per rollout batch to fill
    /// it with informative groups before training on what there is (0:
    /// until it is full, EasyR1's `max_try_make_batch = -1`).
    pub max_gen_batches: usize,
    /// Supervised warm-up steps on the reference answers before RL (the
    /// built-in task only; 0: none).
    pub warmup_steps: usize,
    pub warmup_lr: f64,
    /// Prompts per warm-up step.
    pub warmup_batch: usize,
    /// Grid side of the built-in counting task (cells x cells shapes).
    pub builtin_grid: usize,
    /// Where rollouts, log-probs, the backward and AdamW run: auto (the GPU
    /// when one is usable), cpu, cuda. The built-in warm-up runs on the CPU
    /// (in fp32). See `precision` for what the device computes in.
    pub device: crate::backend::Device,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            data_weights: Vec::new(),
            val_data: None,
            val_freq: 5,
            val_before_train: true,
            val_n: 1,
            val_max_samples: 0,
            tensorboard: true,
            use_kl_loss: false,
            kl_coef: 1e-2,
            kl_estimator: KlEstimator::K3,
            reward_command: None,
            reward_timeout_s: 300.0,
            zero_stage: 2,
            collective_timeout_s: 1800.0,
            output_dir: PathBuf::from("runs/vppo"),
            algo: AlgoName::Vppo,
            seed: 1,
            rollout_batch: 384,
            group_size: 8,
            mini_batch: 128,
            epochs: 2,
            shuffle: true,
            lr: 1e-6,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            max_grad_norm: 1.0,
            clip_low: 0.2,
            clip_high: 0.28,
            clip_dual: 3.0,
            entropy_penalty: 0.06,
            tgf_ratio: 0.4,
            tas_beta_min: 0.9,
            blacken_p: 0.5,
            perturbation: Perturbation::Black,
            perturb_space: PerturbSpace::Patches,
            dependency: DependencyEstimator::K3,
            dynamic_sampling: true,
            temperature: 1.0,
            top_p: 0.99,
            max_response_tokens: 2048,
            max_prompt_tokens: 4096,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            kv_cache_memory_fraction: 0.0,
            kv_cache_blocks: 0,
            enforce_eager: false,
            min_pixels: 200_704,
            max_pixels: 1_003_520,
            prompt_suffix: crate::data::VPPO_PROMPT_SUFFIX.to_string(),
            recompute: false,
            precision: PrecisionSetting::Auto,
            save_every: 10,
            keep_checkpoints: 0,
            max_steps: 0,
            micro_batch: 16,
            max_tokens_per_micro_batch: crate::train::step::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
            tas_partitions: 8,
            max_gen_batches: 0,
            warmup_steps: 0,
            warmup_lr: 1e-3,
            warmup_batch: 32,
            builtin_grid: 2,
            device: crate::backend::Device::Auto,
        }
    }
}

/// What `vppo-engine train` changes when neither a model nor a data set is
/// given: the built-in tiny model on the built-in counting task, sized to
/// learn in minutes on a laptop CPU. Fields set by the user still win.
const BUILTIN_PRESET: &str = r#"
output_dir = "runs/builtin"
rollout_batch = 16
group_size = 8
mini_batch = 8
lr = 1e-3
weight_decay = 0.0
max_steps = 300
micro_batch = 64
tas_partitions = 1
max_gen_batches = 3
max_response_tokens = 8
max_prompt_tokens = 256
min_pixels = 3136
max_pixels = 3136
prompt_suffix = ""
save_every = 10
warmup_steps = 60
warmup_lr = 2e-3
warmup_batch = 32
keep_checkpoints = 3
val_freq = 25
val_n = 4
"#;

impl TrainConfig {
    /// Reads a TOML file; fields it leaves out keep the recipe defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse_file_text(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// A config file's text alone (EasyR1's names and the old `bf16` key
    /// resolved); `Err` is the reason, for the caller to name the file.
    fn parse_file_text(text: &str) -> Result<Self, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let renamed = |k: &String| k == "bf16" || ALIASES.iter().any(|(alias, _)| alias == k);
        if !table.keys().any(renamed) {
            // The text itself: its errors point at the user's lines.
            return toml::from_str(text).map_err(|e: toml::de::Error| e.to_string());
        }
        let mut table = resolve_aliases(table);
        fold_bf16(&mut table)?;
        let text = toml::to_string(&table).expect("a table serializes");
        toml::from_str(&text).map_err(|e: toml::de::Error| e.to_string())
    }

    /// The run's config: recipe defaults, then the built-in preset when the
    /// user names neither `model` nor `data`, then the file, then the
    /// command-line `key=value` overrides.
    pub fn resolve(file: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(Self::default()).expect("the config serializes");
        let file_text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?,
            ),
            None => None,
        };
        let file_table = match (&file_text, file) {
            (Some(text), Some(path)) => {
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?
            }
            _ => toml::Table::new(),
        };
        let mut file_table = resolve_aliases(file_table);
        if let Some(path) = file {
            fold_bf16(&mut file_table).map_err(|reason| ConfigError::Parse {
                path: path.to_path_buf(),
                reason,
            })?;
        }
        let pairs = parse_overrides(overrides)?;
        let names_input =
            |key: &str| file_table.contains_key(key) || pairs.iter().any(|(k, _)| k == key);
        if !names_input("model") && !names_input("data") {
            let preset: toml::Table = BUILTIN_PRESET.parse().expect("the preset parses");
            table.extend(preset);
        }
        table.extend(file_table);
        table.extend(pairs);
        let text = toml::to_string(&table).expect("a table serializes");
        let cfg: Self = toml::from_str(&text).map_err(|merged| {
            // Report the error against what the user wrote (the file's own
            // lines, or the one override), not the merged document.
            if let (Some(text), Some(path)) = (&file_text, file) {
                if let Err(reason) = Self::parse_file_text(text) {
                    return ConfigError::Parse {
                        path: path.to_path_buf(),
                        reason,
                    };
                }
            }
            override_error(overrides).unwrap_or_else(|| ConfigError::Override {
                given: overrides.join(" "),
                reason: merged.message().to_string(),
            })
        })?;
        cfg.validate()
    }

    /// Whether this run uses the built-in model and task.
    pub fn is_builtin(&self) -> bool {
        self.model.is_none() && self.data.is_none()
    }

    /// Applies `key=value` overrides (values in TOML syntax; bare words are
    /// taken as strings), then checks the result.
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(&self).expect("the config serializes to a table");
        table.extend(parse_overrides(overrides)?);
        let text = toml::to_string(&table).expect("a table serializes");
        let cfg: Self = toml::from_str(&text).map_err(|merged| {
            override_error(overrides).unwrap_or_else(|| ConfigError::Override {
                given: overrides.join(" "),
                reason: merged.message().to_string(),
            })
        })?;
        cfg.validate()
    }

    /// Every numeric field against its allowed range, once, as the config
    /// is resolved; the message names the field and the range.
    fn validate(self) -> Result<Self, ConfigError> {
        let bad = |reason: String| Err(ConfigError::Invalid { reason });
        // (name, value, lowest, highest, whether each end is included)
        let reals: [(&str, f64, f64, f64, bool, bool); 14] = [
            ("lr", self.lr, 0.0, 1.0, true, true),
            ("warmup_lr", self.warmup_lr, 0.0, 1.0, true, true),
            ("weight_decay", self.weight_decay, 0.0, 1.0, true, true),
            ("beta1", self.beta1, 0.0, 1.0, true, false),
            ("beta2", self.beta2, 0.0, 1.0, true, false),
            (
                "max_grad_norm",
                self.max_grad_norm,
                0.0,
                f64::MAX,
                false,
                true,
            ),
            ("clip_low", self.clip_low as f64, 0.0, 1.0, true, false),
            ("clip_high", self.clip_high as f64, 0.0, 10.0, true, true),
            (
                "entropy_penalty",
                self.entropy_penalty as f64,
                -10.0,
                10.0,
                true,
                true,
            ),
            ("tgf_ratio", self.tgf_ratio as f64, 0.0, 1.0, true, true),
            (
                "tas_beta_min",
                self.tas_beta_min as f64,
                0.0,
                1.0,
                true,
                true,
            ),
            ("blacken_p", self.blacken_p, 0.0, 1.0, true, true),
            (
                "temperature",
                self.temperature as f64,
                0.0,
                100.0,
                true,
                true,
            ),
            ("top_p", self.top_p as f64, 0.0, 1.0, false, true),
        ];
        for (name, v, lo, hi, lo_in, hi_in) in reals {
            if let Err(range) = check_range(v, lo, hi, lo_in, hi_in) {
                return bad(format!("{name} = {v} is out of range: it must be {range}"));
            }
        }
        if self.clip_dual != 0.0 && !(self.clip_dual > 1.0 && self.clip_dual <= 1e6) {
            return bad(format!(
                "clip_dual = {} is out of range: it must be 0 (off) or in (1, 1e6]",
                self.clip_dual
            ));
        }
        if !(0.0..=1.0).contains(&self.kv_cache_memory_fraction) {
            return bad(format!(
                "kv_cache_memory_fraction = {} is out of range: it must be in [0, 1] (0: the whole batch)",
                self.kv_cache_memory_fraction
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(format!(
                "max_num_batched_tokens = {} must be at least max_num_seqs = {}",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        let counts: [(&str, usize); 14] = [
            (
                "max_tokens_per_micro_batch",
                self.max_tokens_per_micro_batch,
            ),
            ("max_num_seqs", self.max_num_seqs),
            ("tas_partitions", self.tas_partitions),
            ("group_size", self.group_size),
            ("rollout_batch", self.rollout_batch),
            ("mini_batch", self.mini_batch),
            ("micro_batch", self.micro_batch),
            ("save_every", self.save_every),
            ("max_response_tokens", self.max_response_tokens),
            ("max_prompt_tokens", self.max_prompt_tokens),
            ("epochs", self.epochs),
            ("warmup_batch", self.warmup_batch),
            ("min_pixels", self.min_pixels),
            ("max_pixels", self.max_pixels),
        ];
        for (name, v) in counts {
            if v == 0 {
                return bad(format!("{name} = 0 is out of range: it must be at least 1"));
            }
        }
        if self.rollout_batch % self.mini_batch != 0 {
            return bad(format!(
                "rollout_batch = {} must be a multiple of mini_batch = {}",
                self.rollout_batch, self.mini_batch
            ));
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels = {} exceeds max_pixels = {}: min_pixels must be at most max_pixels",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.val_n == 0 {
            return bad("val_n = 0 is out of range: it must be at least 1".into());
        }
        if let Err(range) = check_range(self.kl_coef, 0.0, 1e3, true, true) {
            return bad(format!(
                "kl_coef = {} is out of range: it must be {range}",
                self.kl_coef
            ));
        }
        if let Err(range) = check_range(self.reward_timeout_s, 0.0, 1e6, false, true) {
            return bad(format!(
                "reward_timeout_s = {} is out of range: it must be {range}",
                self.reward_timeout_s
            ));
        }
        if let Err(range) = check_range(self.collective_timeout_s, 0.0, 1e6, false, true) {
            return bad(format!(
                "collective_timeout_s = {} is out of range: it must be {range}",
                self.collective_timeout_s
            ));
        }
        if !(2..=3).contains(&self.zero_stage) {
            return bad(format!(
                "zero_stage = {} is out of range: it must be 2 (optimizer state and gradients \
                 sharded) or 3 (the weights too)",
                self.zero_stage
            ));
        }
        if self
            .reward_command
            .as_ref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return bad("reward_command is empty: name a program, or leave it out".into());
        }
        let files = self.data.as_ref().map_or(0, |d| d.paths().len());
        if self.data.is_some() && files == 0 {
            return bad("data = []: name at least one file".into());
        }
        if !self.data_weights.is_empty() {
            if self.data_weights.len() != files {
                return bad(format!(
                    "data_weights has {} entries for {files} data file(s): give one weight per file",
                    self.data_weights.len()
                ));
            }
            if let Some(w) = self
                .data_weights
                .iter()
                .find(|w| !(w.is_finite() && **w >= 0.0))
            {
                return bad(format!("data_weights: {w} is not a finite weight >= 0"));
            }
            if self.data_weights.iter().sum::<f64>() <= 0.0 {
                return bad("data_weights are all 0: at least one must be positive".into());
            }
        }
        if !self.is_builtin() && self.warmup_steps > 0 {
            return bad("warmup_steps needs the built-in task (no model, no data)".into());
        }
        if self.is_builtin() && !(1..=3).contains(&self.builtin_grid) {
            return bad(format!(
                "builtin_grid = {} is out of range: it must be 1, 2 or 3",
                self.builtin_grid
            ));
        }
        if self.data.is_none() && self.max_steps == 0 {
            return bad(
                "max_steps = 0 means \"until the data runs out\", but the built-in task never \
                 does: set max_steps to at least 1"
                    .into(),
            );
        }
        Ok(self)
    }

    /// The resolved config as TOML, saved with every run.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
}

/// The first override that is wrong on its own (unknown key, wrong type),
/// with the deserializer's message.
fn override_error(overrides: &[String]) -> Option<ConfigError> {
    overrides.iter().find_map(|given| {
        let pairs = parse_overrides(std::slice::from_ref(given)).ok()?;
        let table: toml::Table = pairs.into_iter().collect();
        let text = toml::to_string(&table).ok()?;
        toml::from_str::<TrainConfig>(&text)
            .err()
            .map(|e| ConfigError::Override {
                given: given.clone(),
                reason: e.message().to_string(),
            })
    })
}

fn parse_overrides(overrides: &[String]) -> Result<Vec<(String, toml::Value)>, ConfigError> {
    overrides
        .iter()
        .map(|given| {
            let (key, raw) = given.split_once('=').ok_or_else(|| ConfigError::Override {
                given: given.clone(),
                reason: "expected key=value".into(),
            })?;
            let key = key.trim().replace('-', "_");
            let key = ALIASES
                .iter()
                .find(|(alias, _)| *alias == key)
                .map_or(key.clone(), |(_, ours)| ours.to_string());
            Ok((key, parse_value(raw.trim())))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|pairs| {
            // The old `bf16` key, as `precision` (a later override wins).
            let mut folded = Vec::with_capacity(pairs.len());
            for (key, value) in pairs {
                if key != "bf16" {
                    folded.push((key, value));
                    continue;
                }
                let mut one = toml::Table::new();
                one.insert(key.clone(), value.clone());
                let given = overrides
                    .iter()
                    .find(|o| o.trim_start().replace('-', "_").starts_with("bf16"))
                    .cloned()
                    .unwrap_or_else(|| format!("bf16={value}"));
                fold_bf16(&mut one).map_err(|reason| ConfigError::Override {
                    given: given.clone(),
                    reason,
                })?;
                folded.extend(one);
            }
            Ok(folded)
        })
}

/// A file's table with EasyR1's names replaced by ours.
fn resolve_aliases(table: toml::Table) -> toml::Table {
    table
        .into_iter()
        .map(|(k, v)| {
            let k = ALIASES
                .iter()
                .find(|(alias, _)| *alias == k)
                .map_or(k.clone(), |(_, ours)| ours.to_string());
            (k, v)
        })
        .collect()
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as a TOML value when it is one (numbers, booleans, quoted
    // strings); otherwise it is a bare string such as a path.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_is_auto_by_default_bf16_on_a_gpu_and_fp32_on_the_cpu() {
        use crate::backend::Device;
        let c = TrainConfig::resolve(None, &[]).unwrap();
        assert_eq!(c.precision, PrecisionSetting::Auto);
        assert_eq!(c.precision.on(Device::Cuda), Precision::Bf16);
        assert_eq!(c.precision.on(Device::Cpu), Precision::Fp32);
        let c = TrainConfig::resolve(None, &["precision=bf16".into()]).unwrap();
        assert_eq!(c.precision.on(Device::Cpu), Precision::Bf16);
        assert!(c.to_toml().contains("precision = \"bf16\""));
        let c = TrainConfig::resolve(None, &["precision=fp32".into()]).unwrap();
        assert_eq!(c.precision.on(Device::Cuda), Precision::Fp32);
        let e = TrainConfig::resolve(None, &["precision=fp16".into()]).unwrap_err();
        assert!(e.to_string().contains("precision=fp16"), "{e}");
    }

    #[test]
    fn the_old_bf16_key_reads_as_precision_or_fails_clearly() {
        let over = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            TrainConfig::resolve(None, &o)
        };
        assert_eq!(
            over(&["bf16=true"]).unwrap().precision,
            PrecisionSetting::Bf16
        );
        assert_eq!(
            over(&["bf16=false"]).unwrap().precision,
            PrecisionSetting::Fp32
        );
        let e = over(&["bf16=maybe"]).unwrap_err().to_string();
        assert!(
            e.contains("bf16=maybe") && e.contains("true or false"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("vppo-cfg-bf16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.toml");
        std::fs::write(&path, "bf16 = true\n").unwrap();
        let c = TrainConfig::resolve(Some(&path), &[]).unwrap();
        assert_eq!(c.precision, PrecisionSetting::Bf16);
        assert_eq!(
            TrainConfig::load(&path).unwrap().precision,
            PrecisionSetting::Bf16
        );
        // The resolved config saved with a run names precision only.
        assert!(!c.to_toml().contains("bf16 ="), "{}", c.to_toml());
        std::fs::write(&path, "bf16 = true\nprecision = \"fp32\"\n").unwrap();
        let e = TrainConfig::resolve(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("old.toml")
                && e.contains("contradicts")
                && e.contains("keep precision only"),
            "{e}"
        );
        std::fs::write(&path, "bf16 = false\nprecision = \"fp32\"\n").unwrap();
        assert_eq!(
            TrainConfig::resolve(Some(&path), &[]).unwrap().precision,
            PrecisionSetting::Fp32
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_are_the_published_recipe() {
        let c = TrainConfig::default();
        assert_eq!(
            (c.group_size, c.rollout_batch, c.mini_batch, c.epochs),
            (8, 384, 128, 2)
        );
        assert_eq!((c.lr, c.weight_decay, c.max_grad_norm), (1e-6, 0.01, 1.0));
        assert_eq!((c.clip_low, c.clip_high, c.clip_dual), (0.2, 0.28, 3.0));
        assert_eq!(
            (c.entropy_penalty, c.tgf_ratio, c.tas_beta_min),
            (0.06, 0.4, 0.9)
        );
        assert_eq!(
            (c.min_pixels, c.max_pixels),
            (256 * 28 * 28, 1280 * 28 * 28)
        );
        assert_eq!(
            (
                c.temperature,
                c.top_p,
                c.max_response_tokens,
                c.max_prompt_tokens
            ),
            (1.0, 0.99, 2048, 4096)
        );
    }

    #[test]
    fn files_and_overrides_change_fields_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("vppo-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            "algo = \"dapo\"\nlr = 2e-6\nmodel = \"/models/qwen\"\ndata = \"d.jsonl\"\n",
        )
        .unwrap();
        let c = TrainConfig::load(&path).unwrap();
        assert_eq!((c.algo, c.lr), (AlgoName::Dapo, 2e-6));
        assert_eq!(c.model, Some(PathBuf::from("/models/qwen")));
        assert_eq!(c.group_size, 8, "unset fields keep the recipe defaults");
        let c = c
            .with_overrides(&[
                "group-size=4".into(),
                "algo=grpo".into(),
                "output_dir=/tmp/run 1".into(),
                "recompute=true".into(),
            ])
            .unwrap();
        assert_eq!(
            (c.group_size, c.algo, c.recompute),
            (4, AlgoName::Grpo, true)
        );
        assert_eq!(c.output_dir, PathBuf::from("/tmp/run 1"));
        let again: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_builtin_preset_applies_only_without_model_and_data() {
        let c = TrainConfig::resolve(None, &[]).unwrap();
        assert!(c.is_builtin());
        assert_eq!(
            (c.rollout_batch, c.max_steps, c.prompt_suffix.as_str()),
            (16, 300, "")
        );
        let c = TrainConfig::resolve(None, &["max_steps=3".into()]).unwrap();
        assert_eq!(
            (c.max_steps, c.rollout_batch),
            (3, 16),
            "the user's value wins"
        );
        let c = TrainConfig::resolve(None, &["data=train.parquet".into()]).unwrap();
        assert_eq!((c.rollout_batch, c.max_steps), (384, 0), "recipe defaults");
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let err = TrainConfig::default()
            .with_overrides(&["lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lrr"), "{err}");
        let err = TrainConfig::default()
            .with_overrides(&["lr".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key=value"), "{err}");
        let err = TrainConfig::default()
            .with_overrides(&["group_size=many".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("group_size"), "{err}");
        let err = TrainConfig::default()
            .with_overrides(&["mini_batch=100".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple"), "{err}");
        let dir = std::env::temp_dir().join(format!("vppo-cfg-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "algo = \"ppo\"\n").unwrap();
        let err = TrainConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("ppo"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_errors_give_the_users_own_line_numbers() {
        let dir = std::env::temp_dir().join(format!("vppo-cfg-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("two.toml");
        std::fs::write(&path, "lr = 1e-6\nclip_low = \"wide\"\n").unwrap();
        let err = TrainConfig::resolve(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("two.toml") && err.contains("line 2") && err.contains("clip_low"),
            "{err}"
        );
        std::fs::write(&path, "lr = 1e-6\n").unwrap();
        let err = TrainConfig::resolve(Some(&path), &["max_steps=1".into(), "beta1=x".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`beta1=x`") && !err.contains("line 1"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn easyr1_names_data_lists_and_the_new_settings_are_checked() {
        let c = TrainConfig::resolve(None, &["save_limit=2".into()]).unwrap();
        assert_eq!(c.keep_checkpoints, 2, "save_limit is keep_checkpoints");
        let dir = std::env::temp_dir().join(format!("vppo-cfg-alias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.toml");
        std::fs::write(
            &path,
            "save_limit = 4\ndata = [\"a.parquet\", \"b.jsonl\"]\ndata_weights = [3, 1]\n",
        )
        .unwrap();
        let c = TrainConfig::resolve(Some(&path), &[]).unwrap();
        assert_eq!(c.keep_checkpoints, 4);
        assert_eq!(
            c.data.as_ref().unwrap().paths(),
            [PathBuf::from("a.parquet"), PathBuf::from("b.jsonl")]
        );
        assert_eq!(c.data_weights, vec![3.0, 1.0]);
        // One file is still a plain string, and round-trips.
        let c = TrainConfig::resolve(None, &["data=train.parquet".into()]).unwrap();
        assert_eq!(c.data, Some(DataFiles::One("train.parquet".into())));
        let again: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);
        std::fs::remove_dir_all(&dir).unwrap();
        // Off by default: the VPPO recipe has no KL loss and no custom reward.
        let c = TrainConfig::default();
        assert!(!c.use_kl_loss && c.reward_command.is_none() && c.tensorboard);
        let c = TrainConfig::resolve(None, &["kl_estimator=low_var_kl".into()]).unwrap();
        assert_eq!(c.kl_estimator, KlEstimator::K3);
        let builtin = TrainConfig::resolve(None, &[]).unwrap();
        assert_eq!(
            builtin.keep_checkpoints, 3,
            "the built-in run keeps a handful"
        );
        for (given, want) in [
            (
                vec!["data=[\"a.jsonl\", \"b.jsonl\"]", "data_weights=[1]"],
                "one weight per file",
            ),
            (
                vec!["data=[\"a.jsonl\", \"b.jsonl\"]", "data_weights=[1, -1]"],
                "data_weights",
            ),
            (
                vec!["data=[\"a.jsonl\", \"b.jsonl\"]", "data_weights=[0, 0]"],
                "all 0",
            ),
            (vec!["data=[]"], "at least one file"),
            (vec!["val_n=0"], "val_n"),
            (vec!["kl_coef=-1"], "kl_coef"),
            (vec!["reward_timeout_s=0"], "reward_timeout_s"),
            (vec!["reward_command=''"], "reward_command"),
        ] {
            let given: Vec<String> = given.into_iter().map(String::from).collect();
            let err = TrainConfig::resolve(None, &given).unwrap_err().to_string();
            assert!(err.contains(want), "{given:?}: {err}");
        }
    }

    #[test]
    fn every_numeric_field_is_checked_against_its_range() {
        let cases = [
            ("lr=-1", "lr", "[0, 1]"),
            ("lr=nan", "lr", "[0, 1]"),
            ("warmup_lr=inf", "warmup_lr", "[0, 1]"),
            ("weight_decay=-5", "weight_decay", "[0, 1]"),
            ("beta1=2", "beta1", "[0, 1)"),
            ("beta2=1.0", "beta2", "[0, 1)"),
            ("max_grad_norm=0", "max_grad_norm", "> 0"),
            ("max_grad_norm=nan", "max_grad_norm", "> 0"),
            ("clip_low=1.5", "clip_low", "[0, 1)"),
            ("clip_high=-1", "clip_high", "[0, 10]"),
            ("clip_dual=0.5", "clip_dual", "(1, 1e6]"),
            ("entropy_penalty=nan", "entropy_penalty", "[-10, 10]"),
            ("tas_beta_min=2", "tas_beta_min", "[0, 1]"),
            ("tgf_ratio=1.5", "tgf_ratio", "[0, 1]"),
            ("blacken_p=nan", "blacken_p", "[0, 1]"),
            ("temperature=nan", "temperature", "[0, 100]"),
            ("top_p=0", "top_p", "(0, 1]"),
            ("warmup_batch=0", "warmup_batch", "at least 1"),
            ("epochs=0", "epochs", "at least 1"),
            ("max_prompt_tokens=0", "max_prompt_tokens", "at least 1"),
            ("min_pixels=9999999", "min_pixels", "at most max_pixels"),
            ("max_steps=0", "max_steps", "at least 1"),
            ("builtin_grid=4", "builtin_grid", "1, 2 or 3"),
        ];
        for (given, field, range) in cases {
            let err = TrainConfig::resolve(None, &[given.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains(range), "{given}: {err}");
        }
        // The edges that are allowed.
        for ok in [
            "lr=0",
            "beta2=0.9999",
            "clip_dual=0",
            "clip_low=0",
            "temperature=0",
            "top_p=1",
            "entropy_penalty=-0.01",
        ] {
            TrainConfig::resolve(None, &[ok.to_string()]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // max_steps = 0 is "run the epochs" on a data set.
        let c = TrainConfig::resolve(None, &["data=d.jsonl".into()]).unwrap();
        assert_eq!(c.max_steps, 0);
    }
}
