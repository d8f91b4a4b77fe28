//! Checkpoints: model weights in the Hugging Face Hub layout (sharded
//! safetensors + index, config, tokenizer and processor files copied) that
//! transformers loads as they are, plus a resumable training state.
//!
//! Nothing is ever half-written in place: a checkpoint is written into a
//! temporary sibling directory and renamed into place; a training run keeps
//! numbered checkpoints and a `latest` file (itself replaced by rename), so a
//! run killed during a save still resumes from the previous checkpoint.

use super::optimizer::{AdamW, WeightPrecision};
use crate::backend::cpu::adamw::AdamWConfig;
use crate::model::checkpoint::{Checkpoint, LoadError};
use crate::model::params::{ParamLayout, Tensors};
use crate::model::{ModelError, Qwen25Vl};
use crate::safetensors_io::{write_atomic, OwnedTensor, WriteError};
use half::bf16;
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read checkpoint file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "not saving a checkpoint: tensor `{name}` holds a non-finite value (the run diverged)"
    )]
    NonFinite { name: String },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Storage dtype of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

/// Non-weight files of a checkpoint directory worth carrying over: configs,
/// tokenizer and processor files, chat templates, model card and license.
fn is_companion_file(name: &str) -> bool {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    name != "model.safetensors.index.json"
        && (matches!(ext, "json" | "txt" | "jinja" | "model" | "tiktoken" | "md")
            || name.starts_with("LICENSE"))
}

/// Writes the model's weights in the Hub layout into `dir` (which must
/// exist and be empty), in shards of at most `max_shard_bytes`, with
/// `model.safetensors.index.json`; copies the source checkpoint's other
/// files (config, tokenizer, chat template, processor config). `on_file` is
/// told about every file written (progress, and crash tests).
pub fn write_hub_weights(
    model: &Qwen25Vl,
    dir: &Path,
    dtype: SaveDtype,
    max_shard_bytes: usize,
    on_file: &mut dyn FnMut(&Path),
) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(&model.dir)
        .map_err(read_err(&model.dir))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && is_companion_file(&name) {
            let dest = dir.join(&name);
            std::fs::copy(entry.path(), &dest).map_err(io(&dest))?;
            on_file(&dest);
        }
    }
    let elem = match dtype {
        SaveDtype::F32 => 4,
        SaveDtype::Bf16 => 2,
    };
    // Greedy sharding in table order, as transformers does.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, spec) in model.layout.specs.iter().enumerate() {
        let bytes = spec.numel() * elem;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes;
    }
    let total = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (k, shard) in shards.iter().enumerate() {
        let file = if total == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, total)
        };
        let tensors: Vec<OwnedTensor> = shard
            .iter()
            .map(|&i| {
                let spec = &model.layout.specs[i];
                let values = &model.weights.0[i];
                total_size += spec.numel() * elem;
                weight_map.insert(spec.name.clone(), file.clone().into());
                match dtype {
                    SaveDtype::F32 => OwnedTensor::f32(&spec.name, &spec.shape, values),
                    SaveDtype::Bf16 => OwnedTensor {
                        name: spec.name.clone(),
                        dtype: Dtype::BF16,
                        shape: spec.shape.clone(),
                        bytes: values
                            .iter()
                            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                            .collect(),
                    },
                }
            })
            .collect();
        let path = dir.join(&file);
        write_atomic(&path, &tensors)?;
        on_file(&path);
    }
    if total > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap()).map_err(io(&path))?;
        on_file(&path);
    }
    Ok(())
}

/// Creates `dest` by filling a temporary sibling directory and renaming it
/// into place. An existing `dest` is replaced only after the new one is
/// complete.
fn write_dir_atomically(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dest, &old).map_err(io(dest))?;
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
    }
    Ok(())
}

