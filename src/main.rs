//! The `vppo-engine` command line.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

/// VPPO reinforcement-learning fine-tuning of Qwen2.5-VL, in one binary.
#[derive(Parser)]
#[command(name = "vppo-engine", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

use vppo_engine::backend::Device;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::Qwen25Vl;
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::ops::Backend;
use vppo_engine::{cli_values, outputs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SaveDtypeArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    Auto,
    Bf16,
    Fp32,
}

impl PrecisionArg {
    /// The precision on `device` (resolved: cpu or cuda).
    fn on(self, device: Device) -> vppo_engine::ops::Precision {
        use vppo_engine::train::config::PrecisionSetting as S;
        match self {
            Self::Auto => S::Auto,
            Self::Bf16 => S::Bf16,
            Self::Fp32 => S::Fp32,
        }
        .on(device)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AlgoArg {
    /// DAPO plus the visual-dependency pass: trajectory advantage shaping
    /// and top-k token gradient filtering.
    Vppo,
    /// The same recipe without the perturbed-image pass.
    Dapo,
    /// Symmetric clip 0.2, no dynamic sampling, no perturbed pass.
    Grpo,
}

#[derive(Subcommand)]
enum Command {
    /// Train a policy with VPPO (or the dapo / grpo baselines).
    ///
    /// With no model and no data it trains the built-in default: a tiny
    /// Qwen2.5-VL model on a generated shape-counting task, a short
    /// supervised warm-up, then RL; about a minute on a laptop CPU.
    /// Otherwise the config's defaults are the published 7B recipe.
    ///
    /// The run directory gets config.toml (the resolved config),
    /// metrics.jsonl (one line per optimizer step and per validation),
    /// checkpoint-NNNNNNNN/ (Hugging Face layout plus optimizer state, every
    /// `save_every` steps, at a new best validation accuracy and at the
    /// end; `latest` and `best` name them), tb/ (TensorBoard scalars), and
    /// reward.png. Settings: a TOML --config file, then KEY=VALUE arguments
    /// (e.g. `lr=1e-6 max_steps=100`); every field of the config can be set
    /// either way (`--print-config` lists them), among them:
    ///
    /// val_data, val_freq, val_before_train, val_n, val_max_samples
    /// (validation during training); keep_checkpoints or save_limit (newest
    /// N plus the best); tensorboard; use_kl_loss, kl_coef, kl_estimator
    /// (k1, k2, k3 = low_var_kl); reward_command, reward_timeout_s (an
    /// external reward program, JSON lines in and out); data = ["a", "b"]
    /// with data_weights (a mix of data sets); data as a folder or glob of
    /// shards; shuffle, epochs (the reference's training length);
    /// tas_partitions, micro_batch (the reference's TAS layout);
    /// max_tokens_per_micro_batch (the tokens of one packed forward/backward,
    /// verl's ppo_max_token_len_per_gpu); precision = auto | bf16 | fp32
    /// (auto: bf16 on a GPU, fp32 on the CPU; the old bf16 = true|false
    /// still reads); max_gen_batches (0: regenerate until the batch is full);
    /// perturb_space (patches, or pixels as the reference).
    ///
    /// Started by a launcher (`vppo-engine launch --nproc-per-node N --
    /// train ...`, torchrun, or srun), each process is one rank of a
    /// data-parallel run: it rolls out its share of the prompts, trains on
    /// its share of each step's micro-batches and owns 1/N of the optimizer
    /// state (zero_stage = 2), or of the weights and gradients too
    /// (zero_stage = 3); GPUs talk through NCCL. collective_timeout_s
    /// bounds how long a rank waits for a dead or hung one. Rank 0 writes
    /// the metrics and the weights; every rank its optimizer shard.
    Train {
        /// TOML config file; fields it leaves out keep their defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory (default: the config's output_dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in this directory from its latest checkpoint,
        /// exactly as if it had not stopped (saved config; KEY=VALUE
        /// arguments still apply, e.g. a larger max_steps).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "config"])]
        resume: Option<PathBuf>,
        /// Objective (same as algo=...).
        #[arg(long, value_enum)]
        algo: Option<AlgoArg>,
        /// Hugging Face Qwen2.5-VL checkpoint directory to start from.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Training data: parquet or JSONL with problem, answer, images
        /// (several files: data=["a", "b"] with data_weights).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where rollouts, log-probs, the backward and AdamW run (same as
        /// device=...): auto picks the GPU when one is usable.
        #[arg(long, value_enum)]
        device: Option<Device>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Print the resolved config (every field, as TOML) and exit.
        #[arg(long)]
        print_config: bool,
        /// Config overrides, KEY=VALUE (values in TOML syntax).
        #[arg(value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Print the memory plan of a training run on one GPU, and whether it
    /// fits: bf16 (or fp32) weights, fp32 master weights, AdamW moments and
    /// fp32 gradients held for the whole run; a training micro-batch's
    /// activations at the token budget with and without recompute, the
    /// rollout batch's KV cache and the scoring passes, each with its
    /// workspace. Only the model's config.json is read (shapes, no
    /// weights): the published 3B, 7B and 32B ship under configs/models/.
    ///
    /// The workload comes from the training config (--config and KEY=VALUE
    /// overrides, as for `train`): micro_batch responses of
    /// max_prompt_tokens + max_response_tokens, bounded by
    /// max_tokens_per_micro_batch; one image per prompt of at most
    /// max_pixels; rollout_batch x group_size sequences generated at once;
    /// the precision (bf16 weights over fp32 masters, or fp32); recompute;
    /// use_kl_loss (a frozen reference).
    /// `train` on a GPU runs the same plan against the GPU's free memory
    /// before it allocates anything there, and stops with this table when
    /// it does not fit. Exits with status 1 when it does not fit.
    Plan {
        /// A Qwen2.5-VL checkpoint directory or its config.json (default:
        /// the config's `model`), e.g. configs/models/qwen2.5-vl-7b.
        #[arg(long, value_name = "DIR|CONFIG")]
        model: Option<PathBuf>,
        /// Memory of the GPU, in GiB.
        #[arg(long, value_name = "GiB", default_value_t = 80.0, value_parser = cli_values::gib)]
        gpu_mem: f64,
        /// Data-parallel GPUs the run is spread over: each rolls out its
        /// share of the prompts and owns 1/N of the fp32 master weights and
        /// AdamW moments (ZeRO-2). The plan is per GPU, and names the
        /// fewest GPUs that fit.
        #[arg(long, value_name = "N", default_value_t = 1)]
        gpus: usize,
        /// How the state is sharded over the GPUs (same as zero_stage=...):
        /// 2 (optimizer state and gradients) or 3 (the weights too).
        #[arg(long, value_name = "S")]
        zero_stage: Option<usize>,
        /// TOML training config; fields it leaves out keep their defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Training config overrides, KEY=VALUE (values in TOML syntax).
        #[arg(value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Benchmark one training step at a model's published shapes with
    /// random weights: a packed micro-batch of --seqs sequences of
    /// --seq-len tokens (the last --response-len the response), each prompt
    /// with one --image-side square image; forward + backward of the mean
    /// response log-prob (recompute on unless --no-recompute), then AdamW
    /// (unless --no-optimizer); timed with the device synchronised, the
    /// median of --steps after --warmup.
    ///
    /// Prints tokens/s (every packed token), model FLOP utilisation (3 x
    /// the forward's matmul FLOPs over the rows each weight multiplies, plus
    /// 3 x the attention FLOPs over the visible pairs, recompute not
    /// counted: shared/docs/perf.md) against the card's dense bf16 peak,
    /// and peak device memory; with --json, one JSON line too (the keys
    /// scripts/bench_model_torch.py writes for PyTorch on the same shapes).
    /// Defaults: the issue's micro-batch, 16 x 1,024 tokens with one
    /// 448 x 448 image (256 image tokens) each.
    Bench {
        /// A Qwen2.5-VL config.json or checkpoint directory (only the
        /// shapes are read), e.g. configs/models/qwen2.5-vl-3b.
        #[arg(long, value_name = "DIR|CONFIG")]
        model: PathBuf,
        /// Sequences in the micro-batch.
        #[arg(long, default_value_t = 16, value_parser = cli_values::at_least_one)]
        seqs: usize,
        /// Tokens per sequence (prompt + response).
        #[arg(long, default_value_t = 1024, value_parser = cli_values::at_least_one)]
        seq_len: usize,
        /// Response tokens per sequence (the rows the loss scores).
        #[arg(long, default_value_t = 512, value_parser = cli_values::at_least_one)]
        response_len: usize,
        /// Side of each prompt's square image in pixels (a multiple of 28).
        #[arg(long, default_value_t = 448, value_parser = cli_values::at_least_one)]
        image_side: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = cli_values::at_least_one)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Keep every activation instead of recomputing each block.
        #[arg(long)]
        no_recompute: bool,
        /// Forward + backward only (a model whose AdamW state does not fit).
        #[arg(long)]
        no_optimizer: bool,
        /// The device's dense bf16 peak in TFLOP/s (default: from the
        /// card's name for H100, H200, A100; none on the CPU).
        #[arg(long, value_parser = cli_values::tflops)]
        peak_tflops: Option<f64>,
        /// Where to run: auto (the GPU when one is usable), cpu, cuda.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Storage precision: auto (bf16 on a GPU, fp32 on the CPU), bf16
        /// (bf16 weights and activations over fp32 masters, as `train`), fp32.
        #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
        precision: PrecisionArg,
        /// Also print the result as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Show the build (version, embedded CUDA kernels with their registers,
    /// shared memory and spills per architecture) and the CUDA devices found.
    Info,
    /// Score a response: log p(response | prompt, images) under a checkpoint.
    ///
    /// The prompt becomes a chat (default system prompt, one user turn with
    /// the images and the text, then the assistant generation prompt); the
    /// response is tokenised without special tokens and appended. `<image>`
    /// in the prompt marks where each image goes; without it the images
    /// come first. Writes a safetensors file with `input_ids` (i64 [T]),
    /// `response_logprobs` (f32 [R]) and `response_logits` (f32 [R, V]).
    Score {
        /// Hugging Face Qwen2.5-VL checkpoint directory (config.json,
        /// *.safetensors, tokenizer.json, preprocessor_config.json).
        #[arg(long)]
        model: PathBuf,
        /// An image file (PNG or JPEG); repeat for several images, in order.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// The user's text (may start with `-`).
        #[arg(long, allow_hyphen_values = true)]
        prompt: String,
        /// The assistant response to score (may start with `-`).
        #[arg(long, allow_hyphen_values = true)]
        response: String,
        /// Where to run the model.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Storage precision: fp32 (exact, the default), bf16 (bf16 weights
        /// and activations; on the CPU the bf16 twin), auto (bf16 on a GPU).
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Also write the gradient of sum(response_logprobs) w.r.t. every
        /// parameter (f32, under the checkpoint's own tensor names) here.
        #[arg(long)]
        grad_out: Option<PathBuf>,
    },
    /// Sample responses: prints one JSON object per line per sample with
    /// `prompt_index`, `sample_index`, `text`, `token_ids`, `logprobs`
    /// (temperature-1 log-probs, as `score` computes) and `finish_reason`
    /// (`stop` or `length`). Each prompt is prefilled once and its images
    /// encoded once, whatever `--n`.
    Generate {
        /// Hugging Face Qwen2.5-VL checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// An image file; repeat for several images, in order.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// The user's text (`<image>` marks where each image goes).
        #[arg(long, required_unless_present = "prompts", allow_hyphen_values = true)]
        prompt: Option<String>,
        /// Batch mode: a JSONL file of {"prompt": ..., "images": [paths]}
        /// (paths relative to the file), instead of --prompt/--image.
        #[arg(long, conflicts_with_all = ["prompt", "images"])]
        prompts: Option<PathBuf>,
        /// Samples per prompt.
        #[arg(long, default_value_t = 1, value_parser = cli_values::at_least_one)]
        n: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 1.0, value_parser = cli_values::temperature)]
        temperature: f32,
        /// Nucleus sampling mass (1.0 disables).
        #[arg(long, default_value_t = 1.0, value_parser = cli_values::top_p)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 disables).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Most tokens generated per sample.
        #[arg(long, default_value_t = 256, value_parser = cli_values::at_least_one)]
        max_new_tokens: usize,
        /// Seed; each (prompt, sample) has its own reproducible stream.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to run the model.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Storage precision: fp32 (exact, the default), bf16 (bf16 weights
        /// and activations; on the CPU the bf16 twin), auto (bf16 on a GPU).
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
        /// Sequences decoding or prefilling at once (continuous batching:
        /// a finished sample's seat goes to the next at the next step).
        #[arg(long, default_value_t = 256, value_parser = cli_values::at_least_one)]
        max_num_seqs: usize,
        /// Rows of one model step: a token per decoding sample plus prompt
        /// chunks (chunked prefill); at least --max-num-seqs.
        #[arg(long, default_value_t = 8192, value_parser = cli_values::at_least_one)]
        max_num_batched_tokens: usize,
        /// KV cache as this fraction of the device's free memory (0: sized
        /// for the whole batch); short of blocks, the youngest sequences
        /// are preempted and recomputed.
        #[arg(long, default_value_t = 0.0, value_parser = cli_values::fraction)]
        kv_cache_memory_fraction: f64,
        /// KV cache of exactly this many 16-token blocks (the CPU's budget;
        /// wins over --kv-cache-memory-fraction).
        #[arg(long, default_value_t = 0)]
        kv_cache_blocks: usize,
        /// Launch decode steps op by op instead of replaying captured CUDA
        /// graphs (vLLM's name; for debugging and profiling).
        #[arg(long)]
        enforce_eager: bool,
    },
    /// Benchmark a checkpoint: average accuracy@n (mean reward over n
    /// samples per problem, then over problems), the metric of the VPPO
    /// model cards. Reads parquet or JSONL rows (`problem` with `<image>`
    /// placeholders, `answer`, `images`), prompts with the recipe's
    /// instruction suffix, prints a summary table; per-problem results go to
    /// `--out` as JSONL.
    Eval {
        /// Hugging Face Qwen2.5-VL checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Benchmark file (.parquet, .jsonl).
        #[arg(long)]
        data: PathBuf,
        /// Samples per problem.
        #[arg(long, default_value_t = 8, value_parser = cli_values::at_least_one)]
        n: usize,
        /// Sampling temperature (the recipe validates at 1.0).
        #[arg(long, default_value_t = 1.0, value_parser = cli_values::temperature)]
        temperature: f32,
        /// Nucleus sampling mass (1.0 disables).
        #[arg(long, default_value_t = 1.0, value_parser = cli_values::top_p)]
        top_p: f32,
        /// Most tokens per response.
        #[arg(long, default_value_t = 2048, value_parser = cli_values::at_least_one)]
        max_new_tokens: usize,
        /// Evaluate only the first K usable problems.
        #[arg(long, value_parser = cli_values::at_least_one)]
        limit: Option<usize>,
        /// Per-problem results (JSONL).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Prompts generated together.
        #[arg(long, default_value_t = 8, value_parser = cli_values::at_least_one)]
        batch: usize,
        /// Seed of the sampling streams.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Problems longer than this many prompt tokens are skipped.
        #[arg(long, default_value_t = 4096, value_parser = cli_values::at_least_one)]
        max_prompt_tokens: usize,
        /// Column (or JSON key) holding the problem text.
        #[arg(long, default_value = "problem", allow_hyphen_values = true)]
        problem_column: String,
        /// Column holding the ground-truth answer.
        #[arg(long, default_value = "answer", allow_hyphen_values = true)]
        answer_column: String,
        /// Column holding the images.
        #[arg(long, default_value = "images", allow_hyphen_values = true)]
        images_column: String,
        /// Instruction appended after a blank line (default: the recipe's).
        #[arg(long, allow_hyphen_values = true)]
        prompt_suffix: Option<String>,
        /// Where to sample: auto (the GPU when one is usable), cpu, cuda.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Storage precision: fp32 (exact, the default), bf16 (bf16 weights
        /// and activations; on the CPU the bf16 twin), auto (bf16 on a GPU).
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
    },
    /// Rollout throughput on random weights at a checkpoint's shapes: N
    /// prompts of --prompt-tokens tokens with one --image-side image, each
    /// generating --new-tokens tokens (end-of-sequence ignored), for each
    /// --batch, plus the recipe's mix (--mix-prompts x --mix-n samples of
    /// long-tailed lengths up to --new-tokens). Prints output tokens/s and
    /// the HBM roofline (decoder weights + KV bytes read per step over
    /// --bandwidth-gbs) with the % reached; JSON lines to --out.
    BenchRollout {
        /// config.json giving the shapes (a checkpoint directory or the
        /// file, e.g. configs/qwen2_5_vl_7b.json); default: a tiny model.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 1024, value_parser = cli_values::at_least_one)]
        prompt_tokens: usize,
        /// Side of the prompt's one square image in pixels (a multiple of
        /// 28; 0: no image).
        #[arg(long, default_value_t = 448)]
        image_side: usize,
        #[arg(long, default_value_t = 512, value_parser = cli_values::at_least_one)]
        new_tokens: usize,
        /// Prompts of a fixed-length case (repeat for several).
        #[arg(long = "batch", default_values_t = [64usize, 256], value_parser = cli_values::at_least_one)]
        batches: Vec<usize>,
        /// Prompts of the mix case (0: no mix case).
        #[arg(long, default_value_t = 48)]
        mix_prompts: usize,
        /// Samples per prompt in the mix case.
        #[arg(long, default_value_t = 8, value_parser = cli_values::at_least_one)]
        mix_n: usize,
        /// HBM bandwidth of the roofline in GB/s (H200: 4800, H100 SXM: 3350).
        #[arg(long, default_value_t = 4800.0)]
        bandwidth_gbs: f64,
        #[arg(long, default_value_t = 256, value_parser = cli_values::at_least_one)]
        max_num_seqs: usize,
        #[arg(long, default_value_t = 8192, value_parser = cli_values::at_least_one)]
        max_num_batched_tokens: usize,
        /// KV cache as this fraction of free device memory (0: the whole batch).
        #[arg(long, default_value_t = 0.9, value_parser = cli_values::fraction)]
        kv_cache_memory_fraction: f64,
        /// KV cache of this many 16-token blocks (the CPU's budget).
        #[arg(long, default_value_t = 0)]
        kv_cache_blocks: usize,
        /// Launch decode steps op by op instead of replaying captured CUDA
        /// graphs (vLLM's name; for debugging and profiling).
        #[arg(long)]
        enforce_eager: bool,
        /// JSON lines, one per case.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Storage precision: auto (bf16 on a GPU, as `train`, fp32 on the
        /// CPU), bf16 (on the CPU the bf16 twin), fp32.
        #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
        precision: PrecisionArg,
    },
    /// Re-save a checkpoint in the Hub layout (`visual.*` / `model.*`
    /// names, sharded safetensors + index, other files copied), e.g. to
    /// convert dtypes or the newer `model.language_model.*` names.
    Convert {
        /// Source checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Destination directory: new, or empty (it is filled atomically).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the saved weights.
        #[arg(long, value_enum, default_value_t = SaveDtypeArg::Bf16)]
        dtype: SaveDtypeArg,
        /// Largest shard, in MiB.
        #[arg(long, default_value_t = 4096, value_parser = cli_values::shard_mib)]
        max_shard_mib: usize,
    },
    /// Start this node's ranks of a multi-process run, like torchrun: each
    /// gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. When
    /// one rank fails the others are stopped and the failing rank is named.
    /// Example: `vppo-engine launch --nproc-per-node 8 -- train --config c.toml`.
    /// Multi-node: once per node, with --nnodes, --node-rank and the first
    /// node's --master-addr. (torchrun and Slurm's srun work as well.)
    /// `train` under it trains data-parallel (see `train --help`); on the
    /// CPU, `launch --nproc-per-node 2 -- train` runs the built-in task on
    /// 2 ranks.
    Launch {
        /// Ranks (GPUs) on this node.
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Nodes in the run.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This node's index, 0..nnodes.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// Address of node 0, where rank 0 listens for the rendezvous.
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        #[arg(long, default_value_t = vppo_engine::distributed::world::DEFAULT_MASTER_PORT)]
        master_port: u16,
        /// The vppo-engine command each rank runs (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Grade a response with the VPPO accuracy reward: prints the answer in
    /// its last \boxed{...} (or that there is none), then `1` or `0`.
    Grade {
        /// The ground-truth answer (may start with `-`: `--answer -3`).
        #[arg(long, allow_hyphen_values = true)]
        answer: String,
        /// The model's response (may start with `-`).
        #[arg(long, allow_hyphen_values = true)]
        response: String,
    },
}

/// Work a command does with the model on some backend (the device is
/// picked once, in [`with_engine`]).
trait WithEngine {
    type Out;
    fn run<B: Backend>(self, engine: &Engine<B>) -> anyhow::Result<Self::Out>;
}

/// Runs `work` with `model` on `device` (resolved): this process's GPU
/// (`LOCAL_RANK`, else 0) or the CPU.
fn with_engine<W: WithEngine>(
    device: Device,
    precision: PrecisionArg,
    model: &Qwen25Vl,
    work: W,
) -> anyhow::Result<W::Out> {
    use vppo_engine::ops::Precision;
    match device {
        Device::Cuda => {
            let gpu = vppo_engine::backend::open_local_gpu()
                .map_err(anyhow::Error::msg)
                .context("--device cuda")?;
            let engine = Engine::with_precision(gpu, model, precision.on(Device::Cuda))
                .context("--device cuda: uploading the model")?;
            work.run(&engine)
        }
        _ => match precision.on(Device::Cpu) {
            Precision::Bf16 => work.run(&Engine::with_precision(
                vppo_engine::ops::cpu_bf16::CpuBf16Backend,
                model,
                Precision::Bf16,
            )?),
            Precision::Fp32 => work.run(&Engine::new(CpuBackend, model)?),
        },
    }
}

struct ScoreWork<'a> {
    pipeline: &'a vppo_engine::pipeline::Pipeline,
    images: &'a [PathBuf],
    prompt: &'a str,
    response: &'a str,
}

impl WithEngine for ScoreWork<'_> {
    type Out = vppo_engine::score::Scored;
    fn run<B: Backend>(self, engine: &Engine<B>) -> anyhow::Result<Self::Out> {
        Ok(self
            .pipeline
            .score_on(engine, self.images, self.prompt, self.response)?)
    }
}

struct GenerateWork<'a> {
    inputs: &'a [vppo_engine::model::SequenceInput],
    eos: Vec<u32>,
    n: usize,
    params: vppo_engine::rollout::sampling::SamplingParams,
    max_new_tokens: usize,
    seed: u64,
    limits: vppo_engine::rollout::generate::RolloutLimits,
}

