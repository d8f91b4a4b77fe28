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
    #[error("the prompt is {tokens} tokens, longer than the model's context of {context} (max_position_embeddings in {config})")]
    PromptTooLong {
        tokens: usize,
        context: usize,
        config: PathBuf,
    },
    #[error("{config}: {field} = {id}, but the tokenizer's {token} is {found}; the config and the tokenizer do not belong together")]
    TokenMismatch {
        config: PathBuf,
        field: &'static str,
        id: u32,
        token: &'static str,
        found: String,
    },
}

/// Everything loaded from one checkpoint directory.
pub struct Pipeline {
    pub model: Qwen25Vl,
    pub text: TextProcessor,
    pub images: ImageProcessorConfig,
    /// `max_position_embeddings` of the checkpoint's config, when it has one.
    pub context: Option<usize>,
}

/// `max_position_embeddings` (in `text_config` or at the top level).
fn context_length(config: &Path) -> Option<usize> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config).ok()?).ok()?;
    let field = |v: &serde_json::Value| v.get("max_position_embeddings")?.as_u64();
    json.get("text_config")
        .and_then(field)
        .or_else(|| field(&json))
        .map(|v| v as usize)
}

impl Pipeline {
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        Self::new(
            Qwen25Vl::load(dir)?,
            TextProcessor::load(dir)?,
            ImageProcessorConfig::load(dir)?,
        )
    }

    /// Puts the parts together, checking that the config's special token
    /// ids are the tokenizer's (else every image would silently go unused).
    pub fn new(
        model: Qwen25Vl,
        text: TextProcessor,
        images: ImageProcessorConfig,
    ) -> Result<Self, PipelineError> {
        let config = model.dir.join("config.json");
        let tokens = &model.config.tokens;
        for (field, id, token) in [
            ("image_token_id", tokens.image_token_id, "<|image_pad|>"),
            (
                "vision_start_token_id",
                tokens.vision_start_token_id,
                "<|vision_start|>",
            ),
            (
                "vision_end_token_id",
                tokens.vision_end_token_id,
                "<|vision_end|>",
            ),
        ] {
            let found = text.token_id(token);
            if found != Some(id) {
                return Err(PipelineError::TokenMismatch {
                    config,
                    field,
                    id,
                    token,
                    found: found.map_or("missing".to_string(), |f| f.to_string()),
                });
            }
        }
        Ok(Self {
            context: context_length(&config),
            model,
            text,
            images,
        })
    }

    fn check_context(&self, tokens: usize) -> Result<(), PipelineError> {
        match self.context {
            Some(context) if tokens > context => Err(PipelineError::PromptTooLong {
                tokens,
                context,
                config: self.model.dir.join("config.json"),
            }),
            _ => Ok(()),
        }
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
            input.loaded.push(processed.loaded);
        }
        input.ids = self.text.prompt_ids(prompt, &tokens_per_image)?;
        self.check_context(input.ids.len())?;
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
        self.check_context(input.ids.len())?;
        Ok((input, prompt_len))
    }
}
