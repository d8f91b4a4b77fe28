//! JSONL rows: `{"problem": ..., "answer": ..., "images": [paths]}` per
//! line, read line by line.

use super::{Columns, DataError, Example, ImageSource, RowError, RowResult};
use serde_json::Value;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

pub struct JsonlRows {
    path: PathBuf,
    base: PathBuf,
    lines: Lines<BufReader<std::fs::File>>,
    columns: Columns,
    row: usize,
}

impl JsonlRows {
    pub fn open(path: &Path, columns: &Columns) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|e| DataError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            lines: BufReader::new(file).lines(),
            columns: columns.clone(),
            row: 0,
        })
    }

    fn parse(&self, row: usize, line: &str) -> RowResult {
        let bad = |reason: String| RowError { row, reason };
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let text = |key: &str| -> Option<String> {
            match v.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let problem = text(&self.columns.problem)
            .ok_or_else(|| bad(format!("no `{}` text", self.columns.problem)))?;
        let answer = text(&self.columns.answer)
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| bad(format!("no `{}`", self.columns.answer)))?;
        let images = match v.get(&self.columns.images) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|it| match it {
                    Value::String(p) => Ok(ImageSource::Path(self.base.join(p))),
                    Value::Object(o) => match o.get("path").and_then(Value::as_str) {
                        Some(p) => Ok(ImageSource::Path(self.base.join(p))),
                        None => Err(bad("an image object without a `path`".into())),
                    },
                    _ => Err(bad(format!(
                        "`{}` entries must be paths",
                        self.columns.images
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(Value::String(p)) => vec![ImageSource::Path(self.base.join(p))],
            Some(_) => {
                return Err(bad(format!(
                    "`{}` must be a list of paths",
                    self.columns.images
                )))
            }
        };
        Ok(Example {
            row,
            problem,
            answer,
            images,
        })
    }
}

impl Iterator for JsonlRows {
    type Item = Result<RowResult, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(DataError::Read {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    }))
                }
            };
            let row = self.row;
            self.row += 1;
            if line.trim().is_empty() {
                continue;
            }
            return Some(Ok(self.parse(row, &line)));
        }
    }
}
