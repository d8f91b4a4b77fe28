//! Which checkpoints a run keeps (EasyR1's `save_limit`): the newest
//! `keep_checkpoints`, plus the best by validation accuracy, which `best`
//! names as `latest` names the newest. Nothing is removed before the new
//! checkpoint is complete and `latest` points at it.

use std::path::{Path, PathBuf};

pub const BEST_FILE: &str = "best";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct RetentionError {
    pub path: PathBuf,
    pub reason: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RetentionError + '_ {
    move |e| RetentionError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The checkpoints to delete from `all` (oldest first): all but the newest
/// `keep` and those in `protect` (the best, the latest). `keep` 0 keeps all.
pub fn to_remove(all: &[PathBuf], keep: usize, protect: &[&Path]) -> Vec<PathBuf> {
    if keep == 0 {
        return Vec::new();
    }
    let surplus = all.len().saturating_sub(keep);
    all[..surplus]
        .iter()
        .filter(|p| !protect.contains(&p.as_path()))
        .cloned()
        .collect()
}

/// Points `run_dir/best` at `checkpoint` (written, then renamed: never torn).
pub fn set_best(run_dir: &Path, checkpoint: &Path) -> Result<(), RetentionError> {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = run_dir.join(BEST_FILE);
    let tmp = run_dir.join(format!(".{BEST_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, name).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// The checkpoint `run_dir/best` names, when it names one that exists.
pub fn best_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(run_dir.join(BEST_FILE)).ok()?;
    let name = name.trim();
    let well_formed = name
        .strip_prefix("checkpoint-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let dir = run_dir.join(name);
    (well_formed && dir.is_dir()).then_some(dir)
}

/// Deletes what [`to_remove`] names, sparing `latest` and the best; returns
/// what it removed.
pub fn prune(
    run_dir: &Path,
    all: &[PathBuf],
    keep: usize,
    latest: &Path,
) -> Result<Vec<PathBuf>, RetentionError> {
    let best = best_checkpoint(run_dir);
    let mut protect = vec![latest];
    if let Some(b) = &best {
        protect.push(b);
    }
    let stale = to_remove(all, keep, &protect);
    for dir in &stale {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_n_and_the_best_are_kept() {
        let all: Vec<PathBuf> = (0..6)
            .map(|i| PathBuf::from(format!("checkpoint-{i:08}")))
            .collect();
        let best = all[1].clone();
        let latest = all[5].clone();
        let gone = to_remove(&all, 2, &[&latest, &best]);
        assert_eq!(gone, vec![all[0].clone(), all[2].clone(), all[3].clone()]);
        assert!(to_remove(&all, 0, &[]).is_empty(), "0 keeps everything");
        assert!(to_remove(&all, 10, &[]).is_empty());
        // The best among the newest costs no extra slot.
        let gone = to_remove(&all, 2, &[&latest, &all[4]]);
        assert_eq!(gone.len(), 4);
    }
}
