//! The memory plan of a training run on one GPU: what the device holds for
//! the whole run (weights, fp32 master weights, AdamW moments, fp32
//! gradients, the frozen reference of the KL loss), and what each phase
//! adds on top (a training micro-batch's activations at the token budget
//! with and without recompute, the rollout batch's KV cache, the scoring
//! passes), with the workspace of each; and whether the peak fits.
//!
//! Host arithmetic only. `vppo-engine plan` prints it; `train` runs the same
//! plan before it allocates anything on a GPU and stops with the table when
//! it does not fit. The activation counts follow what the graph keeps
//! (`model::acts::BlockActs`, `vision::MergerActs`, `text::TextActs`,
//! `forward::Forward`); `tests` check them against the buffers a real
//! forward keeps.

use super::config::{AlgoName, TrainConfig};
use crate::model::config::ModelConfig;
use crate::model::forward::LOSS_CHUNK_ROWS;
use crate::model::params::ParamLayout;
use crate::rollout::decode_graph::row_bucket;
use crate::rollout::generate::{kv_block_bound, KV_BLOCK_SIZE};
use std::fmt::Write as _;

const GIB: f64 = (1u64 << 30) as f64;

/// cuBLASLt's workspace on Hopper (`backend::cuda::gemm`: 32 MiB).
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// How the device stores weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16 weights and activations over fp32 master weights (issue #13's
    /// layout: masters, moments and gradients all fp32 on the device).
    Bf16,
    /// fp32 everywhere; the weights are the masters.
    Fp32,
}

impl Precision {
    /// The run's precision. The one place that reads the config's switch.
    pub fn of(cfg: &TrainConfig) -> Self {
        // The plan is for the GPU, where `auto` means bf16.
        match cfg.precision.on(crate::backend::Device::Cuda) {
            crate::ops::Precision::Bf16 => Self::Bf16,
            crate::ops::Precision::Fp32 => Self::Fp32,
        }
    }
    /// Bytes of a weight, an activation or a cached key/value.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Bf16 => 2,
            Self::Fp32 => 4,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Fp32 => "fp32",
        }
    }
}

/// The shapes of one training micro-batch (packed into one forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatch {
    pub seqs: usize,
    /// All tokens of the packed batch (image tokens included).
    pub tokens: usize,
    pub image_tokens: usize,
    /// Vision patches (= image tokens x the merge unit).
    pub patches: usize,
    /// Response tokens scored by the loss head.
    pub response_tokens: usize,
}

/// The shapes of one rollout batch (one `generate` call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutBatch {
    pub prompts: usize,
    pub samples: usize,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
}

/// Everything the plan is sized from.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub precision: Precision,
    pub recompute: bool,
    /// A frozen reference model on the device (the KL loss).
    pub reference: bool,
    pub micro_batch: MicroBatch,
    /// Micro-batches of a scoring pass: 2 for VPPO's dual pass (originals
    /// and perturbed twins in one forward), else 1.
    pub scoring_copies: usize,
    /// This rank's share of the rollout batch.
    pub rollout: RolloutBatch,
    /// Data-parallel ranks (GPUs) the run is spread over: each rolls out
    /// its share of the prompts and owns 1/N of the optimizer state
    /// (ZeRO-2).
    pub gpus: usize,
    /// 2: optimizer state and gradients sharded over the GPUs; 3: the
    /// weights too (a unit gathered at a time in the update, the whole
    /// model for rollouts and scoring).
    pub zero_stage: usize,
    /// How the rollouts' KV cache is sized.
    pub kv_cache: KvSizing,
    /// Sequences decoding at once: the decode step's logits rows.
    pub max_num_seqs: usize,
    /// Decode steps replayed from CUDA graphs (not `enforce_eager`): each
    /// row bucket keeps its logits, and the graphs their temporaries.
    pub decode_graphs: bool,
}

/// How the rollouts' KV cache is sized (the train config's settings, as
/// `rollout::generate::RolloutLimits` reads them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSizing {
    /// For the whole rollout batch at once (no setting).
    WholeBatch,
    /// `kv_cache_blocks` blocks.
    Blocks(usize),
    /// `kv_cache_memory_fraction` of the memory free when rollouts start
    /// (what the whole-run rows leave); sequences beyond it wait or are
    /// preempted.
    Fraction(f64),
}

impl Workload {
    /// The workload of a training config: `micro_batch` responses of
    /// `max_prompt_tokens + max_response_tokens` tokens, bounded by
    /// `max_tokens_per_micro_batch` when set (never below one sequence,
    /// which then runs alone); each prompt with one image of
    /// at most `max_pixels`; a rollout batch of `rollout_batch` prompts x
    /// `group_size` samples at the longest prompt and response.
    pub fn of(cfg: &TrainConfig, model: &ModelConfig) -> Self {
        let vc = &model.vision;
        let seq_len = cfg.max_prompt_tokens + cfg.max_response_tokens;
        let unpacked = cfg.micro_batch * seq_len;
        // A response longer than the budget runs alone.
        let tokens = match cfg.max_tokens_per_micro_batch {
            0 => unpacked,
            budget => budget.max(seq_len).min(unpacked),
        };
        let seqs = cfg.micro_batch.min(tokens.div_ceil(seq_len.max(1)).max(1));
        let pixels_per_token = (vc.patch_size * vc.spatial_merge_size).pow(2);
        let per_image = (cfg.max_pixels / pixels_per_token.max(1)).min(cfg.max_prompt_tokens);
        let image_tokens = (seqs * per_image).min(tokens);
        Self {
            precision: Precision::of(cfg),
            recompute: cfg.recompute,
            reference: cfg.use_kl_loss,
            micro_batch: MicroBatch {
                seqs,
                tokens,
                image_tokens,
                patches: image_tokens * vc.merge_unit(),
                response_tokens: (seqs * cfg.max_response_tokens).min(tokens),
            },
            scoring_copies: if cfg.algo == AlgoName::Vppo { 2 } else { 1 },
            rollout: RolloutBatch {
                prompts: cfg.rollout_batch,
                samples: cfg.group_size,
                prompt_tokens: cfg.max_prompt_tokens,
                response_tokens: cfg.max_response_tokens,
            },
            gpus: 1,
            zero_stage: cfg.zero_stage,
            kv_cache: if cfg.kv_cache_blocks > 0 {
                KvSizing::Blocks(cfg.kv_cache_blocks)
            } else if cfg.kv_cache_memory_fraction > 0.0 {
                KvSizing::Fraction(cfg.kv_cache_memory_fraction)
            } else {
                KvSizing::WholeBatch
            },
            max_num_seqs: cfg.max_num_seqs,
            decode_graphs: !cfg.enforce_eager,
        }
    }

