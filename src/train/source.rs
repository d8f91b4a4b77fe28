//! Where training prompts come from, in a reproducible order: the built-in
//! counting task (item i is a pure function of the seed and i), or a
//! parquet/JSONL data set streamed row by row, epoch after epoch. The
//! position (rows consumed) is all a resumed run needs to continue exactly.

use super::step::Prompt;
use crate::builtin::CountingTask;
use crate::data::order::EpochOrder;
use crate::data::prompt::{build_prompt, prompt_text, trim_problem, PromptFormat, Skip};
use crate::data::shards::Shards;
use crate::data::{Columns, DataError, RowResult};
use crate::pipeline::{Pipeline, PipelineError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Rows read ahead at a time in a shuffled order: each window is one
/// forward pass over the shards it touches.
const READ_AHEAD: u64 = 512;

/// How a data set is ordered and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOrder {
    pub shuffle: bool,
    pub seed: u64,
    /// Each epoch's last incomplete batch of this many rows is dropped.
    pub batch: u64,
    /// `None`: cycle epochs for as long as the run asks.
    pub epochs: Option<u64>,
}

pub enum PromptSource {
    Builtin {
        task: CountingTask,
        format: PromptFormat,
        position: u64,
    },
    Dataset {
        /// What the config names (a file, a folder of shards or a glob).
        path: PathBuf,
        shards: Box<Shards>,
        order: EpochOrder,
        format: PromptFormat,
        /// Epochs before the source ends (`None`: it never does; the run
        /// counts its own length).
        epochs: Option<u64>,
        /// The next rows in training order, read ahead in global-index
        /// order: `(global row, row)`.
        ahead: VecDeque<(u64, RowResult)>,
        /// Rows consumed over all epochs (usable or not).
        position: u64,
        /// Boxed: the row set makes it large next to the built-in variant.
        skipped: Box<SkippedRows>,
        /// Position the source was opened at (a resumed run's).
        start: u64,
        /// Usable prompts handed out since then.
        usable: u64,
    },
    /// Several data sets, each next prompt drawn from one of them with the
    /// given probabilities (OpenRLHF's `prompt_probs`); ends when the drawn
    /// one runs out (Hugging Face's `first_exhausted`).
    Mix(Box<Mix>),
}

pub struct Mix {
    pub sources: Vec<PromptSource>,
    /// Cumulative, normalised weights.
    cumulative: Vec<f64>,
    seed: u64,
    /// Prompts drawn so far: the draw of prompt k is a pure function of
    /// (seed, k), so a resumed run continues the same sequence.
    draws: u64,
    skipped: SkippedRows,
}

/// The source index prompt `k` of a mix comes from.
pub fn mix_choice(cumulative: &[f64], seed: u64, k: u64) -> usize {
    // splitmix64 of (seed, k) to a uniform in [0, 1).
    let mut x = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let u = (x >> 11) as f64 / (1u64 << 53) as f64;
    cumulative
        .iter()
        .position(|&c| u < c)
        .unwrap_or(cumulative.len() - 1)
}

impl Mix {
    /// `sources` opened at their own positions, `draws` prompts into the
    /// mix; `weights` (empty: equal) are normalised here.
    pub fn new(sources: Vec<PromptSource>, weights: &[f64], seed: u64, draws: u64) -> Self {
        let weights: Vec<f64> = if weights.is_empty() {
            vec![1.0; sources.len()]
        } else {
            weights.to_vec()
        };
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self {
            sources,
            cumulative,
            seed,
            draws,
            skipped: SkippedRows::default(),
        }
    }

    /// Rows consumed in each data set (what a resumed run reopens at).
    pub fn positions(&self) -> Vec<u64> {
        self.sources.iter().map(PromptSource::position).collect()
    }
}

/// Rows of the data set that could not be used, each counted once however
/// many epochs meet it, with the first few reasons.
#[derive(Debug, Default, Clone)]
pub struct SkippedRows {
    pub corrupt: usize,
    pub too_long: usize,
    pub examples: Vec<String>,
    seen: std::collections::HashSet<u64>,
}

