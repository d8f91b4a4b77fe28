//! A checkpoint ready for use: the model with its text processor (tokenizer,
//! chat template) and image processor, and turning user prompts and images
//! into model inputs. `score` and `generate` build on it.

use crate::model::{ModelError, Qwen25Vl, SequenceInput};
use crate::processor::image::{process_image, ImageError, ImageProcessorConfig, RgbImage};
use crate::processor::text::{TextError, TextProcessor};
use crate::safetensors_io::WriteError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the response is empty after tokenisation: nothing to score")]
    EmptyResponse,
}

/// Everything loaded from one checkpoint directory.
pub struct Pipeline {
    pub model: Qwen25Vl,
    pub text: TextProcessor,
    pub images: ImageProcessorConfig,
}

impl Pipeline {
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        Ok(Self {
            model: Qwen25Vl::load(dir)?,
            text: TextProcessor::load(dir)?,
            images: ImageProcessorConfig::load(dir)?,
        })
    }

    /// The model input of a single-turn prompt: the images processed, the
    /// chat rendered with `<|image_pad|>` expanded, tokenised.
    pub fn prompt_input(
        &self,
        images: &[PathBuf],
        prompt: &str,
    ) -> Result<SequenceInput, PipelineError> {
        let decoded = images
            .iter()
            .map(|p| RgbImage::open(p).map(|img| (img, p.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        self.prompt_input_from_images(&decoded, prompt)
    }

    /// [`Self::prompt_input`] for images already decoded, each with the name
    /// errors should give it (its path, or its place in a data set).
    pub fn prompt_input_from_images(
        &self,
        images: &[(RgbImage, PathBuf)],
        prompt: &str,
    ) -> Result<SequenceInput, PipelineError> {
        let mut input = SequenceInput::default();
        let mut tokens_per_image = Vec::with_capacity(images.len());
        for (img, name) in images {
            let processed = process_image(img, &self.images, name)?;
            tokens_per_image.push(processed.num_tokens(self.images.merge_size));
            input.pixel_values.extend(processed.pixel_values);
            input.grids.push(processed.grid_thw);
            input.resized.push(processed.resized);
        }
        input.ids = self.text.prompt_ids(prompt, &tokens_per_image)?;
        Ok(input)
    }

    /// The prompt's input followed by the response tokenised without special
    /// tokens; also returns the prompt length.
    pub fn prepare(
        &self,
        images: &[PathBuf],
        prompt: &str,
        response: &str,
    ) -> Result<(SequenceInput, usize), PipelineError> {
        let mut input = self.prompt_input(images, prompt)?;
        let prompt_len = input.ids.len();
        let response_ids = self.text.encode(response, false)?;
        if response_ids.is_empty() {
            return Err(PipelineError::EmptyResponse);
        }
        input.ids.extend(response_ids);
        Ok((input, prompt_len))
    }
}