    /// The same run spread over `gpus` data-parallel ranks: each rolls out
    /// at most `ceil(rollout_batch / gpus)` prompts.
    pub fn on_gpus(mut self, gpus: usize, rollout_batch: usize) -> Self {
        let gpus = gpus.max(1);
        self.gpus = gpus;
        self.rollout.prompts = rollout_batch.div_ceil(gpus);
        self
    }
}

/// Widths of one pre-norm transformer block (`model::block::BlockWiring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockWidths {
    pub hidden: u64,
    pub intermediate: u64,
    pub q: u64,
    pub kv: u64,
    pub q_heads: u64,
}

impl BlockWidths {
    pub fn text(cfg: &ModelConfig) -> Self {
        let t = &cfg.text;
        Self {
            hidden: t.hidden_size as u64,
            intermediate: t.intermediate_size as u64,
            q: (t.num_heads * t.head_dim) as u64,
            kv: (t.num_kv_heads * t.head_dim) as u64,
            q_heads: t.num_heads as u64,
        }
    }
    pub fn vision(cfg: &ModelConfig) -> Self {
        let v = &cfg.vision;
        Self {
            hidden: v.hidden_size as u64,
            intermediate: v.intermediate_size as u64,
            q: v.hidden_size as u64,
            kv: v.hidden_size as u64,
            q_heads: v.num_heads as u64,
        }
    }
    /// Per row, what `block_fwd` returns (`BlockActs`): x_in, h1, x_mid,
    /// h2 (4 x hidden), q and attn (2 x q), k and v (2 x kv), gate, up and
    /// act (3 x intermediate), in the activation dtype.
    pub fn acts_per_row(&self) -> u64 {
        4 * self.hidden + 2 * self.q + 2 * self.kv + 3 * self.intermediate
    }
    /// Per row, the fp32 statistics of `BlockActs`: rstd1, rstd2 and the
    /// attention's log-sum-exp per query head.
    pub fn stats_per_row(&self) -> u64 {
        2 + self.q_heads
    }
    /// Per row, the activation gradients `block_bwd` holds at its end (its
    /// locals live until it returns): d_act, d_gate, d_up (3 x
    /// intermediate), d_h2, two d_norm, d_h1 and the dx of one
    /// `project_bwd_add` (5 x hidden), d_attn, dq, dq_raw (3 x q), dk, dv,
    /// dk_raw (3 x kv).
    pub fn backward_per_row(&self) -> u64 {
        3 * self.intermediate + 5 * self.hidden + 3 * self.q + 3 * self.kv
    }
}

/// Elements a forward keeps for its backward, split by storage: activations
/// (the precision's dtype) and fp32 statistics and inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kept {
    pub acts: u64,
    pub fp32: u64,
}

impl Kept {
    pub fn elements(&self) -> u64 {
        self.acts + self.fp32
    }
    pub fn bytes(&self, p: Precision) -> u64 {
        self.acts * p.bytes() + self.fp32 * 4
    }
}

/// What a training forward of `mb` keeps until its backward: every block's
/// activations (or, with `recompute`, only each block's input), the
/// merger's activations, the decoder's final-norm input and statistics,
/// the final hidden states, the vision embeddings, the pixels, and the loss
/// head's log-sum-exp and entropy per scored token.
pub fn kept_by_forward(cfg: &ModelConfig, mb: &MicroBatch, recompute: bool) -> Kept {
    let (text, vision) = (BlockWidths::text(cfg), BlockWidths::vision(cfg));
    let (t, n) = (mb.tokens as u64, mb.patches as u64);
    let layers = cfg.text.num_layers as u64;
    let depth = if n > 0 { cfg.vision.depth as u64 } else { 0 };
    let blocks = |w: &BlockWidths, rows: u64, count: u64| -> Kept {
        if recompute {
            Kept {
                acts: count * rows * w.hidden,
                fp32: 0,
            }
        } else {
            Kept {
                acts: count * rows * w.acts_per_row(),
                fp32: count * rows * w.stats_per_row(),
            }
        }
    };
    let tb = blocks(&text, t, layers);
    let vb = blocks(&vision, n, depth);
    let h = text.hidden;
    // Merger: x_in and normed [N, vh], fc1 and gelu [N / unit, unit * vh]
    // (N x vh each); rstd [N].
    let merger = Kept {
        acts: 4 * n * vision.hidden,
        fp32: n,
    };
    // final_in and hidden [T, H], vision_embeds [image tokens, H].
    let decoder_out = Kept {
        acts: 2 * t * h + mb.image_tokens as u64 * h,
        fp32: t,
    };
    let inputs = Kept {
        acts: 0,
        fp32: n * cfg.vision.patch_dim() as u64 + 2 * mb.response_tokens as u64,
    };
    [tb, vb, merger, decoder_out, inputs]
        .iter()
        .fold(Kept::default(), |a, k| Kept {
            acts: a.acts + k.acts,
            fp32: a.fp32 + k.fp32,
        })
}

/// The bytes of one plan row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub bytes: u64,
    /// Counted in the peak (a row shown for comparison is not).
    pub counted: bool,
}

