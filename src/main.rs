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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SaveDtypeArg {
    F32,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
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
        /// The user's text.
        #[arg(long)]
        prompt: String,
        /// The assistant response to score.
        #[arg(long)]
        response: String,
        /// Where to run the model.
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Also write the gradient of sum(response_logprobs) w.r.t. every
        /// parameter (f32, under the checkpoint's own tensor names) here.
        #[arg(long)]
        grad_out: Option<PathBuf>,
    },
    /// Re-save a checkpoint in the Hub layout (`visual.*` / `model.*`
    /// names, sharded safetensors + index, other files copied), e.g. to
    /// convert dtypes or the newer `model.language_model.*` names.
    Convert {
        /// Source checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Destination directory (replaced atomically if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the saved weights.
        #[arg(long, value_enum, default_value_t = SaveDtypeArg::Bf16)]
        dtype: SaveDtypeArg,
        /// Largest shard, in MiB.
        #[arg(long, default_value_t = 4096)]
        max_shard_mib: usize,
    },
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info => print!("{}", vppo_engine::info::report()),
        Command::Score {
            model,
            images,
            prompt,
            response,
            device,
            out,
            grad_out,
        } => {
            if device == Device::Cuda {
                bail!("--device cuda: the model does not run on the CUDA backend yet (only single kernels do); use --device cpu");
            }
            let start = Instant::now();
            let scorer = vppo_engine::score::Scorer::load(&model)
                .with_context(|| format!("loading checkpoint {}", model.display()))?;
            let loaded = start.elapsed();
            let scored = scorer.score(&images, &prompt, &response)?;
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
                "scored {r} response tokens ({} prompt tokens, {} image(s)): sum log-prob {total:.4}, mean {:.4}; load {:.2?}, forward {:.2?}; wrote {}",
                scored.prompt_len,
                images.len(),
                total / r as f32,
                loaded,
                start.elapsed() - loaded,
                out.display()
            );
        }
        Command::Convert {
            model,
            out,
            dtype,
            max_shard_mib,
        } => {
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