/// Saves the model as a Hub checkpoint directory at `dest`.
pub fn save_hub_checkpoint(
    model: &Qwen25Vl,
    dest: &Path,
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<(), CheckpointError> {
    write_dir_atomically(dest, |tmp| {
        write_hub_weights(model, tmp, dtype, max_shard_bytes, &mut |_| {})
    })
}

/// A checkpoint with a NaN or inf anywhere would not load (and would
/// poison a resumed run): refuse to write it.
fn ensure_finite(model: &Qwen25Vl, optimizer: &AdamW) -> Result<(), CheckpointError> {
    use rayon::prelude::*;
    let tables = [
        ("", Some(&model.weights)),
        ("exp_avg.", Some(&optimizer.exp_avg)),
        ("exp_avg_sq.", Some(&optimizer.exp_avg_sq)),
        ("master.", optimizer.master.as_ref()),
    ];
    for (prefix, table) in tables {
        let Some(table) = table else { continue };
        if let Some(i) = table
            .0
            .par_iter()
            .position_first(|t| t.iter().any(|v| !v.is_finite()))
        {
            return Err(CheckpointError::NonFinite {
                name: format!("{prefix}{}", model.layout.specs[i].name),
            });
        }
    }
    Ok(())
}

/// Where a run is: enough to resume it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Seed of the run; per-step randomness derives from (seed, step).
    pub seed: u64,
    /// Rows of the data set consumed so far.
    pub data_position: u64,
    /// Anything else the trainer wants back (resolved config, metrics).
    #[serde(default)]
    pub extra: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct OptimizerMeta {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    max_grad_norm: Option<f64>,
    optimizer_step: u64,
    bf16_model: bool,
}

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const LATEST_FILE: &str = "latest";

pub fn checkpoint_dir_name(step: u64) -> String {
    format!("checkpoint-{step:08}")
}

/// Saves model (f32, Hub layout), optimizer and training state as
/// `run_dir/checkpoint-<step>/`, then points `run_dir/latest` at it.
/// `on_file` sees every file as it is written.
pub fn save_training_checkpoint(
    run_dir: &Path,
    model: &Qwen25Vl,
    optimizer: &AdamW,
    state: &TrainingState,
    on_file: &mut dyn FnMut(&Path),
) -> Result<PathBuf, CheckpointError> {
    ensure_finite(model, optimizer)?;
    let name = checkpoint_dir_name(state.step);
    let dest = run_dir.join(&name);
    write_dir_atomically(&dest, |tmp| {
        write_hub_weights(model, tmp, SaveDtype::F32, 2 << 30, on_file)?;
        let mut tensors = Vec::new();
        for (i, spec) in model.layout.specs.iter().enumerate() {
            tensors.push(OwnedTensor::f32(
                &format!("exp_avg.{}", spec.name),
                &spec.shape,
                &optimizer.exp_avg.0[i],
            ));
            tensors.push(OwnedTensor::f32(
                &format!("exp_avg_sq.{}", spec.name),
                &spec.shape,
                &optimizer.exp_avg_sq.0[i],
            ));
            if let Some(master) = &optimizer.master {
                tensors.push(OwnedTensor::f32(
                    &format!("master.{}", spec.name),
                    &spec.shape,
                    &master.0[i],
                ));
            }
        }
        let path = tmp.join(OPTIMIZER_FILE);
        write_atomic(&path, &tensors)?;
        on_file(&path);
        let meta = OptimizerMeta::of(optimizer, optimizer.master.is_some());
        let path = write_state(tmp, state, &meta, None)?;
        on_file(&path);
        Ok(())
    })?;
    point_latest(run_dir, &name)?;
    Ok(dest)
}

impl OptimizerMeta {
    fn of(optimizer: &AdamW, bf16_model: bool) -> Self {
        Self {
            lr: optimizer.cfg.lr,
            beta1: optimizer.cfg.beta1,
            beta2: optimizer.cfg.beta2,
            eps: optimizer.cfg.eps,
            weight_decay: optimizer.cfg.weight_decay,
            max_grad_norm: optimizer.max_grad_norm,
            optimizer_step: optimizer.step,
            bf16_model,
        }
    }
}

/// Writes `trainer_state.json` into `dir`: the training state, the
/// optimizer's settings and, for a sharded optimizer state, its manifest.
fn write_state(
    dir: &Path,
    state: &TrainingState,
    meta: &OptimizerMeta,
    shards: Option<&ShardManifest>,
) -> Result<PathBuf, CheckpointError> {
    let mut json = serde_json::json!({"state": state, "optimizer": meta});
    if let Some(shards) = shards {
        json["optimizer_shards"] = serde_json::to_value(shards).expect("manifest serializes");
    }
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).map_err(io(&path))?;
    Ok(path)
}

/// Points `run_dir/latest` at checkpoint `name` (write + rename: never torn).
fn point_latest(run_dir: &Path, name: &str) -> Result<(), CheckpointError> {
    let latest = run_dir.join(LATEST_FILE);
    let tmp = run_dir.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, name).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &latest).map_err(io(&latest))
}

