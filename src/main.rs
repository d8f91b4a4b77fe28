//! The `vppo-engine` command line.

use clap::{Parser, Subcommand};

/// VPPO reinforcement-learning fine-tuning of Qwen2.5-VL, in one binary.
#[derive(Parser)]
#[command(name = "vppo-engine", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the build (version, embedded CUDA kernels with their registers,
    /// shared memory and spills per architecture) and the CUDA devices found.
    Info,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => print!("{}", vppo_engine::info::report()),
    }
    Ok(())
}