impl WithEngine for GenerateWork<'_> {
    type Out = (
        Vec<vppo_engine::rollout::generate::Sample>,
        vppo_engine::rollout::generate::GenerationStats,
    );
    fn run<B: Backend>(self, engine: &Engine<B>) -> anyhow::Result<Self::Out> {
        let mut generator = vppo_engine::rollout::generate::Generator::new(engine, self.eos)
            .with_limits(self.limits);
        let samples = generator.generate(
            self.inputs,
            self.n,
            &self.params,
            self.max_new_tokens,
            self.seed,
        )?;
        Ok((samples, generator.stats))
    }
}

struct BenchRolloutWork<'a> {
    prompts: &'a [vppo_engine::model::SequenceInput],
    cases: &'a [vppo_engine::bench_rollout::Case],
    limits: vppo_engine::rollout::generate::RolloutLimits,
    bandwidth: f64,
    out: Option<std::fs::File>,
}

impl WithEngine for BenchRolloutWork<'_> {
    type Out = ();
    fn run<B: Backend>(mut self, engine: &Engine<B>) -> anyhow::Result<()> {
        use std::io::Write;
        for case in self.cases {
            let r = vppo_engine::bench_rollout::run_case(
                engine,
                self.prompts,
                case,
                self.limits,
                self.bandwidth,
            )?;
            println!(
                "{}: {} sequences, {} output tokens in {:.2} s: {:.1} tokens/s | roofline {:.4} s \
                 ({:.0} tokens/s; {} steps x {:.3} GB of weights + {:.3} GB of KV): {:.2}% of it | \
                 {} preemption(s), {} KV blocks | {} steps replayed from CUDA graphs",
                r.id,
                r.sequences,
                r.output_tokens,
                r.seconds,
                r.tokens_per_s,
                r.roofline_s,
                r.roofline_tokens_per_s,
                r.steps,
                r.weight_bytes as f64 / 1e9,
                r.kv_bytes as f64 / 1e9,
                r.pct_of_roofline,
                r.preemptions,
                r.kv_blocks,
                r.graph_replays
            );
            if let Some(f) = self.out.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&r)?)?;
            }
        }
        Ok(())
    }
}

