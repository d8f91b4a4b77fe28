//! Where commands write: an output must never be one of the command's
//! inputs, and a command never replaces or deletes what it did not create.
//! These checks run before any work, so a refused command has touched
//! nothing.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{flag} {out} is also an input ({input}); choose another output path")]
    IsInput {
        flag: &'static str,
        out: PathBuf,
        input: PathBuf,
    },
    #[error(
        "{flag} {out} would replace {source_dir}, which this command reads; choose a new directory"
    )]
    HoldsSource {
        flag: &'static str,
        out: PathBuf,
        source_dir: PathBuf,
    },
    #[error("{flag} {out} already exists and is not empty (it holds {example}); this command writes only into a new or empty directory")]
    NotEmpty {
        flag: &'static str,
        out: PathBuf,
        example: String,
    },
    #[error("{flag} {out} is a directory; give a file path")]
    IsDirectory { flag: &'static str, out: PathBuf },
    #[error("{flag} {out} exists and is not a directory")]
    NotADirectory { flag: &'static str, out: PathBuf },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `path` made absolute and free of `.`, `..` and symbolic links, as far
/// as it exists; the part that does not exist yet is appended as written.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut existing = absolute.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return normalize(&out);
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return normalize(&absolute),
        }
    }
}

/// Drops `.` and folds `..` lexically (for the part that does not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Whether `inner` is `outer` or lies inside it.
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    resolve(inner).starts_with(resolve(outer))
}

/// Refuses an output file that is one of `inputs` (files), or an existing
/// file directly inside one of `input_dirs` (a checkpoint directory: the
/// loader reads its config, tokenizer and weights).
pub fn check_output_file(
    flag: &'static str,
    out: &Path,
    inputs: &[&Path],
    input_dirs: &[&Path],
) -> Result<(), OutputError> {
    if out.is_dir() {
        return Err(OutputError::IsDirectory {
            flag,
            out: out.to_path_buf(),
        });
    }
    let target = resolve(out);
    for input in inputs {
        if resolve(input) == target {
            return Err(OutputError::IsInput {
                flag,
                out: out.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    for dir in input_dirs {
        let dir_real = resolve(dir);
        let inside = target.parent() == Some(dir_real.as_path()) && out.exists();
        if inside || target == dir_real {
            return Err(OutputError::IsInput {
                flag,
                out: out.to_path_buf(),
                input: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Checks an output directory the command will fill: not a source, not a
/// folder holding a source, and either absent or empty (but for `ignore`).
pub fn check_new_dir(
    flag: &'static str,
    out: &Path,
    sources: &[&Path],
    ignore: &[&str],
) -> Result<(), OutputError> {
    for source in sources {
        if is_within(source, out) {
            return Err(OutputError::HoldsSource {
                flag,
                out: out.to_path_buf(),
                source_dir: source.to_path_buf(),
            });
        }
    }
    match std::fs::metadata(out) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => Err(OutputError::NotADirectory {
            flag,
            out: out.to_path_buf(),
        }),
        Ok(_) => match first_entry(out, ignore)? {
            None => Ok(()),
            Some(example) => Err(OutputError::NotEmpty {
                flag,
                out: out.to_path_buf(),
                example,
            }),
        },
    }
}

/// The name of one entry of `dir` other than `ignore`, if any.
pub fn first_entry(dir: &Path, ignore: &[&str]) -> Result<Option<String>, OutputError> {
    let entries = std::fs::read_dir(dir).map_err(|source| OutputError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !ignore.contains(&n.as_str())))
}

/// A text output written to a temporary sibling and renamed over `path` by
/// [`AtomicFile::commit`]: a failed or interrupted command leaves whatever
/// was at `path` untouched. A device or pipe (`/dev/null`, a FIFO) is
/// written in place, since a rename would replace the node.
pub struct AtomicFile {
    path: PathBuf,
    tmp: Option<PathBuf>,
    file: std::io::BufWriter<std::fs::File>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self, OutputError> {
        let err = |source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let special = path.exists() && !path.is_file() && !path.is_dir();
        let tmp = (!special).then(|| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
        });
        let file = std::fs::File::create(tmp.as_deref().unwrap_or(path)).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and moves the file into place.
    pub fn commit(mut self) -> Result<(), OutputError> {
        let err = |source| OutputError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.flush().map_err(err)?;
        self.file.get_ref().sync_all().ok();
        if let Some(tmp) = self.tmp.take() {
            std::fs::rename(&tmp, &self.path).map_err(err)?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    /// Not committed: remove the temporary file (only ours).
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vppo-outputs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_output_equal_to_an_input_is_refused_however_spelled() {
        let dir = scratch("same");
        let data = dir.join("g.jsonl");
        std::fs::write(&data, "{}\n").unwrap();
        let other = dir.join("sub/../g.jsonl");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let err = check_output_file("--out", &other, &[&data], &[]).unwrap_err();
        assert!(err.to_string().contains("also an input"), "{err}");
        assert!(check_output_file("--out", &dir.join("r.jsonl"), &[&data], &[]).is_ok());
        let e = check_output_file("--out", &dir.join("sub"), &[&data], &[]).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_holding_a_source_or_other_files_is_refused() {
        let dir = scratch("dirs");
        let model = dir.join("p/m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let e = check_new_dir("--out", &dir.join("p"), &[&model], &[]).unwrap_err();
        assert!(matches!(e, OutputError::HoldsSource { .. }), "{e}");
        let e = check_new_dir("--out", &model, &[&model], &[]).unwrap_err();
        assert!(matches!(e, OutputError::HoldsSource { .. }), "{e}");
        let user = dir.join("user");
        std::fs::create_dir_all(&user).unwrap();
        std::fs::write(user.join("notes.txt"), "mine").unwrap();
        let e = check_new_dir("--out", &user, &[&model], &[]).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert!(check_new_dir("--out", &dir.join("new"), &[&model], &[]).is_ok());
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        assert!(check_new_dir("--out", &dir.join("empty"), &[&model], &[]).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_uncommitted_atomic_file_leaves_the_old_content() {
        let dir = scratch("atomic");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            writeln!(f, "new").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temp left");
        let mut f = AtomicFile::create(&path).unwrap();
        writeln!(f, "new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