/// How a data-parallel run's optimizer state is cut into per-rank files:
/// file r holds, for every parameter tensor of L elements, elements
/// `[r * ceil(L / N), (r + 1) * ceil(L / N))` (those below L) of its
/// `exp_avg`, `exp_avg_sq` and (bf16 models) `master`, named as in the
/// single-process file. Any world size reads it back
/// ([`load_training_checkpoint`] reassembles the whole state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    pub world_size: usize,
    pub files: Vec<String>,
}

impl ShardManifest {
    pub fn new(world_size: usize) -> Self {
        Self {
            world_size,
            files: (0..world_size)
                .map(|r| shard_file_name(r, world_size))
                .collect(),
        }
    }
}

/// The optimizer shard file of rank `rank` of `world_size`.
pub fn shard_file_name(rank: usize, world_size: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world_size:05}.safetensors")
}

/// The temporary folder a data-parallel save fills before it is renamed
/// into place (one name every rank derives; removed as a leftover if a
/// save is interrupted).
pub fn sharded_tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!(".{}.tmp-0", checkpoint_dir_name(step)))
}

/// This rank's shards of the optimizer state, one vector per parameter
/// tensor (its owned elements only).
pub struct OptimizerShard<'a> {
    pub rank: usize,
    pub world_size: usize,
    /// None for an fp32 model (its weights are the masters).
    pub master: Option<&'a [Vec<f32>]>,
    pub exp_avg: &'a [Vec<f32>],
    pub exp_avg_sq: &'a [Vec<f32>],
}

/// One rank's part of a data-parallel save: its optimizer shard, written
/// atomically into the save's temporary folder.
pub fn write_optimizer_shard(
    tmp: &Path,
    layout: &ParamLayout,
    shard: &OptimizerShard<'_>,
) -> Result<(), CheckpointError> {
    let tables = [
        ("exp_avg", Some(shard.exp_avg)),
        ("exp_avg_sq", Some(shard.exp_avg_sq)),
        ("master", shard.master),
    ];
    let mut tensors = Vec::new();
    for (prefix, table) in tables {
        let Some(table) = table else { continue };
        for (spec, values) in layout.specs.iter().zip(table) {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(CheckpointError::NonFinite {
                    name: format!("{prefix}.{} (rank {}'s shard)", spec.name, shard.rank),
                });
            }
            if !values.is_empty() {
                tensors.push(OwnedTensor::f32(
                    &format!("{prefix}.{}", spec.name),
                    &[values.len()],
                    values,
                ));
            }
        }
    }
    let path = tmp.join(shard_file_name(shard.rank, shard.world_size));
    write_atomic(&path, &tensors)?;
    Ok(())
}

/// Rank 0's part of a data-parallel save, once every rank's shard is in
/// `tmp`: the weights (Hub layout), the state with the shard manifest,
/// then the rename into place and `latest`.
pub fn finish_sharded_checkpoint(
    run_dir: &Path,
    tmp: &Path,
    model: &Qwen25Vl,
    optimizer: &AdamW,
    world_size: usize,
    bf16_model: bool,
    state: &TrainingState,
) -> Result<PathBuf, CheckpointError> {
    let name = checkpoint_dir_name(state.step);
    let dest = run_dir.join(&name);
    let manifest = ShardManifest::new(world_size);
    for file in &manifest.files {
        if !tmp.join(file).is_file() {
            return Err(CheckpointError::State {
                path: tmp.join(file),
                reason: "a rank's optimizer shard is missing".into(),
            });
        }
    }
    write_hub_weights(model, tmp, SaveDtype::F32, 2 << 30, &mut |_| {})?;
    let meta = OptimizerMeta::of(optimizer, bf16_model);
    write_state(tmp, state, &meta, Some(&manifest))?;
    if dest.exists() {
        let old = run_dir.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(io(&dest))?;
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
    }
    point_latest(run_dir, &name)?;
    Ok(dest)
}

/// The checkpoint `run_dir/latest` points at, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let latest = run_dir.join(LATEST_FILE);
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(read_err(&latest))?;
    let name = name.trim();
    // `latest` names a sibling `checkpoint-NNNNNNNN`, nothing else: an
    // empty or edited file must not send the loader to another folder.
    let well_formed = name
        .strip_prefix("checkpoint-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return Err(CheckpointError::State {
            path: latest,
            reason: if name.is_empty() {
                "is empty; it should name the newest checkpoint-NNNNNNNN folder".into()
            } else {
                format!("names `{name}`, not a checkpoint-NNNNNNNN folder")
            },
        });
    }
    let dir = run_dir.join(name);
    if !dir.is_dir() {
        return Err(CheckpointError::State {
            path: latest,
            reason: format!("points at {}, which does not exist", dir.display()),
        });
    }
    Ok(Some(dir))
}