struct EvalWork<'a, P, S> {
    pipeline: &'a vppo_engine::pipeline::Pipeline,
    data: &'a std::path::Path,
    opts: &'a vppo_engine::eval::EvalOptions,
    on_problem: P,
    on_skip: S,
}

impl<P, S> WithEngine for EvalWork<'_, P, S>
where
    P: FnMut(&vppo_engine::eval::ProblemResult),
    S: FnMut(&str),
{
    type Out = vppo_engine::eval::EvalSummary;
    fn run<B: Backend>(mut self, engine: &Engine<B>) -> anyhow::Result<Self::Out> {
        Ok(vppo_engine::eval::evaluate(
            self.pipeline,
            engine,
            self.data,
            self.opts,
            &mut self.on_problem,
            &mut self.on_skip,
        )?)
    }
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info => print!("{}", vppo_engine::info::report()),
        Command::Bench {
            model,
            seqs,
            seq_len,
            response_len,
            image_side,
            steps,
            warmup,
            no_recompute,
            no_optimizer,
            peak_tflops,
            device,
            precision,
            json,
        } => {
            use vppo_engine::model_bench::{self as mb, BenchOptions, BenchShape};
            let device = device.resolve(false);
            let shapes = vppo_engine::model::config::ModelConfig::load(&model)?;
            let opts = BenchOptions {
                shape: BenchShape {
                    seqs,
                    seq_len,
                    response_len,
                    image_side,
                },
                steps,
                warmup,
                recompute: !no_recompute,
                optimizer: !no_optimizer,
                peak_tflops,
                precision: precision.on(device),
            };
            // Fail on a bad shape before minutes of weight filling.
            mb::synthetic_batch(&shapes, &opts.shape)?;
            let name = model.display().to_string();
            let t = Instant::now();
            let weights = mb::random_model(&shapes);
            eprintln!(
                "model-step bench: {name}: {:.2}B parameters, random weights ({:.1} s); {seqs} x {seq_len} tokens \
                 ({response_len} response), one {image_side}x{image_side} image each; recompute {}, AdamW {}, {:?}",
                weights.layout.numel() as f64 / 1e9,
                t.elapsed().as_secs_f64(),
                if no_recompute { "off" } else { "on" },
                if no_optimizer { "off" } else { "on" },
                opts.precision,
            );
            let on_step = |step: usize, fb: f64, opt: Option<f64>| {
                eprintln!(
                    "step {}{}: forward + backward {fb:.3} s{}",
                    step + 1,
                    if step < warmup { " (warm-up)" } else { "" },
                    opt.map(|s| format!(", AdamW {s:.3} s")).unwrap_or_default()
                )
            };
            let report = match device {
                Device::Cuda => {
                    let gpu = vppo_engine::backend::open_local_gpu()
                        .map_err(anyhow::Error::msg)
                        .context("--device cuda")?;
                    let opts = BenchOptions {
                        peak_tflops: peak_tflops.or_else(|| {
                            mb::known_peak_tflops(&gpu.context().name().unwrap_or_default())
                        }),
                        ..opts
                    };
                    mb::run(gpu, weights, &opts, on_step)?
                }
                _ if opts.precision == vppo_engine::ops::Precision::Bf16 => mb::run(
                    vppo_engine::ops::cpu_bf16::CpuBf16Backend,
                    weights,
                    &opts,
                    on_step,
                )?,
                _ => mb::run(CpuBackend, weights, &opts, on_step)?,
            };
            println!("{}", report.summary());
            if json {
                println!("{}", report.json(&name));
            }
        }
        Command::Plan {
            model,
            gpu_mem,
            gpus,
            zero_stage,
            config,
            mut overrides,
        } => {
            use vppo_engine::train::memory_plan::{smallest_world, MemoryPlan, Workload};
            if let Some(stage) = zero_stage {
                overrides.push(format!("zero_stage={stage}"));
            }
            if gpus == 0 {
                bail!("--gpus 0: a run needs at least one GPU");
            }
            if let Some(model) = &model {
                overrides.push(format!("model={:?}", model.display().to_string()));
            }
            // The plan does not depend on the run's length, which a config
            // without data must otherwise name; the user's own value wins.
            overrides.insert(0, "max_steps=1".into());
            let cfg =
                vppo_engine::train::config::TrainConfig::resolve(config.as_deref(), &overrides)?;
            let Some(dir) = &cfg.model else {
                bail!("no model: give --model DIR|CONFIG (e.g. configs/models/qwen2.5-vl-7b) or model= in the config");
            };
            let shapes = vppo_engine::model::config::ModelConfig::load(dir)?;
            let gpu_bytes = (gpu_mem * (1u64 << 30) as f64) as u64;
            let workload = Workload::of(&cfg, &shapes);
            let plan = MemoryPlan::new(
                &shapes,
                &workload.clone().on_gpus(gpus, cfg.rollout_batch),
                gpu_bytes,
            );
            print!("{}", plan.render());
            match smallest_world(&shapes, &workload, cfg.rollout_batch, gpu_bytes, 1024) {
                Some(n) => println!(
                    "fewest GPUs of {gpu_mem:.1} GiB that fit (ZeRO-{}): {n}",
                    cfg.zero_stage
                ),
                None => println!(
                    "no number of GPUs of {gpu_mem:.1} GiB fits with ZeRO-{}: what every GPU \
                     holds whole (the largest phase{}) exceeds it",
                    cfg.zero_stage,
                    if cfg.zero_stage == 2 {
                        ", the weights and gradients"
                    } else {
                        ""
                    }
                ),
            }
            if !plan.fits() {
                std::process::exit(1);
            }
        }
        Command::Train {
            config,
            out,
            resume,
            algo,
            model,
            data,
            device,
            quiet,
            print_config,
            mut overrides,
        } => {
            if let Some(device) = device {
                overrides.push(format!("device={}", format!("{device:?}").to_lowercase()));
            }
            if let Some(algo) = algo {
                overrides.push(format!("algo={}", format!("{algo:?}").to_lowercase()));
            }
            if let Some(model) = model {
                overrides.push(format!("model={:?}", model.display().to_string()));
            }
            if let Some(data) = data {
                overrides.push(format!("data={:?}", data.display().to_string()));
            }
            if print_config {
                let saved = resume
                    .as_ref()
                    .map(|d| d.join(vppo_engine::train::run::CONFIG_FILE));
                let file = saved.as_deref().or(config.as_deref());
                let cfg = vppo_engine::train::config::TrainConfig::resolve(file, &overrides)?;
                print!("{}", cfg.to_toml());
                return Ok(());
            }
            let run_dir = resume.as_deref().or(out.as_deref());
            let summary = vppo_engine::train::run::run(
                config.as_deref(),
                &overrides,
                run_dir,
                resume.is_some(),
                !quiet,
            )?;
            if summary.rank != 0 {
                // Rank 0 reports for the whole run.
                return Ok(());
            }
            println!(
                "trained {} steps in {:.1} s; mean reward {:.3} over the first fifth of steps, {:.3} over the last",
                summary.steps,
                summary.seconds,
                summary.reward_first_fifth,
                summary.reward_last_fifth
            );
            if summary.skipped_steps > 0 {
                println!(
                    "skipped updates (non-finite loss or gradient norm): {}",
                    summary.skipped_steps
                );
            }
            if let Some((step, acc)) = summary.last_validation {
                println!("validation accuracy at step {step}: {acc:.4}");
            }
            if let Some(c) = &summary.checkpoint {
                println!("checkpoint: {}", c.display());
            }
            if let Some(b) = &summary.best {
                println!("best checkpoint (validation accuracy): {}", b.display());
            }
            if let Some(p) = &summary.plot {
                println!("plot: {}", p.display());
            }
        }
        Command::Grade { answer, response } => {
            print!("{}", vppo_engine::reward::grade_report(&response, &answer))
        }
        Command::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            command,
        } => {
            let plan = vppo_engine::distributed::launch::LaunchPlan {
                nproc_per_node,
                nnodes,
                node_rank,
                master_addr,
                master_port,
            };
            let exe = std::env::current_exe().context("cannot find this executable")?;
            plan.run(&exe, &command)?;
        }
        Command::Score {
            model,
            images,
            prompt,
            response,
            device,
            precision,
            out,
            grad_out,
        } => {
            let device = device.resolve(grad_out.is_some());
            if device == Device::Cuda && grad_out.is_some() {
                bail!("--grad-out runs on the CPU only (the backward is not on the CUDA backend yet); drop --device cuda");
            }
            let mut inputs: Vec<&std::path::Path> = images.iter().map(PathBuf::as_path).collect();
            outputs::check_output_file("--out", &out, &inputs, &[&model])?;
            if let Some(g) = &grad_out {
                inputs.push(&out);
                outputs::check_output_file("--grad-out", g, &inputs, &[&model])?;
            }
            let start = Instant::now();
            let scorer = vppo_engine::pipeline::Pipeline::load(&model)
                .with_context(|| format!("loading checkpoint {}", model.display()))?;
            let loaded = start.elapsed();
            let scored = with_engine(
                device,
                precision,
                &scorer.model,
                ScoreWork {
                    pipeline: &scorer,
                    images: &images,
                    prompt: &prompt,
                    response: &response,
                },
            )?;
            if let Some(i) = scored.response_logprobs.iter().position(|v| !v.is_finite()) {
                // Finite weights can still overflow (huge values): a NaN
                // score is not a score.
                bail!(
                    "the model in {} gives a non-finite log-prob ({}) for response token {i}: \
                     its weights overflow; nothing written",
                    model.display(),
                    scored.response_logprobs[i]
                );
            }
            scored.save(&out)?;
            if let Some(path) = &grad_out {
                let t = Instant::now();
                let grads = scorer.logprob_sum_grad(&images, &prompt, &response)?;
                scorer.save_grads(&grads, path)?;
                eprintln!(
                    "wrote gradients of {} tensors to {} ({:.2?})",
                    grads.0.len(),
                    path.display(),
                    t.elapsed()
                );
            }
            let r = scored.response_logprobs.len();
            let total: f32 = scored.response_logprobs.iter().sum();
            eprintln!(
                "scored {r} response tokens on {device:?} ({} prompt tokens, {} image(s)): sum log-prob {total:.4}, mean {:.4}; load {:.2?}, forward {:.2?}; wrote {}",
                scored.prompt_len,
                images.len(),
                total / r as f32,
                loaded,
                start.elapsed() - loaded,
                out.display()
            );
        }
        Command::Generate {
            model,
            images,
            prompt,
            prompts,
            n,
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            seed,
            device,
            precision,
            max_num_seqs,
            max_num_batched_tokens,
            kv_cache_memory_fraction,
            kv_cache_blocks,
            enforce_eager,
        } => {
            if max_num_batched_tokens < max_num_seqs {
                bail!(
                    "--max-num-batched-tokens ({max_num_batched_tokens}) must be at least \
                     --max-num-seqs ({max_num_seqs})"
                );
            }
            let limits = vppo_engine::rollout::generate::RolloutLimits::new(
                max_num_seqs,
                max_num_batched_tokens,
                kv_cache_blocks,
                kv_cache_memory_fraction,
            )
            .eager(enforce_eager);
            let device = device.resolve(false);
            let pipeline = vppo_engine::pipeline::Pipeline::load(&model)
                .with_context(|| format!("loading checkpoint {}", model.display()))?;
            let requests = match prompts {
                Some(file) => read_prompt_file(&file)?,
                None => vec![(prompt.unwrap_or_default(), images)],
            };
            let inputs = requests
                .iter()
                .map(|(text, imgs)| pipeline.prompt_input(imgs, text))
                .collect::<Result<Vec<_>, _>>()?;
            let params = vppo_engine::rollout::sampling::SamplingParams {
                temperature,
                top_p,
                top_k,
            };
            let eos = vppo_engine::rollout::generate::eos_ids(&model);
            let start = Instant::now();
            let (samples, st) = with_engine(
                device,
                precision,
                &pipeline.model,
                GenerateWork {
                    inputs: &inputs,
                    eos,
                    n,
                    params,
                    max_new_tokens,
                    seed,
                    limits,
                },
            )?;
            if let Some(s) = samples
                .iter()
                .find(|s| s.logprobs.iter().any(|v| !v.is_finite()))
            {
                bail!(
                    "the model in {} gives non-finite log-probs (prompt {}, sample {}): its \
                     weights overflow; the samples are noise",
                    model.display(),
                    s.prompt_index,
                    s.sample_index
                );
            }
            for s in &samples {
                let text = pipeline.text.decode(&s.token_ids, true)?;
                let line = serde_json::json!({
                    "prompt_index": s.prompt_index,
                    "sample_index": s.sample_index,
                    "text": text,
                    "token_ids": s.token_ids,
                    "logprobs": s.logprobs,
                    "finish_reason": s.finish_reason,
                });
                println!("{line}");
            }
            eprintln!(
                "{} samples from {} prompt(s): {} prefill(s) of {} tokens, {} images encoded, {} decode steps ({} replayed from {} CUDA graphs), {} tokens, {} preemption(s) ({} tokens recomputed) in {:.2?}",
                samples.len(),
                inputs.len(),
                st.prefills,
                st.prefill_tokens,
                st.images_encoded,
                st.decode_steps,
                st.graph_replays,
                st.graphs_captured,
                st.decoded_tokens + samples.len(),
                st.preemptions,
                st.recomputed_tokens,
                start.elapsed()
            );
        }
        Command::Eval {
            model,
            data,
            n,
            temperature,
            top_p,
            max_new_tokens,
            limit,
            out,
            batch,
            seed,
            max_prompt_tokens,
            problem_column,
            answer_column,
            images_column,
            prompt_suffix,
            device,
            precision,
        } => {
            use std::io::Write as _;
            if let Some(out) = &out {
                outputs::check_output_file("--out", out, &[&data], &[&model])?;
            }
            let pipeline = vppo_engine::pipeline::Pipeline::load(&model)
                .with_context(|| format!("loading checkpoint {}", model.display()))?;
            let opts = vppo_engine::eval::EvalOptions {
                n,
                sampling: vppo_engine::rollout::sampling::SamplingParams {
                    temperature,
                    top_p,
                    top_k: 0,
                },
                max_new_tokens,
                limit,
                batch,
                seed,
                columns: vppo_engine::data::Columns {
                    problem: problem_column,
                    answer: answer_column,
                    images: images_column,
                },
                format: vppo_engine::data::prompt::PromptFormat {
                    suffix: prompt_suffix
                        .unwrap_or_else(|| vppo_engine::data::VPPO_PROMPT_SUFFIX.to_string()),
                    max_prompt_tokens,
                },
            };
            // Written beside --out and moved into place at the end: a failed
            // run leaves an existing file as it was.
            let mut writer = match &out {
                Some(path) => Some(outputs::AtomicFile::create(path)?),
                None => None,
            };
            let bar = match limit {
                Some(l) => indicatif::ProgressBar::new(l as u64),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {pos} problems {wide_msg}",
                )
                .expect("valid progress template"),
            );
            let mut correct = 0.0;
            let mut write_error = None;
            let summary = with_engine(
                device.resolve(false),
                precision,
                &pipeline.model,
                EvalWork {
                    pipeline: &pipeline,
                    data: &data,
                    opts: &opts,
                    on_problem: |p: &vppo_engine::eval::ProblemResult| {
                        correct += p.accuracy;
                        bar.inc(1);
                        bar.set_message(format!(
                            "avg accuracy@{n} so far {:.3}",
                            correct / bar.position() as f64
                        ));
                        if let Some(w) = writer.as_mut() {
                            let line = serde_json::to_string(p).expect("results serialize");
                            if let Err(e) = writeln!(w, "{line}") {
                                write_error.get_or_insert(e);
                            }
                        }
                    },
                    on_skip: |why: &str| bar.println(format!("skipped {why}")),
                },
            )?;
            bar.finish_and_clear();
            if let Some(e) = write_error {
                bail!("writing {}: {e}", out.as_ref().unwrap().display());
            }
            if let Some(w) = writer {
                w.commit()?;
            }
            println!("{}", summary.table(n));
        }
        Command::BenchRollout {
            config,
            prompt_tokens,
            image_side,
            new_tokens,
            batches,
            mix_prompts,
            mix_n,
            bandwidth_gbs,
            max_num_seqs,
            max_num_batched_tokens,
            kv_cache_memory_fraction,
            kv_cache_blocks,
            enforce_eager,
            out,
            device,
            precision,
        } => {
            use vppo_engine::bench_rollout as bench;
            if max_num_batched_tokens < max_num_seqs {
                bail!(
                    "--max-num-batched-tokens ({max_num_batched_tokens}) must be at least \
                     --max-num-seqs ({max_num_seqs})"
                );
            }
            if !(bandwidth_gbs.is_finite() && bandwidth_gbs > 0.0) {
                bail!("--bandwidth-gbs {bandwidth_gbs} must be a positive number");
            }
            let model_config = match &config {
                Some(path) => vppo_engine::model::config::ModelConfig::load(path)
                    .with_context(|| format!("--config {}", path.display()))?,
                None => bench::tiny_config(),
            };
            let cases = bench::cases(&batches, new_tokens, mix_prompts, mix_n);
            let most = cases.iter().map(|c| c.prompts).max().unwrap_or(0);
            let prompts = (0..most)
                .map(|i| bench::bench_prompt(&model_config, prompt_tokens, image_side, i))
                .collect::<Result<Vec<_>, String>>()
                .map_err(anyhow::Error::msg)?;
            let layout = vppo_engine::model::params::ParamLayout::new(&model_config);
            let t0 = Instant::now();
            let weights = bench::random_weights(&layout, 0);
            let model = Qwen25Vl {
                dir: config.clone().unwrap_or_else(|| "tiny".into()),
                config: model_config,
                layout,
                weights,
                names: vppo_engine::model::checkpoint::NameLayout::Hub,
            };
            eprintln!(
                "bench-rollout: {} ({:.2}B parameters, random in {:.1?}), {prompt_tokens}-token prompts \
                 with a {image_side}px image, up to {new_tokens} new tokens, roofline at {bandwidth_gbs} GB/s",
                config
                    .as_ref()
                    .map_or("tiny model".to_string(), |p| p.display().to_string()),
                model.layout.numel() as f64 / 1e9,
                t0.elapsed()
            );
            let out = match &out {
                Some(path) => Some(
                    std::fs::File::create(path)
                        .with_context(|| format!("--out {}", path.display()))?,
                ),
                None => None,
            };
            with_engine(
                device.resolve(false),
                precision,
                &model,
                BenchRolloutWork {
                    prompts: &prompts,
                    cases: &cases,
                    limits: vppo_engine::rollout::generate::RolloutLimits::new(
                        max_num_seqs,
                        max_num_batched_tokens,
                        kv_cache_blocks,
                        kv_cache_memory_fraction,
                    )
                    .eager(enforce_eager),
                    bandwidth: bandwidth_gbs * 1e9,
                    out,
                },
            )?;
        }
        Command::Convert {
            model,
            out,
            dtype,
            max_shard_mib,
        } => {
            outputs::check_new_dir("--out", &out, &[&model], &[])?;
            let start = Instant::now();
            let loaded = vppo_engine::model::Qwen25Vl::load(&model)
                .with_context(|| format!("loading checkpoint {}", model.display()))?;
            let dtype = match dtype {
                SaveDtypeArg::F32 => vppo_engine::train::checkpoint::SaveDtype::F32,
                SaveDtypeArg::Bf16 => vppo_engine::train::checkpoint::SaveDtype::Bf16,
            };
            vppo_engine::train::checkpoint::save_hub_checkpoint(
                &loaded,
                &out,
                dtype,
                max_shard_mib << 20,
            )?;
            eprintln!(
                "saved {} tensors ({:.1}M parameters) to {} in {:.2?}",
                loaded.layout.specs.len(),
                loaded.layout.numel() as f64 / 1e6,
                out.display(),
                start.elapsed()
            );
        }
    }
    Ok(())
}

