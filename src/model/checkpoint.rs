//! Reading a Hugging Face checkpoint directory: one `model.safetensors` or
//! shards listed by `model.safetensors.index.json`, memory-mapped (no copy of
//! the files in memory), bf16/f16/f32 tensors widened to f32, under either
//! weight-name layout (`visual.*` / `model.*`, or the newer `model.visual.*`
//! / `model.language_model.*`).

use super::params::{ParamLayout, Tensors};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {path} holds {value} at index {index} (and {count} non-finite values in all): the weights are corrupt or diverged")]
    NonFinite {
        name: String,
        path: PathBuf,
        index: usize,
        value: f32,
        count: usize,
    },
    #[error("tensor `{name}` in {path} has dtype {dtype:?}; only F32, BF16 and F16 are supported")]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: Dtype,
    },
}

/// Which naming scheme the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameLayout {
    /// `visual.*`, `model.embed_tokens.*`, `model.layers.*` (the Hub release).
    Hub,
    /// `model.visual.*`, `model.language_model.*` (newer transformers saves).
    Nested,
}

impl NameLayout {
    /// The checkpoint's name for a canonical (Hub layout) name.
    pub fn file_name(self, canonical: &str) -> String {
        match self {
            NameLayout::Hub => canonical.to_string(),
            NameLayout::Nested => {
                if let Some(rest) = canonical.strip_prefix("visual.") {
                    format!("model.visual.{rest}")
                } else if let Some(rest) = canonical.strip_prefix("model.") {
                    format!("model.language_model.{rest}")
                } else {
                    canonical.to_string()
                }
            }
        }
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, (usize, TensorInfo)>,
    pub layout: NameLayout,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        Self::from_files(dir, weight_files(dir)?)
    }

    /// One safetensors file read with the same checks (names used as given).
    pub fn open_file(path: &Path) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_files(dir, vec![path.to_path_buf()])
    }

    fn from_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self, LoadError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is mapped read-only; a checkpoint modified
            // while we read it would give wrong values, not memory unsafety
            // in our code (the mapping stays valid until dropped).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            for (name, info) in metadata.tensors() {
                tensors.insert(name, (shards.len(), info.clone()));
            }
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + header_len,
            });
        }
        let layout = if tensors
            .keys()
            .any(|k| k.starts_with("model.language_model.") || k.starts_with("model.visual."))
        {
            NameLayout::Nested
        } else {
            NameLayout::Hub
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            tensors,
            layout,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names as stored in the files.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Reads a tensor by canonical name as f32, checking its shape.
    pub fn read_f32(&self, canonical: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let name = self.layout.file_name(canonical);
        let (shard_idx, info) =
            self.tensors
                .get(&name)
                .ok_or_else(|| LoadError::MissingTensor {
                    name: name.clone(),
                    dir: self.dir.clone(),
                })?;
        let shard = &self.shards[*shard_idx];
        if info.shape != shape {
            return Err(LoadError::Shape {
                name,
                path: shard.path.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let mut out = vec![0.0f32; shape.iter().product()];
        // The data is not necessarily aligned for its type: decode bytes.
        match info.dtype {
            Dtype::F32 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(4))
                .for_each(|(o, b)| {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }),
            Dtype::BF16 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }),
            Dtype::F16 => out
                .par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }),
            dtype => {
                return Err(LoadError::Dtype {
                    name,
                    path: shard.path.clone(),
                    dtype,
                })
            }
        }
        // A NaN or inf weight poisons every forward silently: refuse it here.
        if let Some(index) = out.par_iter().position_first(|v| !v.is_finite()) {
            return Err(LoadError::NonFinite {
                name,
                path: shard.path.clone(),
                index,
                value: out[index],
                count: out.par_iter().filter(|v| !v.is_finite()).count(),
            });
        }
        Ok(out)
    }

    /// Loads every parameter of the layout.
    pub fn load_params(&self, layout: &ParamLayout) -> Result<Tensors, LoadError> {
        let data: Result<Vec<Vec<f32>>, LoadError> = layout
            .specs
            .iter()
            .map(|s| self.read_f32(&s.name, &s.shape))
            .collect();
        Ok(Tensors(data?))
    }
}

/// The safetensors files of a checkpoint directory, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoadError::Corrupt {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Corrupt {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(LoadError::Io {
                path: missing.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed in {} is missing", index.display()),
                ),
            });
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    // Other *.safetensors files (adapters, saved gradients...) are not the
    // model: refuse rather than guess.
    Err(LoadError::NoWeights {
        dir: dir.to_path_buf(),
    })
}
