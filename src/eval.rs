//! `vppo-engine eval`: the model card's benchmark metric, average
//! accuracy@n (mean reward over n samples per problem, then over problems),
//! streamed over a parquet/JSONL benchmark in batches of prompts.

use crate::data::prompt::{build_prompt, PromptFormat, Skip};
use crate::data::{open_rows, Columns, DataError, Example, RowCounts};
use crate::model::engine::Engine;
use crate::model::ModelError;
use crate::ops::Backend;
use crate::pipeline::{Pipeline, PipelineError};
use crate::reward::accuracy_reward;
use crate::rollout::generate::{eos_ids, Generator, Sample};
use crate::rollout::sampling::SamplingParams;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{path}: no usable problem ({corrupt} corrupt, {too_long} too long{example}); nothing was evaluated")]
    NoUsableRow {
        path: std::path::PathBuf,
        corrupt: usize,
        too_long: usize,
        /// "; e.g. <the first reason>", or nothing for an empty file.
        example: String,
    },
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub n: usize,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Stop after this many usable problems.
    pub limit: Option<usize>,
    /// Prompts generated together.
    pub batch: usize,
    pub seed: u64,
    pub columns: Columns,
    pub format: PromptFormat,
}

impl Default for EvalOptions {
    /// The VPPO validation setting: avg@8 at temperature 1.0.
    fn default() -> Self {
        Self {
            n: 8,
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
            },
            max_new_tokens: 2048,
            limit: None,
            batch: 8,
            seed: 0,
            columns: Columns::default(),
            format: PromptFormat::default(),
        }
    }
}

/// One problem's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProblemResult {
    pub row: usize,
    pub problem: String,
    pub answer: String,
    /// Mean reward over the n samples.
    pub accuracy: f64,
    pub responses: Vec<ResponseResult>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResponseResult {
    pub text: String,
    pub reward: f32,
    pub tokens: usize,
    pub finish_reason: crate::rollout::generate::FinishReason,
}

#[derive(Debug, Clone, Default)]
pub struct EvalSummary {
    pub problems: usize,
    pub samples: usize,
    /// Average accuracy@n over the problems.
    pub accuracy: f64,
    pub mean_response_tokens: f64,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub rows: RowCounts,
}

impl EvalSummary {
    /// The summary table printed at the end of `eval`.
    pub fn table(&self, n: usize) -> String {
        let rate = |x: f64| {
            if self.seconds > 0.0 {
                x / self.seconds
            } else {
                0.0
            }
        };
        format!(
            "| metric | value |\n|---|---|\n| problems | {} |\n| samples | {} ({} per problem) |\n| avg accuracy@{n} | {:.4} |\n\
             | mean response length | {:.1} tokens |\n| throughput | {:.1} tokens/s, {:.2} samples/s |\n\
             | skipped rows | {} corrupt, {} too long |\n| wall time | {:.1} s |",
            self.problems,
            self.samples,
            n,
            self.accuracy,
            self.mean_response_tokens,
            rate(self.generated_tokens as f64),
            rate(self.samples as f64),
            self.rows.corrupt,
            self.rows.too_long,
            self.seconds
        )
    }
}

/// Runs the benchmark, sampling on `engine`'s backend; `on_problem`
/// receives each finished problem (for the JSONL output), `on_skip` each
/// skipped row with its reason.
pub fn evaluate<B: Backend>(
    pipeline: &Pipeline,
    engine: &Engine<B>,
    data: &Path,
    opts: &EvalOptions,
    on_problem: &mut dyn FnMut(&ProblemResult),
    on_skip: &mut dyn FnMut(&str),
) -> Result<EvalSummary, EvalError> {
    let start = Instant::now();
    let mut summary = EvalSummary::default();
    let mut accuracy_sum = 0.0;
    let mut response_tokens = 0usize;
    let mut pending: Vec<(Example, crate::model::SequenceInput)> = Vec::new();
    let mut generator = Generator::new(engine, eos_ids(&pipeline.model.dir));
    let mut batch_index = 0u64;
    let mut flush = |pending: &mut Vec<(Example, crate::model::SequenceInput)>,
                     summary: &mut EvalSummary,
                     generator: &mut Generator<B>|
     -> Result<(), EvalError> {
        if pending.is_empty() {
            return Ok(());
        }
        let inputs: Vec<_> = pending.iter().map(|(_, input)| input.clone()).collect();
        let seed = opts
            .seed
            .wrapping_add(batch_index.wrapping_mul(0x9E37_79B9));
        batch_index += 1;
        let samples =
            generator.generate(&inputs, opts.n, &opts.sampling, opts.max_new_tokens, seed)?;
        for (pi, (example, _)) in pending.iter().enumerate() {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.prompt_index == pi).collect();
            let mut responses = Vec::with_capacity(mine.len());
            for s in mine {
                let text = pipeline
                    .text
                    .decode(&s.token_ids, true)
                    .map_err(PipelineError::from)?;
                let reward = accuracy_reward(&text, &example.answer);
                response_tokens += s.token_ids.len();
                summary.generated_tokens += s.token_ids.len();
                responses.push(ResponseResult {
                    reward,
                    tokens: s.token_ids.len(),
                    finish_reason: s.finish_reason,
                    text,
                });
            }
            let accuracy = responses.iter().map(|r| r.reward as f64).sum::<f64>()
                / responses.len().max(1) as f64;
            accuracy_sum += accuracy;
            summary.problems += 1;
            summary.samples += responses.len();
            on_problem(&ProblemResult {
                row: example.row,
                problem: example.problem.clone(),
                answer: example.answer.clone(),
                accuracy,
                responses,
            });
        }
        pending.clear();
        Ok(())
    };
    let mut first_skip: Option<String> = None;
    for row in open_rows(data, &opts.columns)? {
        if opts.limit.is_some_and(|l| summary.rows.used >= l) {
            break;
        }
        let example = match row? {
            Ok(ex) => ex,
            Err(e) => {
                summary.rows.corrupt += 1;
                first_skip.get_or_insert_with(|| e.to_string());
                on_skip(&e.to_string());
                continue;
            }
        };
        match build_prompt(pipeline, &example, &opts.format) {
            Ok(input) => {
                summary.rows.used += 1;
                pending.push((example, input));
            }
            Err(Skip::Corrupt(e)) => {
                summary.rows.corrupt += 1;
                first_skip.get_or_insert_with(|| e.to_string());
                on_skip(&e.to_string());
            }
            Err(Skip::TooLong { row, tokens }) => {
                summary.rows.too_long += 1;
                let why = format!(
                    "row {row}: prompt of {tokens} tokens exceeds {}",
                    opts.format.max_prompt_tokens
                );
                first_skip.get_or_insert_with(|| why.clone());
                on_skip(&why);
            }
        }
        if pending.len() >= opts.batch.max(1) {
            flush(&mut pending, &mut summary, &mut generator)?;
        }
    }
    flush(&mut pending, &mut summary, &mut generator)?;
    if summary.problems == 0 {
        // An accuracy over no problems is not 0: it does not exist.
        return Err(EvalError::NoUsableRow {
            path: data.to_path_buf(),
            corrupt: summary.rows.corrupt,
            too_long: summary.rows.too_long,
            example: first_skip.map_or(String::new(), |e| format!("; e.g. {e}")),
        });
    }
    summary.accuracy = if summary.problems > 0 {
        accuracy_sum / summary.problems as f64
    } else {
        0.0
    };
    summary.mean_response_tokens = if summary.samples > 0 {
        response_tokens as f64 / summary.samples as f64
    } else {
        0.0
    };
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
