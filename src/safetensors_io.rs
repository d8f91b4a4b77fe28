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
    let io = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A device or pipe (`--out /dev/null`, a FIFO) is written in place: a
    // rename would replace the device node with a regular file.
    if path.exists() && !path.is_file() && !path.is_dir() {
        let bytes =
            safetensors::tensor::serialize(views, None).map_err(|e| WriteError::Serialize {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        return std::fs::write(path, bytes).map_err(io);
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn write_atomic_writes_into_a_pipe_without_replacing_it() {
        let dir = std::env::temp_dir().join(format!("vppo-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("out.safetensors");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
        let tensor = OwnedTensor::f32("w", &[2], &[1.5, -2.0]);
        write_atomic(&fifo, &[tensor]).unwrap();
        let bytes = reader.join().unwrap();
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        let read = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = read.tensor("w").unwrap();
        assert_eq!(w.shape(), &[2]);
        assert_eq!(w.data(), bytemuck::cast_slice::<f32, u8>(&[1.5, -2.0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
