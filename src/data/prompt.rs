//! From a data row to a model input: the problem text, a blank line, the
//! recipe's instruction suffix; the row's images decoded and processed;
//! prompts over the length limit refused.

use super::{Example, ImageSource, RowError};
use crate::model::SequenceInput;
use crate::pipeline::Pipeline;
use crate::processor::image::RgbImage;
use std::path::PathBuf;

/// How prompts are built from rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptFormat {
    /// Appended after a blank line (empty: nothing appended).
    pub suffix: String,
    /// Longer prompts (in tokens, image tokens included) are dropped.
    pub max_prompt_tokens: usize,
}

impl Default for PromptFormat {
    fn default() -> Self {
        Self {
            suffix: super::VPPO_PROMPT_SUFFIX.to_string(),
            max_prompt_tokens: 4096,
        }
    }
}

/// Why a row produced no prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The row is unusable (unreadable image, placeholder mismatch...).
    Corrupt(RowError),
    /// The prompt is longer than the limit.
    TooLong { row: usize, tokens: usize },
}

/// The problem as the reference's template uses it: Jinja's `trim`
/// (Python's `str.strip()`: Unicode white space and the separators
/// U+001C..U+001F).
pub fn trim_problem(problem: &str) -> &str {
    problem.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The user text of a row: the trimmed problem, then the suffix.
pub fn prompt_text(problem: &str, format: &PromptFormat) -> String {
    let problem = trim_problem(problem);
    if format.suffix.is_empty() {
        problem.to_string()
    } else {
        format!("{problem}\n\n{}", format.suffix)
    }
}

/// Decodes the row's images and builds its model input.
pub fn build_prompt(
    pipeline: &Pipeline,
    example: &Example,
    format: &PromptFormat,
) -> Result<SequenceInput, Skip> {
    let corrupt = |reason: String| {
        Skip::Corrupt(RowError {
            row: example.row,
            reason,
        })
    };
    let mut images = Vec::with_capacity(example.images.len());
    for (k, src) in example.images.iter().enumerate() {
        let (img, name) = match src {
            ImageSource::Bytes(b) => {
                let name = PathBuf::from(format!("row {} image {k}", example.row));
                (RgbImage::decode(b, &name), name)
            }
            ImageSource::Path(p) => (RgbImage::open(p), p.clone()),
        };
        images.push((img.map_err(|e| corrupt(e.to_string()))?, name));
    }
    let input = pipeline
        .prompt_input_from_images(&images, &prompt_text(&example.problem, format))
        .map_err(|e| match e {
            crate::pipeline::PipelineError::PromptTooLong { tokens, .. } => Skip::TooLong {
                row: example.row,
                tokens,
            },
            e => corrupt(e.to_string()),
        })?;
    if input.ids.len() > format.max_prompt_tokens {
        return Err(Skip::TooLong {
            row: example.row,
            tokens: input.ids.len(),
        });
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_problem_is_trimmed_like_python_strip() {
        let format = PromptFormat {
            suffix: "Answer.".into(),
            max_prompt_tokens: 10,
        };
        // Python: " \t<image>What is x?\n\u3000\x1c ".strip() == "<image>What is x?"
        assert_eq!(
            prompt_text(" \t<image>What is x?\n\u{3000}\u{1c} ", &format),
            "<image>What is x?\n\nAnswer."
        );
        // Inner white space stays.
        let bare = PromptFormat {
            suffix: String::new(),
            max_prompt_tokens: 10,
        };
        assert_eq!(prompt_text("\n a  b \n", &bare), "a  b");
    }
}
