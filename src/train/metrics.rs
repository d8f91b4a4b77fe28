//! The run's metrics: one JSON object per optimizer step in
//! `metrics.jsonl`, and one per validation (`val/accuracy`, ...), appended
//! as the run goes (a crash loses nothing written), trimmed back to the
//! checkpoint's step when a run resumes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, from 1.
    pub step: u64,
    /// Rollout batch this step trained on, from 0.
    pub rollout_batch: u64,
    /// Mean reward over every response generated for the rollout batch.
    pub reward_mean: f64,
    /// Fraction of those responses that are correct.
    pub accuracy: f64,
    /// Not finite on a skipped update (written as null).
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    /// Mean negative log-prob of the step's response tokens.
    #[serde(deserialize_with = "null_as_nan")]
    pub entropy: f64,
    /// Mean token visual dependency (null without the perturbed pass).
    pub visual_dependency_mean: Option<f64>,
    /// Fraction of response tokens kept by top-k gradient filtering.
    pub tgf_kept_frac: f64,
    pub adv_scale_min: f64,
    pub adv_scale_max: f64,
    pub response_len_mean: f64,
    /// Groups dropped by dynamic sampling for this rollout batch.
    pub filtered_groups: usize,
    /// Groups this step trained on.
    pub groups: usize,
    pub clip_fraction: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    /// Updates skipped so far in the run because the loss or the gradient
    /// norm was not finite (the weights were left as they were).
    #[serde(default)]
    pub skipped_steps: u64,
    /// This step's update plus its share of the rollout batch's generation
    /// and scoring time.
    pub step_time_s: f64,
    /// Prompt and response tokens of the step's sequences per second of
    /// `step_time_s`.
    pub tokens_per_s: f64,
    /// Generation batches dynamic sampling ran to fill the rollout batch.
    #[serde(default)]
    pub gen_batches: u64,
    /// Mean KL-to-reference estimate per response token (KL loss only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_mean: Option<f64>,
    /// A custom reward's extra keys (`reward/<key>`, batch means).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// One validation: avg@n accuracy and mean response length on the
/// held-out data after `step` optimizer steps (0: before training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    pub step: u64,
    #[serde(rename = "val/accuracy")]
    pub accuracy: f64,
    #[serde(rename = "val/response_len_mean")]
    pub response_len_mean: f64,
    #[serde(rename = "val/problems")]
    pub problems: usize,
    #[serde(rename = "val/time_s")]
    pub seconds: f64,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Step(StepMetrics),
    Val(ValMetrics),
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Self::Step(m) => m.step,
            Self::Val(v) => v.step,
        }
    }

    fn to_json(&self) -> String {
        match self {
            Self::Step(m) => serde_json::to_string(m),
            Self::Val(v) => serde_json::to_string(v),
        }
        .expect("metrics serialize")
    }
}

/// JSON has no NaN: serde_json writes a non-finite number as null; read
/// it back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

pub struct MetricsLog {
    path: PathBuf,
    /// None: a data-parallel rank other than 0, which keeps its records in
    /// memory and writes nothing (rank 0 writes the log).
    file: Option<std::fs::File>,
    pub records: Vec<StepMetrics>,
    pub val: Vec<ValMetrics>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> MetricsError + '_ {
    move |e| MetricsError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads every line of a metrics file, steps and validations in order.
pub fn read_records(path: &Path) -> Result<Vec<Record>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let parse = |e: serde_json::Error| MetricsError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            };
            let v: serde_json::Value = serde_json::from_str(l).map_err(parse)?;
            if v.get("val/accuracy").is_some() {
                serde_json::from_value(v).map(Record::Val).map_err(parse)
            } else {
                serde_json::from_value(v).map(Record::Step).map_err(parse)
            }
        })
        .collect()
}

/// Reads the optimizer steps' records of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>, MetricsError> {
    Ok(read_records(path)?
        .into_iter()
        .filter_map(|r| match r {
            Record::Step(m) => Some(m),
            Record::Val(_) => None,
        })
        .collect())
}

/// Reads the validations of a metrics file.
pub fn read_validations(path: &Path) -> Result<Vec<ValMetrics>, MetricsError> {
    Ok(read_records(path)?
        .into_iter()
        .filter_map(|r| match r {
            Record::Val(v) => Some(v),
            Record::Step(_) => None,
        })
        .collect())
}

impl MetricsLog {
    /// Starts `path` afresh, or (resuming) keeps the records up to
    /// `keep_up_to` and drops later ones, which the resumed run rewrites.
    pub fn open(path: &Path, keep_up_to: Option<u64>) -> Result<Self, MetricsError> {
        let lines = match keep_up_to {
            Some(step) if path.exists() => {
                let mut r = read_records(path)?;
                r.retain(|m| m.step() <= step);
                r
            }
            _ => Vec::new(),
        };
        let tmp = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        let (mut records, mut val) = (Vec::new(), Vec::new());
        for r in lines {
            text.push_str(&r.to_json());
            text.push('\n');
            match r {
                Record::Step(m) => records.push(m),
                Record::Val(v) => val.push(v),
            }
        }
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            records,
            val,
        })
    }

    /// The records of `path` up to `keep_up_to` (none if it is absent),
    /// kept in memory; nothing is ever written.
    pub fn follow(path: &Path, keep_up_to: Option<u64>) -> Result<Self, MetricsError> {
        let (mut records, mut val) = (Vec::new(), Vec::new());
        if let (Some(step), true) = (keep_up_to, path.exists()) {
            for r in read_records(path)? {
                match r {
                    Record::Step(m) if m.step <= step => records.push(m),
                    Record::Val(v) if v.step <= step => val.push(v),
                    _ => {}
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: None,
            records,
            val,
        })
    }

    fn append(&mut self, r: &Record) -> Result<(), MetricsError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{}", r.to_json()).map_err(io(&self.path))?;
        file.flush().map_err(io(&self.path))
    }

    pub fn push(&mut self, m: StepMetrics) -> Result<(), MetricsError> {
        let r = Record::Step(m);
        self.append(&r)?;
        if let Record::Step(m) = r {
            self.records.push(m);
        }
        Ok(())
    }

    pub fn push_val(&mut self, v: ValMetrics) -> Result<(), MetricsError> {
        let r = Record::Val(v);
        self.append(&r)?;
        if let Record::Val(v) = r {
            self.val.push(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_steps_non_finite_numbers_survive_a_resume() {
        let dir = std::env::temp_dir().join(format!("vppo-metrics-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        let m = StepMetrics {
            step: 1,
            rollout_batch: 0,
            reward_mean: 0.5,
            accuracy: 0.5,
            loss: f64::NAN,
            entropy: f64::INFINITY,
            visual_dependency_mean: None,
            tgf_kept_frac: 1.0,
            adv_scale_min: 1.0,
            adv_scale_max: 1.0,
            response_len_mean: 3.0,
            filtered_groups: 0,
            groups: 1,
            clip_fraction: 0.0,
            grad_norm: f64::NAN,
            step_time_s: 0.1,
            tokens_per_s: 10.0,
            skipped_steps: 1,
            gen_batches: 1,
            kl_mean: None,
            extra: BTreeMap::new(),
        };
        log.push(m).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"loss\":null") && text.contains("\"skipped_steps\":1"));
        let back = MetricsLog::open(&path, Some(1)).unwrap().records;
        assert_eq!(back.len(), 1);
        assert!(back[0].loss.is_nan() && back[0].grad_norm.is_nan());
        assert_eq!(back[0].skipped_steps, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
