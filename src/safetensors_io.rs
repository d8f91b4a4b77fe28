//! Writing safetensors files safely: to a temporary file in the same
//! directory, then renamed over the target, so an interrupted write never
//! leaves a truncated file behind.

use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize {path}: {reason}")]
    Serialize { path: PathBuf, reason: String },
}

/// One tensor to write: name, dtype, shape and little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        Self {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(name: &str, shape: &[usize], values: &[i64]) -> Self {
        Self {
            name: name.to_string(),
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Writes `tensors` to `path` atomically (temp file + rename).
pub fn write_atomic(path: &Path, tensors: &[OwnedTensor]) -> Result<(), WriteError> {
    let views: Result<Vec<(String, TensorView<'_>)>, _> = tensors
        .iter()
        .map(|t| TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (t.name.clone(), v)))
        .collect();
    let views = views.map_err(|e| WriteError::Serialize {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let io = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    safetensors::tensor::serialize_to_file(views, None, &tmp).map_err(|e| {
        WriteError::Serialize {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