impl SkippedRows {
    /// `key` identifies the row across shards and epochs.
    fn note(&mut self, key: u64, skip: Skip) {
        if !self.seen.insert(key) {
            return;
        }
        let text = match skip {
            Skip::Corrupt(e) => {
                self.corrupt += 1;
                e.to_string()
            }
            Skip::TooLong { row, tokens } => {
                self.too_long += 1;
                format!("row {row}: prompt of {tokens} tokens is over max_prompt_tokens")
            }
        };
        if self.examples.len() < 5 {
            self.examples.push(text);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{path}: no usable row (corrupt: {corrupt}, too long: {too_long}; e.g. {example})")]
    NoUsableRow {
        path: PathBuf,
        corrupt: usize,
        too_long: usize,
        example: String,
    },
    #[error("{path}: the data set has no rows")]
    Empty { path: PathBuf },
}

impl PromptSource {
    pub fn builtin(task: CountingTask, format: PromptFormat, position: u64) -> Self {
        Self::Builtin {
            task,
            format,
            position,
        }
    }

    /// Opens the data set `path` names (a file, a folder of shards or a
    /// glob) at `position`, the rows a previous run consumed.
    pub fn dataset(
        path: &Path,
        columns: Columns,
        format: PromptFormat,
        order: DataOrder,
        position: u64,
    ) -> Result<Self, SourceError> {
        let shards = Shards::open(path, &columns)?;
        if shards.is_empty() {
            return Err(SourceError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self::Dataset {
            order: EpochOrder::new(shards.len(), order.batch, order.shuffle, order.seed),
            shards: Box::new(shards),
            path: path.to_path_buf(),
            format,
            epochs: order.epochs,
            ahead: VecDeque::new(),
            position,
            skipped: Box::default(),
            start: position,
            usable: 0,
        })
    }

    /// Rows of a data set (a mix: of all of them); `None` for the built-in
    /// task.
    pub fn rows(&self) -> Option<u64> {
        match self {
            Self::Builtin { .. } => None,
            Self::Dataset { shards, .. } => Some(shards.len()),
            Self::Mix(mix) => mix.sources.iter().map(PromptSource::rows).sum(),
        }
    }

    /// Rows consumed (a mix: prompts drawn; see [`Mix::positions`]).
    pub fn position(&self) -> u64 {
        match self {
            Self::Builtin { position, .. } | Self::Dataset { position, .. } => *position,
            Self::Mix(mix) => mix.draws,
        }
    }

    /// The rows of each data set of a mix consumed so far.
    pub fn mix_positions(&self) -> Option<Vec<u64>> {
        match self {
            Self::Mix(mix) => Some(mix.positions()),
            _ => None,
        }
    }

    pub fn skipped(&self) -> Option<&SkippedRows> {
        match self {
            Self::Builtin { .. } => None,
            Self::Dataset { skipped, .. } => Some(skipped.as_ref()),
            Self::Mix(mix) => Some(&mix.skipped),
        }
    }

    /// The next row in training order, `(global row, row)`; `None` once
    /// every epoch is done.
    fn next_row(&mut self) -> Result<Option<(u64, RowResult)>, SourceError> {
        let Self::Dataset {
            shards,
            order,
            epochs,
            ahead,
            position,
            ..
        } = self
        else {
            unreachable!("next_row is for data sets")
        };
        let epoch_len = order.epoch_len();
        let end = epochs.map_or(u64::MAX, |e| e * epoch_len);
        if ahead.is_empty() && *position < end {
            // A window inside one epoch (a row appears once in it), read in
            // ascending row order and handed out in training order.
            let epoch_end = (*position / epoch_len + 1) * epoch_len;
            let window_end = (*position + READ_AHEAD).min(epoch_end).min(end);
            let rows: Vec<u64> = (*position..window_end).map(|p| order.row(p)).collect();
            let mut sorted = rows.clone();
            sorted.sort_unstable();
            let mut read = std::collections::HashMap::with_capacity(sorted.len());
            for r in sorted {
                read.insert(r, shards.read(r)?);
            }
            for r in rows {
                let row = read.remove(&r).expect("read above");
                ahead.push_back((r, row));
            }
        }
        let Some(next) = ahead.pop_front() else {
            return Ok(None);
        };
        *position += 1;
        Ok(Some(next))
    }

    /// The end of the data: an error when a run starting from the first row
    /// never found a usable one (an empty file, or every row skipped).
    fn exhausted(&self) -> Result<Option<Prompt>, SourceError> {
        let Self::Dataset {
            path,
            skipped,
            start: 0,
            usable: 0,
            ..
        } = self
        else {
            return Ok(None);
        };
        if skipped.corrupt + skipped.too_long == 0 {
            return Err(SourceError::Empty { path: path.clone() });
        }
        Err(SourceError::NoUsableRow {
            path: path.clone(),
            corrupt: skipped.corrupt,
            too_long: skipped.too_long,
            example: skipped.examples.first().cloned().unwrap_or_default(),
        })
    }

    /// The next usable prompt, or `None` when the data set is exhausted.
    pub fn next_prompt(&mut self, pipeline: &Pipeline) -> Result<Option<Prompt>, SourceError> {
        if let Self::Mix(mix) = self {
            let i = mix_choice(&mix.cumulative, mix.seed, mix.draws);
            let prompt = mix.sources[i].next_prompt(pipeline)?;
            if prompt.is_some() {
                mix.draws += 1;
            }
            // The summary's skipped rows: every data set's, together.
            let mut all = SkippedRows::default();
            for s in &mix.sources {
                if let Some(k) = s.skipped() {
                    all.corrupt += k.corrupt;
                    all.too_long += k.too_long;
                    all.examples.extend(
                        k.examples
                            .iter()
                            .take(5 - all.examples.len().min(5))
                            .cloned(),
                    );
                }
            }
            mix.skipped = all;
            return Ok(prompt);
        }
        if let Self::Builtin {
            task,
            format,
            position,
        } = self
        {
            let item = task.item(*position);
            let name = PathBuf::from(format!("built-in item {position}"));
            *position += 1;
            let input = pipeline.prompt_input_from_images(
                &[(item.image, name)],
                &prompt_text(&item.question, format),
            )?;
            return Ok(Some(Prompt {
                input,
                answer: item.answer,
                problem: item.question,
            }));
        }
        // Stop at a full pass without one usable row rather than loop forever.
        let mut since_usable = 0u64;
        loop {
            let Some((global, row)) = self.next_row()? else {
                return self.exhausted();
            };
            let Self::Dataset {
                path,
                shards,
                format,
                skipped,
                order,
                usable,
                ..
            } = self
            else {
                unreachable!()
            };
            let built = row
                .map_err(Skip::Corrupt)
                .and_then(|example| Ok((build_prompt(pipeline, &example, format)?, example)));
            match built {
                Ok((input, example)) => {
                    *usable += 1;
                    return Ok(Some(Prompt {
                        input,
                        answer: example.answer,
                        problem: trim_problem(&example.problem).to_string(),
                    }));
                }
                Err(skip) => {
                    skipped.note(global, skip);
                    since_usable += 1;
                    // Every row found unusable; or, should an epoch's
                    // dropped tail hide the usable ones, three epochs'
                    // worth in a row (a shuffle can put an unusable row at
                    // the end of one epoch and the start of the next).
                    if skipped.seen.len() as u64 >= shards.len()
                        || since_usable >= 3 * order.epoch_len()
                    {
                        return Err(SourceError::NoUsableRow {
                            path: path.clone(),
                            corrupt: skipped.corrupt,
                            too_long: skipped.too_long,
                            example: skipped.examples.first().cloned().unwrap_or_default(),
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_draws_each_source_by_its_weight_and_repeats_per_seed() {
        let cumulative = [0.75, 1.0];
        let draws: Vec<usize> = (0..8000).map(|k| mix_choice(&cumulative, 9, k)).collect();
        let first = draws.iter().filter(|&&i| i == 0).count() as f64 / draws.len() as f64;
        assert!((first - 0.75).abs() < 0.02, "{first}");
        let again: Vec<usize> = (0..8000).map(|k| mix_choice(&cumulative, 9, k)).collect();
        assert_eq!(draws, again, "a pure function of (seed, k)");
        let other: Vec<usize> = (0..8000).map(|k| mix_choice(&cumulative, 10, k)).collect();
        assert_ne!(draws, other, "another seed, another order");
        // A zero weight is never drawn.
        assert!((0..2000).all(|k| mix_choice(&[0.0, 1.0], 3, k) == 1));
    }
}
