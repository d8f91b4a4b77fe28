//! A data set as Hugging Face stores one: a file, a directory of shards
//! (`data/train-00000-of-00004.parquet`, ...) or a glob over them, read as
//! one table in a fixed order (the shards' names sorted), with its rows
//! addressed by a global index so a shuffled order can be read.

use super::{open_rows, Columns, DataError, RowResult};
use std::path::{Path, PathBuf};

type Rows = Box<dyn Iterator<Item = Result<RowResult, DataError>>>;

/// The shard files `spec` names: the file itself; a directory's `.parquet`
/// files, or else its `.jsonl`/`.json` files; or the files matching a
/// `*`/`?` pattern in the last path component. Sorted by name.
pub fn shard_paths(spec: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read_err = |path: &Path, reason: String| DataError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let name = spec.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let pattern = name.contains(['*', '?']);
    if !pattern && !spec.is_dir() {
        return Ok(vec![spec.to_path_buf()]);
    }
    let dir = if pattern {
        match spec.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    } else {
        spec.to_path_buf()
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| read_err(&dir, e.to_string()))? {
        let path = entry.map_err(|e| read_err(&dir, e.to_string()))?.path();
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_file() && (!pattern || glob_match(name, file)) {
            files.push(path);
        }
    }
    let has = |exts: &[&str], p: &PathBuf| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
    };
    if !pattern {
        // A Hugging Face folder can hold a README or a lock file too.
        let parquet: Vec<PathBuf> = files
            .iter()
            .filter(|p| has(&["parquet"], p))
            .cloned()
            .collect();
        files = if parquet.is_empty() {
            files
                .into_iter()
                .filter(|p| has(&["jsonl", "json"], p))
                .collect()
        } else {
            parquet
        };
    }
    if files.is_empty() {
        return Err(read_err(
            spec,
            "no parquet or JSONL file matches (a file, a folder of shards, or a glob such as data/train-*.parquet)".into(),
        ));
    }
    files.sort();
    Ok(files)
}

/// `*` (any run) and `?` (one character) over a file name.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Backtracking over the last star: linear enough for file names.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Rows in one file: the parquet footer's count, or a pass over the lines.
fn count_rows(path: &Path, columns: &Columns) -> Result<u64, DataError> {
    if path.extension().and_then(|e| e.to_str()) == Some("parquet") {
        return super::parquet::count_rows(path);
    }
    let mut n = 0;
    for row in open_rows(path, columns)? {
        let _ = row?;
        n += 1;
    }
    Ok(n)
}

/// The shards of a data set as one table.
pub struct Shards {
    paths: Vec<PathBuf>,
    columns: Columns,
    /// Global index of each shard's first row, and the total at the end.
    starts: Vec<u64>,
    /// The open shard: its number, rows, and the next row's local index.
    open: Option<(usize, Rows, u64)>,
}

impl Shards {
    pub fn open(spec: &Path, columns: &Columns) -> Result<Self, DataError> {
        let paths = shard_paths(spec)?;
        let mut starts = vec![0];
        for p in &paths {
            starts.push(starts.last().unwrap() + count_rows(p, columns)?);
        }
        Ok(Self {
            paths,
            columns: columns.clone(),
            starts,
            open: None,
        })
    }

    /// Rows over all shards.
    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file and local row number of global row `index`.
    pub fn locate(&self, index: u64) -> (&Path, u64) {
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        (&self.paths[shard], index - self.starts[shard])
    }

    /// Global row `index` (below [`Self::len`]). Reading forward is a
    /// stream; going back reopens the shard, so a caller reads a window of
    /// a shuffled order in ascending index order.
    pub fn read(&mut self, index: u64) -> Result<RowResult, DataError> {
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        let local = index - self.starts[shard];
        let reopen = !matches!(&self.open, Some((s, _, next)) if *s == shard && *next <= local);
        if reopen {
            self.open = Some((shard, open_rows(&self.paths[shard], &self.columns)?, 0));
        }
        let (_, rows, next) = self.open.as_mut().expect("opened above");
        loop {
            let row = rows.next().ok_or_else(|| DataError::Read {
                path: self.paths[shard].clone(),
                reason: format!("the file changed while training: row {local} is gone"),
            })??;
            *next += 1;
            if *next > local {
                return Ok(self.name_shard(shard, row));
            }
        }
    }

    /// With several shards, a skipped row's reason names its file.
    fn name_shard(&self, shard: usize, row: RowResult) -> RowResult {
        row.map_err(|mut e| {
            if self.paths.len() > 1 {
                e.reason = format!("{}: {}", self.paths[shard].display(), e.reason);
            }
            e
        })
    }
}
