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
    },
    /// Grade a response with the VPPO accuracy reward: prints the answer in
    /// its last \boxed{...} (or that there is none), then `1` or `0`.
    Grade {
        /// The ground-truth answer.
        #[arg(long)]
        answer: String,
        /// The model's response.
        #[arg(long)]
        response: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => print!("{}", vppo_engine::info::report()),
        Command::Grade { answer, response } => {
            print!("{}", vppo_engine::reward::grade_report(&response, &answer))
        }
        Command::Score {
            model,
            images,
            prompt,
            response,
            device,
            out,
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
    }
    Ok(())
}