/// A phase of the run: what it adds on top of the persistent rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub title: String,
    pub rows: Vec<Row>,
}

impl Phase {
    pub fn bytes(&self) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.counted)
            .map(|r| r.bytes)
            .sum()
    }
}

/// The plan of one workload on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub params: u64,
    pub vision_params: u64,
    pub workload: Workload,
    pub gpu_bytes: u64,
    /// Held for the whole run.
    pub persistent: Vec<Row>,
    pub phases: Vec<Phase>,
}

fn row(label: impl Into<String>, bytes: u64) -> Row {
    Row {
        label: label.into(),
        bytes,
        counted: true,
    }
}

impl MemoryPlan {
    pub fn new(cfg: &ModelConfig, w: &Workload, gpu_bytes: u64) -> Self {
        let layout = ParamLayout::new(cfg);
        let params = layout.numel() as u64;
        let vision_params = layout
            .specs
            .iter()
            .filter(|s| s.name.starts_with("visual."))
            .map(|s| s.numel() as u64)
            .sum();
        let p = w.precision;
        let n = w.gpus.max(1) as u64;
        let zero3 = n > 1 && w.zero_stage == 3;
        let share = if n > 1 {
            format!(" (1/{n} shard, ZeRO-{})", w.zero_stage)
        } else {
            String::new()
        };
        let mut persistent = vec![if zero3 {
            row(
                format!("{} weights{share}", p.name()),
                (params * p.bytes()).div_ceil(n),
            )
        } else {
            row(format!("{} weights", p.name()), params * p.bytes())
        }];
        if p == Precision::Bf16 {
            persistent.push(row(
                format!("fp32 master weights{share}"),
                (params * 4).div_ceil(n),
            ));
        }
        persistent.push(row(
            format!("AdamW moments (fp32 m, v){share}"),
            (params * 8).div_ceil(n),
        ));
        persistent.push(if zero3 {
            row(format!("gradients (fp32){share}"), (params * 4).div_ceil(n))
        } else if n > 1 {
            row(
                "gradients (fp32, whole until the step's reduce-scatter)",
                params * 4,
            )
        } else {
            row("gradients (fp32)", params * 4)
        });
        if w.reference {
            persistent.push(row("frozen reference model (KL loss)", params * p.bytes()));
        }
        let held: u64 = persistent.iter().map(|r| r.bytes).sum();
        let mut phases = vec![
            training_phase(cfg, w),
            rollout_phase(cfg, w, gpu_bytes.saturating_sub(held)),
            scoring_phase(cfg, w),
        ];
        if zero3 {
            // The update holds the root and one unit whole (weights and
            // gradients); rollouts and scoring gather the whole model.
            let numel = |ids: &[crate::model::params::ParamId]| -> u64 {
                ids.iter().map(|id| layout.specs[id.0].numel() as u64).sum()
            };
            let unit = (0..layout.text.layers.len())
                .map(|l| numel(layout.text_layer_ids(l)))
                .chain((0..layout.vision.blocks.len()).map(|b| numel(layout.vision_block_ids(b))))
                .max()
                .unwrap_or(0);
            // The root and the running unit whole (weights, gradients),
            // the next unit's weights gathered ahead.
            let root = numel(layout.root_ids());
            phases[0].rows.push(row(
                "gathered root + 2 largest units (weights and gradients)",
                (root + 2 * unit) * p.bytes() + (root + unit) * 4,
            ));
            for phase in &mut phases[1..] {
                phase.rows.push(row(
                    "whole weights, gathered for this phase (ZeRO-3)",
                    params * p.bytes(),
                ));
            }
        } else if n > 1 {
            let largest = layout
                .specs
                .iter()
                .map(|s| s.numel() as u64)
                .max()
                .unwrap_or(0);
            phases.push(Phase {
                title: "optimizer step (ZeRO-2)".into(),
                rows: vec![
                    row(
                        "this rank's gradient shards (fp32)",
                        (params * 4).div_ceil(n),
                    ),
                    row(
                        "padded reduce-scatter / all-gather buffer (largest tensor)",
                        largest * 4 + (largest * 4).div_ceil(n),
                    ),
                ],
            });
        }
        Self {
            params,
            vision_params,
            workload: w.clone(),
            gpu_bytes,
            persistent,
            phases,
        }
    }

    pub fn persistent_bytes(&self) -> u64 {
        self.persistent.iter().map(|r| r.bytes).sum()
    }

    /// Persistent rows plus the largest phase.
    pub fn peak_bytes(&self) -> u64 {
        self.persistent_bytes() + self.phases.iter().map(Phase::bytes).max().unwrap_or(0)
    }

    pub fn fits(&self) -> bool {
        self.peak_bytes() <= self.gpu_bytes
    }

