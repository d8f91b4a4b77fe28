//! Validation during training (EasyR1's `val_freq`, `val_before_train`):
//! average accuracy@n on held-out data with the eval code (`eval::evaluate`,
//! the same as `vppo-engine eval`), on the training device, with the
//! weights being trained. The built-in task validates on a fixed generated
//! split written into the run directory (so `eval` can use it too).

use super::config::TrainConfig;
use super::metrics::ValMetrics;
use crate::builtin::CountingTask;
use crate::data::RowCounts;
use crate::eval::{evaluate, EvalError, EvalOptions};
use crate::model::engine::Engine;
use crate::ops::Backend;
use crate::pipeline::Pipeline;
use std::path::{Path, PathBuf};

pub const VAL_DIR: &str = "val";
pub const BUILTIN_VAL_FILE: &str = "builtin-val.jsonl";
/// Problems in the built-in split.
pub const BUILTIN_VAL_SIZE: u64 = 64;
/// The built-in split's own stream: the same problems for every run seed
/// (so runs compare), apart from the training and warm-up streams.
const BUILTIN_VAL_SEED: u64 = 0x7A1D_A7E5_0000_0017;
/// Validation samples with the same seed every time: differences between
/// two validations come from the weights, not the sampling noise.
const VAL_SAMPLING_SEED: u64 = 0x5A3F_11E0;

#[derive(Debug, thiserror::Error)]
pub enum ValError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("validation on {data}: {source}")]
    Eval {
        data: PathBuf,
        source: Box<EvalError>,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ValError + '_ {
    move |e| ValError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes the built-in task's held-out split (PNG images and a JSONL file
/// in the `eval` format) under `run_dir/val/`; the same bytes every time.
pub fn write_builtin_split(run_dir: &Path, grid: usize) -> Result<PathBuf, ValError> {
    let dir = run_dir.join(VAL_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let task = CountingTask::new(grid, BUILTIN_VAL_SEED);
    let mut lines = String::new();
    for i in 0..BUILTIN_VAL_SIZE {
        let item = task.item(i);
        let name = format!("{i:03}.png");
        let path = dir.join(&name);
        let img = image::RgbImage::from_raw(
            item.image.width as u32,
            item.image.height as u32,
            item.image.data,
        )
        .ok_or_else(|| ValError::Io {
            path: path.clone(),
            reason: "image buffer size".into(),
        })?;
        img.save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| ValError::Io {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        lines.push_str(
            &serde_json::json!({
                "problem": format!("<image>{}", item.question),
                "answer": item.answer,
                "images": [name],
            })
            .to_string(),
        );
        lines.push('\n');
    }
    let path = dir.join(BUILTIN_VAL_FILE);
    let tmp = dir.join(format!(".{BUILTIN_VAL_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, lines).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// The eval settings of a validation: `val_n` samples per problem at the
/// recipe's validation sampling (temperature 1.0, no top-p), the training
/// prompt format and response length.
pub fn options(cfg: &TrainConfig) -> EvalOptions {
    EvalOptions {
        n: cfg.val_n,
        max_new_tokens: cfg.max_response_tokens,
        limit: (cfg.val_max_samples > 0).then_some(cfg.val_max_samples),
        batch: cfg.rollout_batch.clamp(1, 64),
        seed: VAL_SAMPLING_SEED,
        format: crate::data::prompt::PromptFormat {
            suffix: cfg.prompt_suffix.clone(),
            max_prompt_tokens: cfg.max_prompt_tokens,
        },
        ..EvalOptions::default()
    }
}

/// One validation at `step` on `engine`'s backend, and the data's row
/// counts (used, skipped as corrupt or too long).
pub fn validate<B: Backend>(
    pipeline: &Pipeline,
    engine: &Engine<B>,
    data: &Path,
    opts: &EvalOptions,
    step: u64,
) -> Result<(ValMetrics, RowCounts), ValError> {
    let summary =
        evaluate(pipeline, engine, data, opts, &mut |_| {}, &mut |_| {}).map_err(|source| {
            ValError::Eval {
                data: data.to_path_buf(),
                source: Box::new(source),
            }
        })?;
    let v = ValMetrics {
        step,
        accuracy: summary.accuracy,
        response_len_mean: summary.mean_response_tokens,
        problems: summary.problems,
        seconds: summary.seconds,
    };
    Ok((v, summary.rows))
}

/// Whether a validation is due after the rollout batch that moved the run
/// from step `before` to `after`.
pub fn due(val_freq: usize, before: u64, after: u64) -> bool {
    val_freq > 0 && after / val_freq as u64 > before / val_freq as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_is_due_when_a_multiple_of_val_freq_is_crossed() {
        assert!(due(5, 4, 5));
        assert!(due(5, 3, 6), "a rollout batch of several steps crosses 5");
        assert!(!due(5, 5, 6));
        assert!(!due(0, 0, 100), "0: never during training");
    }
}
