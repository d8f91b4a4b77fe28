//! Parquet rows, read one record batch at a time. Text columns may be
//! string or large string (or integers for answers); the image column may
//! be a list of `{bytes, path}` structs (the Hugging Face `Image` feature),
//! of binaries, or of path strings, or a single such value.

use super::{Columns, DataError, Example, ImageSource, RowError, RowResult};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use std::path::{Path, PathBuf};

/// Rows per record batch: bounds memory to a few dozen rows of images.
const BATCH_ROWS: usize = 32;

pub struct ParquetRows {
    path: PathBuf,
    base: PathBuf,
    reader: ParquetRecordBatchReader,
    columns: Columns,
    batch: Option<RecordBatch>,
    in_batch: usize,
    row: usize,
}

impl ParquetRows {
    pub fn open(path: &Path, columns: &Columns) -> Result<Self, DataError> {
        let read_err = |reason: String| DataError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| read_err(e.to_string()))?;
        let schema = builder.schema().clone();
        let available = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ");
        for name in [&columns.problem, &columns.answer] {
            let field = schema
                .field_with_name(name)
                .map_err(|_| DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.clone(),
                    available: available.clone(),
                })?;
            if !is_text(field.data_type()) {
                return Err(DataError::ColumnType {
                    path: path.to_path_buf(),
                    column: name.clone(),
                    found: field.data_type().to_string(),
                });
            }
        }
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| read_err(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            reader,
            columns: columns.clone(),
            batch: None,
            in_batch: 0,
            row: 0,
        })
    }
}

/// Rows in a parquet file, from its footer (nothing is decoded).
pub fn count_rows(path: &Path) -> Result<u64, DataError> {
    let read_err = |reason: String| DataError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| read_err(e.to_string()))?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as u64)
}

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int32
            | DataType::Int64
            | DataType::Float64
    )
}

/// The text of row `i` of a string-like (or numeric) column.
fn text_at(col: &ArrayRef, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => col.as_string_view().value(i).to_string(),
        DataType::Int32 => col
            .as_primitive::<arrow_array::types::Int32Type>()
            .value(i)
            .to_string(),
        DataType::Int64 => col
            .as_primitive::<arrow_array::types::Int64Type>()
            .value(i)
            .to_string(),
        DataType::Float64 => col
            .as_primitive::<arrow_array::types::Float64Type>()
            .value(i)
            .to_string(),
        _ => return None,
    })
}

/// One image value: a `{bytes, path}` struct, binary bytes, or a path.
fn image_at(arr: &ArrayRef, i: usize, base: &Path) -> Result<Option<ImageSource>, String> {
    if arr.is_null(i) {
        return Ok(None);
    }
    match arr.data_type() {
        DataType::Struct(_) => {
            let s = arr.as_struct();
            if let Some(bytes) = s.column_by_name("bytes") {
                if !bytes.is_null(i) {
                    return image_at(bytes, i, base);
                }
            }
            if let Some(path) = s.column_by_name("path") {
                if !path.is_null(i) {
                    return image_at(path, i, base);
                }
            }
            Err("an image struct with neither bytes nor path".into())
        }
        DataType::Binary => Ok(Some(ImageSource::Bytes(
            arr.as_binary::<i32>().value(i).to_vec(),
        ))),
        DataType::LargeBinary => Ok(Some(ImageSource::Bytes(
            arr.as_binary::<i64>().value(i).to_vec(),
        ))),
        DataType::BinaryView => Ok(Some(ImageSource::Bytes(
            arr.as_binary_view().value(i).to_vec(),
        ))),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(Some(ImageSource::Path(
            base.join(text_at(arr, i).unwrap_or_default()),
        ))),
        other => Err(format!("unsupported image type {other}")),
    }
}

fn images_at(col: &ArrayRef, i: usize, base: &Path) -> Result<Vec<ImageSource>, String> {
    if col.is_null(i) {
        return Ok(Vec::new());
    }
    let items: ArrayRef = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(i),
        DataType::LargeList(_) => col.as_list::<i64>().value(i),
        _ => return Ok(image_at(col, i, base)?.into_iter().collect()),
    };
    let mut out = Vec::with_capacity(items.len());
    for k in 0..items.len() {
        match image_at(&items, k, base)? {
            Some(img) => out.push(img),
            None => return Err(format!("image {k} is null")),
        }
    }
    Ok(out)
}

impl Iterator for ParquetRows {
    type Item = Result<RowResult, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self
            .batch
            .as_ref()
            .is_none_or(|b| self.in_batch >= b.num_rows())
        {
            match self.reader.next()? {
                Ok(b) => {
                    self.batch = Some(b);
                    self.in_batch = 0;
                }
                Err(e) => {
                    return Some(Err(DataError::Read {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    }))
                }
            }
        }
        let batch = self.batch.as_ref().expect("a batch with rows left");
        let (i, row) = (self.in_batch, self.row);
        self.in_batch += 1;
        self.row += 1;
        let bad = |reason: String| RowError { row, reason };
        let col = |name: &str| batch.column_by_name(name).cloned();
        let result = (|| {
            let problem = col(&self.columns.problem)
                .and_then(|c| text_at(&c, i))
                .ok_or_else(|| bad(format!("no `{}` text", self.columns.problem)))?;
            let answer = col(&self.columns.answer)
                .and_then(|c| text_at(&c, i))
                .filter(|a| !a.trim().is_empty())
                .ok_or_else(|| bad(format!("no `{}`", self.columns.answer)))?;
            let images = match col(&self.columns.images) {
                Some(c) => images_at(&c, i, &self.base).map_err(bad)?,
                None => Vec::new(),
            };
            Ok(Example {
                row,
                problem,
                answer,
                images,
            })
        })();
        Some(Ok(result))
    }
}