    /// The table, in GiB, with the verdict and (when it does not fit) what
    /// to change.
    pub fn render(&self) -> String {
        let w = &self.workload;
        let mb = &w.micro_batch;
        let ro = &w.rollout;
        let gib = |b: u64| b as f64 / GIB;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "memory plan: {:.2}B parameters ({:.2}B vision tower, {:.2}B decoder and head), \
             precision {}, {} of {:.1} GiB",
            self.params as f64 / 1e9,
            self.vision_params as f64 / 1e9,
            (self.params - self.vision_params) as f64 / 1e9,
            w.precision.name(),
            if w.gpus > 1 {
                format!(
                    "per GPU of {} data-parallel GPUs (ZeRO-{})",
                    w.gpus, w.zero_stage
                )
            } else {
                "one GPU".to_string()
            },
            gib(self.gpu_bytes)
        );
        let _ = writeln!(
            s,
            "training micro-batch: {} responses, {} tokens ({} image tokens, {} patches), recompute {}",
            mb.seqs,
            mb.tokens,
            mb.image_tokens,
            mb.patches,
            if w.recompute { "on" } else { "off" }
        );
        let _ =
            writeln!(
            s,
            "rollout batch{}: {} prompts x {} samples, up to {} prompt + {} response tokens each",
            if w.gpus > 1 { " (this GPU's share)" } else { "" },
            ro.prompts,
            ro.samples,
            ro.prompt_tokens,
            ro.response_tokens
        );
        let line = |s: &mut String, label: &str, bytes: u64, note: &str| {
            let _ = writeln!(s, "  {label:<56} {:>10.2}{note}", gib(bytes));
        };
        let _ = writeln!(s, "  {:<56} {:>10}", "", "GiB");
        let _ = writeln!(s, "held for the whole run");
        for r in &self.persistent {
            line(&mut s, &r.label, r.bytes, "");
        }
        line(&mut s, "sum", self.persistent_bytes(), "");
        let largest = self.phases.iter().map(Phase::bytes).max().unwrap_or(0);
        for ph in &self.phases {
            let _ = writeln!(s, "{}", ph.title);
            for r in &ph.rows {
                line(
                    &mut s,
                    &r.label,
                    r.bytes,
                    if r.counted { "" } else { "  (not counted)" },
                );
            }
            let mark = if ph.bytes() == largest {
                "  <- the largest phase"
            } else {
                ""
            };
            line(&mut s, "sum", ph.bytes(), mark);
        }
        let peak = self.peak_bytes();
        line(&mut s, "peak: whole-run rows + the largest phase", peak, "");
        if self.fits() {
            let _ = writeln!(
                s,
                "fits: yes, {:.2} GiB to spare of {:.1} GiB",
                gib(self.gpu_bytes - peak),
                gib(self.gpu_bytes)
            );
        } else {
            let _ = writeln!(
                s,
                "fits: NO, {:.2} GiB over the {:.1} GiB of the GPU",
                gib(peak - self.gpu_bytes),
                gib(self.gpu_bytes)
            );
            let _ = writeln!(s, "{}", self.advice());
        }
        s
    }

    /// What to change when the peak does not fit: the lever of every part
    /// that does not fit on its own.
    fn advice(&self) -> String {
        let w = &self.workload;
        let state = self.persistent_bytes();
        let over = |phase: usize| state + self.phases[phase].bytes() > self.gpu_bytes;
        let mut tips = Vec::new();
        if state > self.gpu_bytes {
            tips.push(
                "the weights, optimizer state and gradients alone exceed the GPU: more GPUs \
                 (`--gpus N` / a launch of N ranks: ZeRO-2 shards the fp32 masters and moments, \
                 `--zero-stage 3` the weights and gradients too), a smaller model, or a GPU \
                 with more memory"
                    .to_string(),
            );
        }
        if over(0) {
            if !w.recompute {
                tips.push("set recompute=true (keeps each block's input only)".to_string());
            }
            tips.push(
                "lower max_tokens_per_micro_batch (or micro_batch) for the training micro-batch"
                    .to_string(),
            );
        }
        if over(1) {
            tips.push(match w.kv_cache {
                KvSizing::WholeBatch => "size the rollout's KV cache from memory: \
                     kv_cache_memory_fraction = 0.5 (sequences beyond it wait or are \
                     preempted), or lower rollout_batch, group_size, max_prompt_tokens or \
                     max_response_tokens"
                    .to_string(),
                _ => "lower kv_cache_memory_fraction / kv_cache_blocks, or rollout_batch, \
                     group_size, max_prompt_tokens or max_response_tokens for the rollout"
                    .to_string(),
            });
        }
        if over(2) && !over(0) {
            tips.push(
                "lower max_tokens_per_micro_batch for the scoring passes (VPPO's runs twice it)"
                    .to_string(),
            );
        }
        format!("to fit: {}", tips.join("; "))
    }
}

/// The fewest data-parallel GPUs of `gpu_bytes` each that fit the run
/// (ZeRO-2), up to `limit`; `None` when the parts every GPU holds whole
/// (weights, gradients, the largest phase) do not fit whatever the count.
pub fn smallest_world(
    cfg: &ModelConfig,
    w: &Workload,
    rollout_batch: usize,
    gpu_bytes: u64,
    limit: usize,
) -> Option<usize> {
    (1..=limit.max(1))
        .find(|&n| MemoryPlan::new(cfg, &w.clone().on_gpus(n, rollout_batch), gpu_bytes).fits())
}

/// Forward + backward of one training micro-batch.
fn training_phase(cfg: &ModelConfig, w: &Workload) -> Phase {
    let p = w.precision;
    let mb = &w.micro_batch;
    let with = kept_by_forward(cfg, mb, true).bytes(p) + recompute_bytes(cfg, mb, p);
    let without = kept_by_forward(cfg, mb, false).bytes(p);
    let mut rows = vec![
        Row {
            label: "activations, recompute on".into(),
            bytes: with,
            counted: w.recompute,
        },
        Row {
            label: "activations, recompute off".into(),
            bytes: without,
            counted: !w.recompute,
        },
    ];
    rows.push(row(
        "workspace (backward, loss head, cuBLAS)",
        training_workspace(cfg, mb, p),
    ));
    Phase {
        title: "training micro-batch: forward + backward".into(),
        rows,
    }
}

/// With recompute, the backward re-runs one block at a time: the largest
/// block's full activations (and the copy of its input) exist at once.
fn recompute_bytes(cfg: &ModelConfig, mb: &MicroBatch, p: Precision) -> u64 {
    let one = |w: BlockWidths, rows: u64| {
        rows * ((w.acts_per_row() + w.hidden) * p.bytes() + w.stats_per_row() * 4)
    };
    let vision = if mb.patches > 0 {
        one(BlockWidths::vision(cfg), mb.patches as u64)
    } else {
        0
    };
    one(BlockWidths::text(cfg), mb.tokens as u64).max(vision)
}

