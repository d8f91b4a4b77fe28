//! Training and evaluation rows: parquet (the ViRL39K / VPPO schema) and
//! JSONL, streamed row by row (a 40k-row set with images is never held in
//! memory), and the recipe's prompt built from each row.
//!
//! A row that cannot be used (no answer, no problem, an unreadable image)
//! comes out as a [`RowError`] naming the row, for the caller to skip and
//! count; only an unreadable file or schema stops the iteration.

pub mod jsonl;
pub mod order;
pub mod parquet;
pub mod prompt;
pub mod shards;

use std::path::{Path, PathBuf};

/// The recipe's instruction, appended after a blank line.
pub const VPPO_PROMPT_SUFFIX: &str = "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.";

/// Where an image of a row comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Encoded image bytes (PNG, JPEG) stored in the data set.
    Bytes(Vec<u8>),
    /// A file path (relative paths resolve against the data file's folder).
    Path(PathBuf),
}

/// One usable row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 0-based row number in the file.
    pub row: usize,
    /// The problem text, `<image>` placeholders included.
    pub problem: String,
    pub answer: String,
    pub images: Vec<ImageSource>,
}

/// A row that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row {row}: {reason}")]
pub struct RowError {
    pub row: usize,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: column `{column}` not found (columns: {available})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("{path}: column `{column}` has unsupported type {found}")]
    ColumnType {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}: unknown data format (expected .parquet, .jsonl or .json)")]
    Format { path: PathBuf },
}

/// Column (or JSON key) names; the defaults are the VPPO data sets'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub problem: String,
    pub answer: String,
    pub images: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            problem: "problem".into(),
            answer: "answer".into(),
            images: "images".into(),
        }
    }
}

pub type RowResult = Result<Example, RowError>;

/// Opens a data file by extension: `.parquet`, or `.jsonl` / `.json` (one
/// object per line).
pub fn open_rows(
    path: &Path,
    columns: &Columns,
) -> Result<Box<dyn Iterator<Item = Result<RowResult, DataError>>>, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Ok(Box::new(parquet::ParquetRows::open(path, columns)?)),
        Some("jsonl") | Some("json") => Ok(Box::new(jsonl::JsonlRows::open(path, columns)?)),
        _ => Err(DataError::Format {
            path: path.to_path_buf(),
        }),
    }
}

/// Counts of what a pass over a data set kept and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowCounts {
    pub used: usize,
    /// Corrupt rows (no answer, unreadable image...).
    pub corrupt: usize,
    /// Prompts longer than the maximum prompt length.
    pub too_long: usize,
}
