//! The run directory's guards: one `train` at a time per directory (a lock
//! file holding the owner's process id), a new run only in a new or empty
//! directory, and the leftovers of interrupted saves (temporary checkpoint
//! folders, each the size of the model plus its optimizer state) removed
//! when a run starts or resumes.

use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".train.lock";

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{dir} is in use by another `train` (process {pid}, see {dir}/{LOCK_FILE}); wait for it, or choose another --out")]
    Busy { dir: PathBuf, pid: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Held while a run writes into its directory; removed on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` is alive and is this same program (a reused pid
/// after a `kill -9` is not a run). Where `/proc` is missing, assume alive.
fn owner_alive(pid: u32) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !Path::new("/proc/self").exists() {
        return true;
    }
    if !proc_dir.exists() {
        return false;
    }
    match (
        std::fs::read_link(proc_dir.join("exe")),
        std::env::current_exe(),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => true,
    }
}

/// Takes `dir`'s lock (the directory must exist). A lock left by a process
/// that is gone (killed) is taken over.
pub fn lock(dir: &Path) -> Result<RunLock, RunDirError> {
    let path = dir.join(LOCK_FILE);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write;
                write!(f, "{}", std::process::id()).map_err(io(&path))?;
                return Ok(RunLock { path });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let pid = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                match pid {
                    Some(pid) if owner_alive(pid) => {
                        return Err(RunDirError::Busy {
                            dir: dir.to_path_buf(),
                            pid,
                        })
                    }
                    // Stale (or being written this instant: the retry's
                    // create_new settles who owns it).
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Err(RunDirError::Busy {
        dir: dir.to_path_buf(),
        pid: 0,
    })
}

/// Whether `name` is a temporary of an atomic write in a run directory:
/// `.<name>.tmp-<pid>` or `.<name>.old-<pid>` (files or folders), and the
/// metrics rewrite's `metrics.jsonl.tmp`.
fn is_leftover(name: &str) -> bool {
    if name == "metrics.jsonl.tmp" {
        return true;
    }
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    [".tmp-", ".old-"].iter().any(|tag| {
        rest.rsplit_once(tag).is_some_and(|(stem, pid)| {
            !stem.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// Removes what interrupted saves left in `dir` (call with the lock held:
/// no other run is writing there). Returns the paths removed.
pub fn remove_leftovers(dir: &Path) -> Result<Vec<PathBuf>, RunDirError> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_leftover(&name) {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_are_only_the_atomic_write_temporaries() {
        for name in [
            ".checkpoint-00000012.tmp-4242",
            ".checkpoint-00000012.old-17",
            ".latest.tmp-99",
            ".model.safetensors.tmp-5",
            "metrics.jsonl.tmp",
        ] {
            assert!(is_leftover(name), "{name}");
        }
        for name in [
            "checkpoint-00000012",
            "reward.png",
            ".tmp-12",
            ".notes.tmp-mine",
            ".train.lock",
            "latest",
            "my.tmp-3",
        ] {
            assert!(!is_leftover(name), "{name}");
        }
    }

    #[test]
    fn a_second_lock_is_refused_and_a_dead_owners_is_taken_over() {
        let dir = std::env::temp_dir().join(format!("vppo-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock(&dir).unwrap();
        let err = lock(&dir).unwrap_err();
        assert!(
            matches!(err, RunDirError::Busy { pid, .. } if pid == std::process::id()),
            "{err}"
        );
        drop(held);
        assert!(!dir.join(LOCK_FILE).exists(), "released on drop");
        // A pid that cannot be running (above the kernel's pid_max).
        std::fs::write(dir.join(LOCK_FILE), "4294967295").unwrap();
        let taken = lock(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap(),
            std::process::id().to_string()
        );
        drop(taken);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
