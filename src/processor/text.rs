//! Text side of the processor: the checkpoint's tokenizer (`tokenizer.json`)
//! and chat template (Jinja, rendered with minijinja), and building the
//! token ids of a prompt with images and of a response.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The Qwen2.5-VL chat template, used when the checkpoint ships none.
pub const BUILTIN_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Marks where an image goes in user text (the VPPO / ViRL39K convention).
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// The token each image's patches replace, repeated once per merged token.
pub const IMAGE_PAD: &str = "<|image_pad|>";

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Template { path: PathBuf, reason: String },
    #[error(
        "the prompt has {placeholders} `<image>` placeholder(s) but {images} image(s) were given"
    )]
    ImageCount { placeholders: usize, images: usize },
    #[error("the rendered prompt has {found} `<|image_pad|>` tokens for {images} image(s)")]
    PadCount { found: usize, images: usize },
    #[error("the tokenizer has no `{0}` token")]
    MissingToken(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Tokenizer + chat template of one checkpoint.
pub struct TextProcessor {
    tokenizer: Tokenizer,
    template: String,
    /// Where the template came from, for error messages.
    template_source: PathBuf,
    pub image_pad_id: u32,
}

/// Reads the chat template: `chat_template.json`, `chat_template.jinja`,
/// then `tokenizer_config.json`'s `chat_template`; `None` if none has one.
fn find_template(dir: &Path) -> Result<Option<(String, PathBuf)>, TextError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| TextError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let json_field = |p: &Path| -> Result<Option<String>, TextError> {
        let v: Value = serde_json::from_str(&read(p)?).map_err(|e| TextError::Template {
            path: p.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Ok(v.get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string))
    };
    let json_file = dir.join("chat_template.json");
    if json_file.is_file() {
        if let Some(t) = json_field(&json_file)? {
            return Ok(Some((t, json_file)));
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some((read(&jinja)?, jinja)));
    }
    let cfg = dir.join("tokenizer_config.json");
    if cfg.is_file() {
        if let Some(t) = json_field(&cfg)? {
            return Ok(Some((t, cfg)));
        }
    }
    Ok(None)
}

/// Splits user text at `<image>` placeholders into chat-template content
/// items; without placeholders all images come first, then the text.
pub fn user_content(text: &str, images: usize) -> Result<Value, TextError> {
    let pieces: Vec<&str> = text.split(IMAGE_PLACEHOLDER).collect();
    let placeholders = pieces.len() - 1;
    let mut items = Vec::new();
    if placeholders == 0 {
        items.extend((0..images).map(|_| json!({"type": "image"})));
        if !text.is_empty() {
            items.push(json!({"type": "text", "text": text}));
        }
    } else {
        if placeholders != images {
            return Err(TextError::ImageCount {
                placeholders,
                images,
            });
        }
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                items.push(json!({"type": "image"}));
            }
            if !piece.is_empty() {
                items.push(json!({"type": "text", "text": piece}));
            }
        }
    }
    Ok(Value::Array(items))
}

impl TextProcessor {
    /// Loads `tokenizer.json` and the chat template from a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| TextError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let (template, template_source) = find_template(dir)?.unwrap_or_else(|| {
            (
                BUILTIN_CHAT_TEMPLATE.to_string(),
                PathBuf::from("<built-in template>"),
            )
        });
        Self::new(tokenizer, template, template_source)
    }

    pub fn new(
        tokenizer: Tokenizer,
        template: String,
        template_source: PathBuf,
    ) -> Result<Self, TextError> {
        let image_pad_id = tokenizer
            .token_to_id(IMAGE_PAD)
            .ok_or_else(|| TextError::MissingToken(IMAGE_PAD.into()))?;
        let processor = Self {
            tokenizer,
            template,
            template_source,
            image_pad_id,
        };
        // Fail at load time, naming the file, if the template does not parse.
        processor.render(&json!([]), false)?;
        Ok(processor)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Renders chat messages (transformers' `apply_chat_template(tokenize=False)`).
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let mut env = minijinja::Environment::new();
        // transformers renders chat templates with these two options on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let bad = |e: minijinja::Error| TextError::Template {
            path: self.template_source.clone(),
            reason: format!("chat template: {e}"),
        };
        env.add_template("chat", &self.template).map_err(bad)?;
        let tmpl = env.get_template("chat").map_err(bad)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            add_vision_id => false,
        })
        .map_err(bad)
    }

    /// Token ids of rendered text in which each `<|image_pad|>` is expanded
    /// to `image_tokens[i]` copies (the processor's behaviour).
    pub fn encode_with_images(
        &self,
        rendered: &str,
        image_tokens: &[usize],
    ) -> Result<Vec<u32>, TextError> {
        let found = rendered.matches(IMAGE_PAD).count();
        if found != image_tokens.len() {
            return Err(TextError::PadCount {
                found,
                images: image_tokens.len(),
            });
        }
        let mut expanded = String::with_capacity(
            rendered.len() + image_tokens.iter().sum::<usize>() * IMAGE_PAD.len(),
        );
        for (i, piece) in rendered.split(IMAGE_PAD).enumerate() {
            if i > 0 {
                expanded.push_str(&IMAGE_PAD.repeat(image_tokens[i - 1]));
            }
            expanded.push_str(piece);
        }
        self.encode(&expanded, true)
    }

    /// The ids of a single-turn prompt: default system prompt, a user turn
    /// with the images (at `<image>` placeholders, else first) and `text`,
    /// then the assistant generation prompt.
    pub fn prompt_ids(&self, text: &str, image_tokens: &[usize]) -> Result<Vec<u32>, TextError> {
        let messages =
            json!([{"role": "user", "content": user_content(text, image_tokens.len())?}]);
        let rendered = self.render(&messages, true)?;
        self.encode_with_images(&rendered, image_tokens)
    }

    /// Plain tokenisation; `add_special_tokens` as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Encode(e.to_string()))
    }
}