/// The `checkpoint-*` folders in `run_dir`, oldest first.
pub fn checkpoint_dirs(run_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .map_err(read_err(run_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Loads model, optimizer and training state from a training checkpoint.
pub fn load_training_checkpoint(
    dir: &Path,
) -> Result<(Qwen25Vl, AdamW, TrainingState), CheckpointError> {
    let model = Qwen25Vl::load(dir)?;
    let state_path = dir.join(STATE_FILE);
    let bad = |reason: String| CheckpointError::State {
        path: state_path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&state_path).map_err(read_err(&state_path))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let state: TrainingState =
        serde_json::from_value(json["state"].clone()).map_err(|e| bad(format!("state: {e}")))?;
    let meta: OptimizerMeta = serde_json::from_value(json["optimizer"].clone())
        .map_err(|e| bad(format!("optimizer: {e}")))?;
    let precision = if meta.bf16_model {
        WeightPrecision::Bf16Model
    } else {
        WeightPrecision::Fp32
    };
    let cfg = AdamWConfig {
        lr: meta.lr,
        beta1: meta.beta1,
        beta2: meta.beta2,
        eps: meta.eps,
        weight_decay: meta.weight_decay,
    };
    let mut optimizer = AdamW::new(&model.weights, cfg, meta.max_grad_norm, precision);
    optimizer.step = meta.optimizer_step;
    if !json["optimizer_shards"].is_null() {
        let manifest: ShardManifest = serde_json::from_value(json["optimizer_shards"].clone())
            .map_err(|e| bad(format!("optimizer_shards: {e}")))?;
        read_shards(dir, &manifest, &mut optimizer, &model.layout)?;
        return Ok((model, optimizer, state));
    }
    let opt = Checkpoint::open_file(&dir.join(OPTIMIZER_FILE))?;
    let read_all = |prefix: &str, layout: &ParamLayout| -> Result<Tensors, LoadError> {
        let data: Result<Vec<Vec<f32>>, LoadError> = layout
            .specs
            .iter()
            .map(|s| opt.read_f32(&format!("{prefix}.{}", s.name), &s.shape))
            .collect();
        Ok(Tensors(data?))
    };
    optimizer.exp_avg = read_all("exp_avg", &model.layout)?;
    optimizer.exp_avg_sq = read_all("exp_avg_sq", &model.layout)?;
    if meta.bf16_model {
        optimizer.master = Some(read_all("master", &model.layout)?);
    }
    Ok((model, optimizer, state))
}

/// The whole optimizer state from the shards of a data-parallel save, in
/// `optimizer` (whose tables give the tensors' sizes).
fn read_shards(
    dir: &Path,
    manifest: &ShardManifest,
    optimizer: &mut AdamW,
    layout: &ParamLayout,
) -> Result<(), CheckpointError> {
    let world = manifest.world_size;
    if world == 0 || manifest.files.len() != world {
        return Err(CheckpointError::State {
            path: dir.join(STATE_FILE),
            reason: format!(
                "optimizer_shards names {} files for a world of {world}",
                manifest.files.len()
            ),
        });
    }
    let mut files = Vec::with_capacity(world);
    for file in &manifest.files {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(CheckpointError::State {
                path: dir.join(STATE_FILE),
                reason: format!("shard file name `{file}` leaves the checkpoint"),
            });
        }
        files.push(Checkpoint::open_file(&dir.join(file))?);
    }
    let bf16_model = optimizer.master.is_some();
    let mut tables: Vec<(&str, &mut Tensors)> = vec![
        ("exp_avg", &mut optimizer.exp_avg),
        ("exp_avg_sq", &mut optimizer.exp_avg_sq),
    ];
    if bf16_model {
        tables.push(("master", optimizer.master.as_mut().expect("bf16 model")));
    }
    for (prefix, table) in tables {
        for (spec, full) in layout.specs.iter().zip(table.0.iter_mut()) {
            for (rank, file) in files.iter().enumerate() {
                let range = super::zero::shard_range(full.len(), rank, world);
                if range.is_empty() {
                    continue;
                }
                let part = file.read_f32(&format!("{prefix}.{}", spec.name), &[range.len()])?;
                full[range].copy_from_slice(&part);
            }
        }
    }
    Ok(())
}