/// Logits and their gradient of one loss-head chunk (fp32, `[rows, vocab]`).
fn head_chunk_bytes(cfg: &ModelConfig, rows: usize) -> u64 {
    2 * rows.min(LOSS_CHUNK_ROWS) as u64 * cfg.text.vocab_size as u64 * 4
}

/// The transient peak of a backward: the largest block's activation
/// gradients, plus the decoder-wide gradients alive meanwhile (d_hidden and
/// dx, `[T, H]` each), or the loss head's chunk; plus cuBLAS's workspace.
fn training_workspace(cfg: &ModelConfig, mb: &MicroBatch, p: Precision) -> u64 {
    let t = mb.tokens as u64;
    let h = cfg.text.hidden_size as u64;
    let text = t * BlockWidths::text(cfg).backward_per_row() * p.bytes();
    let vision = mb.patches as u64 * BlockWidths::vision(cfg).backward_per_row() * p.bytes();
    let head = head_chunk_bytes(cfg, mb.response_tokens);
    let wide = 2 * t * h * p.bytes();
    wide + text.max(vision).max(head) + CUBLAS_WORKSPACE_BYTES
}

/// Generation of one rollout batch: the paged KV cache `generate` allocates
/// up front (for the whole batch, or as the settings size it from `free`,
/// the memory the whole-run rows leave), the decode step's logits, one
/// prefill block.
fn rollout_phase(cfg: &ModelConfig, w: &Workload, free: u64) -> Phase {
    let p = w.precision;
    let ro = &w.rollout;
    let t = &cfg.text;
    let whole = kv_block_bound(
        &vec![ro.prompt_tokens; ro.prompts],
        ro.samples,
        ro.response_tokens,
        KV_BLOCK_SIZE,
    ) as u64;
    let slot = (t.num_kv_heads * t.head_dim) as u64;
    let block_bytes = KV_BLOCK_SIZE as u64 * slot * t.num_layers as u64 * 2 * p.bytes();
    // Generation needs room for one whole sequence, whatever the setting.
    let one = (ro.prompt_tokens + ro.response_tokens).div_ceil(KV_BLOCK_SIZE) as u64;
    let (blocks, how) = match w.kv_cache {
        KvSizing::WholeBatch => (whole, String::new()),
        KvSizing::Blocks(b) => (whole.min(b as u64), ", kv_cache_blocks".to_string()),
        KvSizing::Fraction(f) => (
            whole.min((free as f64 * f) as u64 / block_bytes.max(1)),
            format!(", {f} of the free memory"),
        ),
    };
    let blocks = blocks.max(one.min(whole));
    let kv = blocks * block_bytes;
    let rows = (ro.prompts * ro.samples).min(w.max_num_seqs.max(1)) as u64;
    let logits = rows * t.vocab_size as u64 * 4;
    let prefill = ro.prompt_tokens as u64 * BlockWidths::text(cfg).acts_per_row() * p.bytes();
    Phase {
        title: "rollout batch: generation".into(),
        rows: vec![
            row(
                format!("KV cache ({blocks} blocks of {KV_BLOCK_SIZE} tokens{how})"),
                kv,
            ),
            row(
                "workspace (decode logits, one prefill block, cuBLAS)",
                logits + prefill + CUBLAS_WORKSPACE_BYTES,
            ),
        ]
        .into_iter()
        .chain(w.decode_graphs.then(|| {
            row(
                "CUDA graphs of decode steps (hidden states, temporaries)",
                decode_graph_bytes(cfg, p, rows as usize),
            )
        }))
        .collect(),
    }
}

/// What the decode graphs of a call with up to `rows` decode rows hold:
/// every row bucket up to `rows`' keeps its final hidden states, and the
/// graph pool the largest step's temporaries (one layer's activations).
fn decode_graph_bytes(cfg: &ModelConfig, p: Precision, rows: usize) -> u64 {
    let largest = row_bucket(rows);
    let buckets: usize = (1..=largest).filter(|&b| row_bucket(b) == b).sum();
    let hidden = buckets as u64 * cfg.text.hidden_size as u64 * p.bytes();
    hidden + largest as u64 * BlockWidths::text(cfg).acts_per_row() * p.bytes()
}

/// The old log-probs (and VPPO's dual pass: the micro-batch and its
/// perturbed twins in one forward): nothing kept, one block's activations
/// at a time over every copy.
fn scoring_phase(cfg: &ModelConfig, w: &Workload) -> Phase {
    let p = w.precision;
    let copies = w.scoring_copies as u64;
    let mb = &w.micro_batch;
    let (t, n) = (copies * mb.tokens as u64, copies * mb.patches as u64);
    let text = BlockWidths::text(cfg);
    let vision = BlockWidths::vision(cfg);
    let block =
        |w: &BlockWidths, rows: u64| rows * (w.acts_per_row() * p.bytes() + w.stats_per_row() * 4);
    let h = cfg.text.hidden_size as u64;
    // The running x and the final hidden states [T, H], the vision output.
    let wide = 2 * t * h * p.bytes() + copies * mb.image_tokens as u64 * h * p.bytes();
    let bytes = wide
        + block(&text, t).max(block(&vision, n))
        + head_chunk_bytes(cfg, copies as usize * mb.response_tokens)
        + CUBLAS_WORKSPACE_BYTES;
    Phase {
        title: format!(
            "scoring passes: old log-probs{} (nothing kept)",
            if copies == 2 {
                ", VPPO's dual pass over 2 x the micro-batch"
            } else {
                ""
            }
        ),
        rows: vec![row("workspace (one block at a time, loss head)", bytes)],
    }
}

/// Why a run may not start on its GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuPlanError {
    #[error("{0}")]
    Device(String),
    #[error(
        "the run does not fit on CUDA device {ordinal}; nothing was allocated there:\n{table}"
    )]
    DoesNotFit { ordinal: usize, table: String },
}