/// Reads a JSONL prompt file: one {"prompt": ..., "images": [...]} per line.
fn read_prompt_file(path: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<PathBuf>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not valid JSON", path.display(), i + 1))?;
        let Some(prompt) = row.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{} line {}: no \"prompt\" string", path.display(), i + 1);
        };
        let images = match row.get("images") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|p| p.as_str().map(|s| base.join(s)))
                        .collect::<Option<Vec<_>>>()
                })
                .with_context(|| {
                    format!(
                        "{} line {}: \"images\" must be a list of paths",
                        path.display(),
                        i + 1
                    )
                })?,
        };
        out.push((prompt.to_string(), images));
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(args: &[&str]) -> Command {
        let mut all = vec!["vppo-engine"];
        all.extend(args);
        match Cli::try_parse_from(&all) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    /// Each free-text value may start with `-` (a negative answer, a
    /// response or prompt opening with a dash) and is taken as the value.
    #[test]
    fn text_values_may_start_with_a_dash() {
        let Command::Grade { answer, response } =
            parses(&["grade", "--answer", "-3", "--response", "-x \\boxed{-3}"])
        else {
            panic!("not grade")
        };
        assert_eq!(
            (answer.as_str(), response.as_str()),
            ("-3", "-x \\boxed{-3}")
        );
        let Command::Score {
            prompt, response, ..
        } = parses(&[
            "score",
            "--model",
            "m",
            "--out",
            "o",
            "--prompt",
            "-p",
            "--response",
            "--r",
        ])
        else {
            panic!("not score")
        };
        assert_eq!((prompt.as_str(), response.as_str()), ("-p", "--r"));
        let Command::Generate { prompt, .. } =
            parses(&["generate", "--model", "m", "--prompt", "-1 + 1 = ?"])
        else {
            panic!("not generate")
        };
        assert_eq!(prompt.as_deref(), Some("-1 + 1 = ?"));
        let Command::Eval {
            prompt_suffix,
            problem_column,
            answer_column,
            images_column,
            ..
        } = parses(&[
            "eval",
            "--model",
            "m",
            "--data",
            "d",
            "--prompt-suffix",
            "- answer in a box",
            "--problem-column",
            "-q",
            "--answer-column",
            "-a",
            "--images-column",
            "-i",
        ])
        else {
            panic!("not eval")
        };
        assert_eq!(prompt_suffix.as_deref(), Some("- answer in a box"));
        assert_eq!(
            (
                problem_column.as_str(),
                answer_column.as_str(),
                images_column.as_str()
            ),
            ("-q", "-a", "-i")
        );
    }

    /// Without a value the option still fails clearly rather than taking
    /// nothing.
    #[test]
    fn a_missing_value_is_still_an_error() {
        let err = Cli::try_parse_from(["vppo-engine", "grade", "--answer"])
            .err()
            .expect("no value")
            .to_string();
        assert!(err.contains("--answer"), "{err}");
    }
}
