//! Rollouts: prefill and decode with a paged KV cache, sampling, batching
//! of live sequences.

pub mod device_generate;
pub mod generate;
pub mod kv_cache;
pub mod sampling;

use crate::model::device::DeviceModel;
use crate::model::{ModelError, Qwen25Vl, SequenceInput};
use device_generate::DeviceGenerator;
use generate::{GenerationStats, Generator, Sample};
use sampling::SamplingParams;

/// The CPU generator, or the device one when a [`DeviceModel`] is given:
/// one call site for the commands that sample (`generate`, `eval`, `train`).
pub enum AnyGenerator<'a> {
    Cpu(Generator<'a>),
    Device(DeviceGenerator<'a>),
}

impl<'a> AnyGenerator<'a> {
    pub fn new(model: &'a Qwen25Vl, device: Option<&'a mut DeviceModel>, eos: Vec<u32>) -> Self {
        match device {
            Some(dev) => Self::Device(DeviceGenerator::new(dev, eos)),
            None => Self::Cpu(Generator::new(model, eos)),
        }
    }

    /// `generate` of the generator behind (same contract on both).
    pub fn generate(
        &mut self,
        prompts: &[SequenceInput],
        n: usize,
        params: &SamplingParams,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Sample>, ModelError> {
        match self {
            Self::Cpu(g) => g.generate(prompts, n, params, max_new_tokens, seed),
            Self::Device(g) => g.generate(prompts, n, params, max_new_tokens, seed),
        }
    }

    pub fn stats(&self) -> &GenerationStats {
        match self {
            Self::Cpu(g) => &g.stats,
            Self::Device(g) => &g.stats,
        }
    }
}