/// The plan of `cfg` with `model` on this process's GPU, against the
/// memory free there before the run allocates anything. (On the CPU
/// backend no plan is enforced: host memory is the operating system's to
/// give, and the host holds fp32 copies the device plan does not count.)
pub fn check_local_gpu(
    cfg: &TrainConfig,
    model: &ModelConfig,
    world_size: usize,
) -> Result<MemoryPlan, GpuPlanError> {
    let gpu = crate::backend::open_local_gpu().map_err(GpuPlanError::Device)?;
    let (free, _total) = gpu
        .context()
        .mem_get_info()
        .map_err(|e| GpuPlanError::Device(format!("reading the free memory: {e}")))?;
    drop(gpu);
    check(
        cfg,
        model,
        world_size,
        free as u64,
        crate::backend::local_ordinal(),
    )
}

/// The plan when it fits in `free_bytes`, else the table as the error.
pub fn check(
    cfg: &TrainConfig,
    model: &ModelConfig,
    world_size: usize,
    free_bytes: u64,
    ordinal: usize,
) -> Result<MemoryPlan, GpuPlanError> {
    let workload = Workload::of(cfg, model).on_gpus(world_size, cfg.rollout_batch);
    let plan = MemoryPlan::new(model, &workload, free_bytes);
    if plan.fits() {
        Ok(plan)
    } else {
        Err(GpuPlanError::DoesNotFit {
            ordinal,
            table: plan.render(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::acts::{Save, SavedBlock};
    use crate::model::forward::Forward;
    use crate::model::graph::Graph;
    use crate::model::input::{packed_inputs, SequenceInput};
    use crate::model::params::Tensors;
    use crate::model::plan::HostPlan;
    use crate::ops::cpu::CpuBackend;
    use std::path::Path;

    /// The test fixture's tiny Qwen2.5-VL: decoder 2 x 64 (4/2 heads of 16,
    /// MLP 128, vocab 384, untied head), vision 4 x 32 (2 heads, MLP 48).
    fn tiny() -> ModelConfig {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
        ModelConfig::load(&dir).expect("fixture config")
    }

    /// Two sequences of 11 tokens, each with a 4x6-patch image (6 image
    /// tokens), scored from token 9: 22 tokens, 12 image tokens, 48
    /// patches, 4 response tokens.
    fn tiny_batch(cfg: &ModelConfig) -> (Vec<SequenceInput>, MicroBatch) {
        let img = cfg.tokens.image_token_id;
        let mut ids = vec![1, 2];
        ids.extend([img; 6]);
        ids.extend([3, 4, 5]);
        let input = SequenceInput {
            ids,
            pixel_values: vec![0.5; 24 * cfg.vision.patch_dim()],
            grids: vec![[1, 4, 6]],
            ..Default::default()
        };
        let mb = MicroBatch {
            seqs: 2,
            tokens: 22,
            image_tokens: 12,
            patches: 48,
            response_tokens: 4,
        };
        (vec![input.clone(), input], mb)
    }

    fn block_len(saved: &SavedBlock<CpuBackend>) -> usize {
        match saved {
            SavedBlock::Input(x) => x.len(),
            SavedBlock::All(a) => [
                &a.x_in, &a.rstd1, &a.h1, &a.q, &a.k, &a.v, &a.attn, &a.lse, &a.x_mid, &a.rstd2,
                &a.h2, &a.gate, &a.up, &a.act,
            ]
            .iter()
            .map(|b| b.len())
            .sum(),
        }
    }

    /// Every buffer a training forward (and its scoring) keeps for the backward.
    fn kept_len(fwd: &Forward<CpuBackend>, scored_lens: usize) -> usize {
        let v = fwd.vision_acts.as_ref().expect("vision activations");
        let t = fwd.text_acts.as_ref().expect("decoder activations");
        let m = &v.merger;
        v.blocks.iter().map(block_len).sum::<usize>()
            + [&m.x_in, &m.rstd, &m.normed, &m.fc1, &m.gelu]
                .iter()
                .map(|b| b.len())
                .sum::<usize>()
            + t.layers.iter().map(block_len).sum::<usize>()
            + t.final_in.len()
            + t.final_rstd.len()
            + fwd.hidden.len()
            + fwd.vision_embeds.as_ref().map_or(0, |b| b.len())
            + fwd.pixels.as_ref().map_or(0, |b| b.len())
            + scored_lens
    }

    /// The plan's count of kept activations is what a real forward of the
    /// generic graph keeps, buffer by buffer, with and without recompute;
    /// and both equal the hand count for this batch.
    #[test]
    fn kept_activations_are_what_the_graph_keeps() {
        let cfg = tiny();
        let layout = ParamLayout::new(&cfg);
        // Buffer sizes do not depend on the weights' values.
        let weights = Tensors::zeros(&layout);
        let graph = Graph::new(&CpuBackend, &cfg, &layout, &weights.0);
        let (inputs, mb) = tiny_batch(&cfg);
        let refs: Vec<&SequenceInput> = inputs.iter().collect();
        let plan = HostPlan::packed(&cfg, &refs, &[Some(9), Some(9)]).unwrap();
        assert_eq!(
            (
                plan.shape.tokens,
                plan.shape.image_tokens,
                plan.shape.patches
            ),
            (mb.tokens, mb.image_tokens, mb.patches)
        );
        assert_eq!(plan.response_rows.len(), mb.response_tokens);
        let (ids, pixels) = packed_inputs(&refs);
        // Hand count (see the fixture's widths): text blocks 2 x 22 x (832 +
        // 6), vision blocks 4 x 48 x (400 + 4), merger 4 x 48 x 32 + 48,
        // decoder out 2 x 22 x 64 + 12 x 64 + 22, pixels 48 x 1176, loss
        // head 2 x 4.
        let by_hand_all = 36_872 + 77_568 + 6_192 + 3_606 + 56_448 + 8;
        // Recompute: block inputs only, 2 x 22 x 64 + 4 x 48 x 32.
        let by_hand_inputs = 2_816 + 6_144 + 6_192 + 3_606 + 56_448 + 8;
        for (save, recompute, by_hand) in [
            (Save::All, false, by_hand_all),
            (Save::Inputs, true, by_hand_inputs),
        ] {
            let fwd = graph
                .forward(&plan, &ids, Some(pixels.clone()), save, None)
                .unwrap();
            let scored = graph.score(&fwd, &plan).unwrap();
            let scored_lens: usize = scored
                .chunks
                .iter()
                .map(|c| c.lse.len() + c.entropy.len())
                .sum();
            let measured = kept_len(&fwd, scored_lens);
            let planned = kept_by_forward(&cfg, &mb, recompute).elements();
            assert_eq!(planned, measured as u64, "{save:?}: plan vs the graph");
            assert_eq!(planned, by_hand as u64, "{save:?}: plan vs hand count");
        }
    }

    /// Parameters from the config by the Qwen2.5-VL formula, independently
    /// of the parameter table.
    fn params_by_formula(c: &ModelConfig) -> u64 {
        let (v, t) = (&c.vision, &c.text);
        let (vh, vi) = (v.hidden_size, v.intermediate_size);
        let block = 2 * vh + 3 * vh * vh + 3 * vh + vh * vh + vh + 3 * vh * vi + 2 * vi + vh;
        let merged = vh * v.merge_unit();
        let merger = vh + merged * merged + merged + v.out_hidden_size * (merged + 1);
        let vision = vh * v.patch_dim() + v.depth * block + merger;
        let (h, q, kv) = (
            t.hidden_size,
            t.num_heads * t.head_dim,
            t.num_kv_heads * t.head_dim,
        );
        let layer = 2 * h + (h + 1) * (q + 2 * kv) + q * h + 3 * h * t.intermediate_size;
        let heads = if t.tie_word_embeddings { 1 } else { 2 };
        (vision + t.num_layers * layer + h + heads * t.vocab_size * h) as u64
    }

    fn tiny_workload() -> Workload {
        Workload {
            precision: Precision::Bf16,
            recompute: false,
            reference: true,
            micro_batch: tiny_batch(&tiny()).1,
            scoring_copies: 2,
            rollout: RolloutBatch {
                prompts: 3,
                samples: 2,
                prompt_tokens: 20,
                response_tokens: 13,
            },
            gpus: 1,
            zero_stage: 2,
            kv_cache: KvSizing::WholeBatch,
            max_num_seqs: 256,
            decode_graphs: true,
        }
    }

    #[test]
    fn persistent_rows_and_kv_cache_match_hand_computed_bytes() {
        let cfg = tiny();
        // Vision 37,632 + 4 x 9,024 + 24,800; decoder 24,576 + 2 x 37,120
        // + 64 + 24,576 (untied head).
        assert_eq!(params_by_formula(&cfg), 221_984);
        let plan = MemoryPlan::new(&cfg, &tiny_workload(), 1 << 30);
        assert_eq!(plan.params, 221_984, "the engine's tensor list");
        assert_eq!(plan.vision_params, 98_528);
        let bytes: Vec<u64> = plan.persistent.iter().map(|r| r.bytes).collect();
        // bf16 weights, fp32 masters, m + v, fp32 gradients, bf16 reference.
        assert_eq!(bytes, vec![443_968, 887_936, 1_775_872, 887_936, 443_968]);
        // Each prompt: 2 prefill blocks + 2 samples x ceil(33 / 16) = 8
        // blocks; x 3 prompts; 16 tokens x 2 x 16 values x 2 layers x (k, v)
        // x 2 bytes.
        let kv = &plan.phases[1].rows[0];
        assert!(kv.label.contains("24 blocks"), "{}", kv.label);
        assert_eq!(kv.bytes, 24 * 16 * 32 * 2 * 2 * 2);
        // 6 samples decode at once: buckets 1, 2, 4 and 8 keep their bf16
        // hidden states, the 8-row step its temporaries; enforce_eager
        // keeps none.
        let graphs = plan.phases[1].rows.last().unwrap();
        assert!(graphs.label.contains("CUDA graphs"), "{}", graphs.label);
        let hidden = cfg.text.hidden_size as u64;
        let acts = BlockWidths::text(&cfg).acts_per_row();
        assert_eq!(graphs.bytes, (1 + 2 + 4 + 8) * hidden * 2 + 8 * acts * 2);
        let eager = MemoryPlan::new(
            &cfg,
            &Workload {
                decode_graphs: false,
                ..tiny_workload()
            },
            1 << 30,
        );
        assert_eq!(eager.phases[1].rows.len(), plan.phases[1].rows.len() - 1);
        // Without recompute the kept activations count, in bf16 with fp32
        // statistics and inputs: 123,136 x 2 + 57,558 x 4.
        let train = &plan.phases[0];
        assert_eq!(train.rows[1].bytes, 476_504);
        assert!(train.rows[1].counted && !train.rows[0].counted);
        // fp32 drops the masters and doubles the weights.
        let fp32 = MemoryPlan::new(
            &cfg,
            &Workload {
                precision: Precision::Fp32,
                reference: false,
                ..tiny_workload()
            },
            1 << 30,
        );
        let bytes: Vec<u64> = fp32.persistent.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, vec![887_936, 1_775_872, 887_936]);
        // Over 4 GPUs (ZeRO-2): a quarter of the masters and moments, the
        // weights and gradients whole, one of the 3 prompts' KV cache, and
        // the optimizer step's shards and padded buffers as a phase.
        let four = MemoryPlan::new(&cfg, &tiny_workload().on_gpus(4, 3), 1 << 30);
        let bytes: Vec<u64> = four.persistent.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, vec![443_968, 221_984, 443_968, 887_936, 443_968]);
        assert!(four.phases[1].rows[0].label.contains("8 blocks"));
        // A KV cache sized from memory: the fraction of what the whole-run
        // rows leave, at least one whole sequence (3 blocks), at most the
        // whole batch (24 blocks).
        let block_bytes = 16 * 32 * 2 * 2 * 2;
        let sized = |kv_cache: KvSizing, gpu: u64| {
            let plan = MemoryPlan::new(
                &cfg,
                &Workload {
                    kv_cache,
                    ..tiny_workload()
                },
                gpu,
            );
            let held = plan.persistent_bytes();
            (plan.phases[1].rows[0].bytes / block_bytes, held)
        };
        let (_, held) = sized(KvSizing::WholeBatch, 1 << 30);
        assert_eq!(
            sized(KvSizing::Fraction(0.5), held + 20 * block_bytes).0,
            10
        );
        assert_eq!(sized(KvSizing::Fraction(0.5), held).0, 3);
        assert_eq!(sized(KvSizing::Fraction(1.0), 1 << 30).0, 24);
        assert_eq!(sized(KvSizing::Blocks(5), 1 << 30).0, 5);
        let step = four.phases.last().unwrap();
        assert_eq!(step.title, "optimizer step (ZeRO-2)");
        assert_eq!(step.rows[0].bytes, 221_984);
        // ZeRO-3: the weights and gradients a quarter too; the update holds
        // the root and the largest unit whole, rollouts the whole weights.
        let z3 = MemoryPlan::new(
            &cfg,
            &Workload {
                zero_stage: 3,
                ..tiny_workload().on_gpus(4, 3)
            },
            1 << 30,
        );
        let bytes: Vec<u64> = z3.persistent.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, vec![110_992, 221_984, 443_968, 221_984, 443_968]);
        let layout = ParamLayout::new(&cfg);
        let numel = |ids: &[crate::model::params::ParamId]| -> u64 {
            ids.iter().map(|id| layout.specs[id.0].numel() as u64).sum()
        };
        let unit = numel(layout.vision_block_ids(0)).max(numel(layout.text_layer_ids(0)));
        let gathered = z3.phases[0].rows.last().unwrap();
        let root = numel(layout.root_ids());
        assert_eq!(gathered.bytes, (root + 2 * unit) * 2 + (root + unit) * 4);
        assert_eq!(z3.phases[1].rows.last().unwrap().bytes, 221_984 * 2);
        assert!(z3.phases.iter().all(|p| !p.title.contains("ZeRO-2")));
    }

    #[test]
    fn the_verdict_turns_at_the_peak() {
        let cfg = tiny();
        let probe = MemoryPlan::new(&cfg, &tiny_workload(), 0);
        let peak = probe.persistent_bytes() + probe.phases.iter().map(Phase::bytes).max().unwrap();
        assert_eq!(probe.peak_bytes(), peak);
        let fits = MemoryPlan::new(&cfg, &tiny_workload(), peak);
        assert!(fits.fits());
        assert!(fits.render().contains("fits: yes"), "{}", fits.render());
        let over = MemoryPlan::new(&cfg, &tiny_workload(), peak - 1);
        assert!(!over.fits());
        let table = over.render();
        assert!(
            table.contains("fits: NO") && table.contains("to fit:"),
            "{table}"
        );
        assert!(table.contains("set recompute=true"), "{table}");
    }

    #[test]
    fn a_train_config_gives_its_micro_batch_and_rollout() {
        let shapes = tiny();
        let cfg = TrainConfig {
            micro_batch: 16,
            max_prompt_tokens: 512,
            max_response_tokens: 512,
            max_pixels: 200_704,
            max_tokens_per_micro_batch: 4096,
            rollout_batch: 32,
            group_size: 4,
            ..TrainConfig::default()
        };
        let w = Workload::of(&cfg, &shapes);
        // 4096 tokens hold 4 sequences of 1024; 200,704 pixels are 256
        // tokens of 28 x 28 each; 4 patches a token.
        assert_eq!(
            w.micro_batch,
            MicroBatch {
                seqs: 4,
                tokens: 4096,
                image_tokens: 1024,
                patches: 4096,
                response_tokens: 2048,
            }
        );
        assert_eq!(w.precision, Precision::Bf16);
        assert_eq!(w.scoring_copies, 2, "vppo's dual pass");
        assert_eq!((w.rollout.prompts, w.rollout.samples), (32, 4));
        // No budget: every response at its longest.
        let unbounded = Workload::of(
            &TrainConfig {
                max_tokens_per_micro_batch: 0,
                ..cfg.clone()
            },
            &shapes,
        );
        assert_eq!(unbounded.micro_batch.tokens, 16 * 1024);
        assert_eq!(unbounded.micro_batch.image_tokens, 16 * 256);
        // A budget below one sequence: the sequence runs alone.
        let alone = Workload::of(
            &TrainConfig {
                max_tokens_per_micro_batch: 600,
                ..cfg
            },
            &shapes,
        );
        assert_eq!(
            (alone.micro_batch.seqs, alone.micro_batch.tokens),
            (1, 1024)
        );
    }

    /// What `train` runs before it allocates on a GPU: a run that does not
    /// fit is refused with the table, naming the device.
    #[test]
    fn a_run_that_does_not_fit_is_refused_with_the_table() {
        let shapes = tiny();
        let cfg = TrainConfig {
            rollout_batch: 16,
            mini_batch: 16,
            ..TrainConfig::default()
        };
        let plan = check(&cfg, &shapes, 1, 1 << 40, 0).expect("1 TiB holds the tiny model");
        let err = check(&cfg, &shapes, 1, plan.peak_bytes() - 1, 3).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the run does not fit on CUDA device 3"),
            "{msg}"
        );
        assert!(msg.contains("nothing was allocated"), "{msg}");
        assert!(
            msg.contains("AdamW moments") && msg.contains("fits: NO"),
            "{msg}"
        );
    }
}
