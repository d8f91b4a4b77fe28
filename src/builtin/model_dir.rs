//! The built-in model: a tiny Qwen2.5-VL (same architecture, small sizes)
//! written as a complete Hugging Face checkpoint directory, so everything
//! downstream (loading, training, saving, `score`, `generate`) treats it like
//! a real checkpoint. Its tokenizer is a byte-level BPE with Qwen2's
//! pre-tokeniser, trained on the built-in task's texts, with Qwen's special
//! tokens after the BPE vocabulary as in the released tokenizers.

use crate::model::config::ModelConfig;
use crate::model::params::{ParamLayout, Tensors};
use crate::processor::text::BUILTIN_CHAT_TEMPLATE;
use crate::safetensors_io::{write_atomic, OwnedTensor, WriteError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokeniser regex, as in its tokenizer.json.
const QWEN_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2.5-VL's added tokens, in their order (the first 14 are special).
const SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];
const PLAIN_ADDED_TOKENS: [&str; 8] = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error("cannot write the built-in model to {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("building the built-in tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The sizes of the built-in model.
#[derive(Debug, Clone, Copy)]
pub struct TinySizes {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vision_hidden: usize,
    pub vision_depth: usize,
    pub vision_heads: usize,
    pub vision_intermediate: usize,
}

impl Default for TinySizes {
    fn default() -> Self {
        Self {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 192,
            vision_hidden: 32,
            vision_depth: 2,
            vision_heads: 2,
            vision_intermediate: 64,
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BuiltinError + '_ {
    move |e| BuiltinError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), BuiltinError> {
    let text = serde_json::to_string_pretty(value).expect("json serializes");
    std::fs::write(path, text).map_err(io_err(path))
}

/// Byte-level BPE trained on `corpus` (plus the chat template's own words),
/// then Qwen's added tokens.
pub fn train_tokenizer(corpus: &[String]) -> Result<Tokenizer, BuiltinError> {
    let err = |e: tokenizers::Error| BuiltinError::Tokenizer(e.to_string());
    let split = Split::new(
        SplitPattern::Regex(QWEN_PRETOKENIZE_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_normalizer(Some(NFC)).map_err(err)?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, false)));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(1024)
        .min_frequency(2)
        .initial_alphabet(alphabet)
        .build()
        .into();
    let mut texts: Vec<String> = [
        "system",
        "You are a helpful assistant.",
        "user",
        "assistant",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.extend(corpus.iter().cloned());
    let repeated = texts.iter().cycle().take(texts.len() * 4);
    tokenizer.train(&mut trainer, repeated).map_err(err)?;
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(special).map_err(err)?;
    let plain: Vec<AddedToken> = PLAIN_ADDED_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, false).normalized(false))
        .collect();
    tokenizer.add_tokens(plain).map_err(err)?;
    Ok(tokenizer)
}

fn config_json(s: &TinySizes, vocab: usize, tok: &Tokenizer) -> serde_json::Value {
    let id = |t: &str| tok.token_to_id(t).expect("added token present");
    json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "pad_token_id": id("<|endoftext|>"),
        "vision_start_token_id": id("<|vision_start|>"),
        "vision_end_token_id": id("<|vision_end|>"),
        "vision_token_id": id("<|vision_pad|>"),
        "image_token_id": id("<|image_pad|>"),
        "video_token_id": id("<|video_pad|>"),
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 4096,
        "max_window_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "use_cache": true,
        "use_sliding_window": false,
        "vision_config": {
            "depth": s.vision_depth,
            "hidden_act": "silu",
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate,
            "num_heads": s.vision_heads,
            "in_chans": 3,
            "out_hidden_size": s.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [s.vision_depth - 1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2
        },
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(s.hidden / s.heads)},
        "vocab_size": vocab
    })
}

/// M-RoPE sections (temporal, height, width) over head_dim / 2 frequencies,
/// in Qwen's proportions (16, 24, 24 of 64).
fn mrope_section(head_dim: usize) -> [usize; 3] {
    let half = head_dim / 2;
    let t = half / 4;
    let h = (half - t) / 2;
    [t, h, half - t - h]
}

/// Random initial weights: N(0, 0.02) matrices and embeddings, unit norm
/// scales, zero biases (transformers' `_init_weights` for this model).
pub fn init_weights(layout: &ParamLayout, seed: u64) -> Tensors {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
    let mut weights = Tensors::zeros(layout);
    for (spec, values) in layout.specs.iter().zip(weights.0.iter_mut()) {
        let leaf = spec.name.rsplit('.').nth(1).unwrap_or("");
        if spec.name.ends_with(".bias") {
            continue;
        } else if leaf.contains("norm") || leaf == "ln_q" {
            values.fill(1.0);
        } else {
            values.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
        }
    }
    weights
}

/// Writes the built-in model (config, tokenizer, chat template, processor
/// config, random weights) into `dir`, which is created if needed.
pub fn write_model_dir(
    dir: &Path,
    sizes: &TinySizes,
    image_size: usize,
    corpus: &[String],
    seed: u64,
) -> Result<(), BuiltinError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tokenizer = train_tokenizer(corpus)?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, true)
        .map_err(|e| BuiltinError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let vocab = tokenizer.get_vocab_size(true).next_multiple_of(64);
    let config = config_json(sizes, vocab, &tokenizer);
    write_json(&dir.join("config.json"), &config)?;
    let id = |t: &str| tokenizer.token_to_id(t).expect("added token present");
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": id("<|endoftext|>"),
            "pad_token_id": id("<|endoftext|>"),
            "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
            "do_sample": true
        }),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 4096,
            "tokenizer_class": "Qwen2Tokenizer",
            "processor_class": "Qwen2_5_VLProcessor"
        }),
    )?;
    write_json(
        &dir.join("chat_template.json"),
        &json!({ "chat_template": BUILTIN_CHAT_TEMPLATE }),
    )?;
    let pixels = image_size * image_size;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "min_pixels": pixels,
            "max_pixels": pixels,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"
        }),
    )?;
    let model_config = ModelConfig::load(dir).map_err(|e| BuiltinError::Io {
        path: dir.join("config.json"),
        reason: e.to_string(),
    })?;
    let layout = ParamLayout::new(&model_config);
    let weights = init_weights(&layout, seed);
    let tensors: Vec<OwnedTensor> = layout
        .specs
        .iter()
        .zip(&weights.0)
        .map(|(spec, values)| OwnedTensor::f32(&spec.name, &spec.shape, values))
        .collect();
    write_atomic(&dir.join("model.safetensors"), &tensors)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrope_sections_cover_half_the_head() {
        assert_eq!(mrope_section(128), [16, 24, 24]);
        assert_eq!(mrope_section(16), [2, 3, 3]);
    }

    #[test]
    fn tokenizer_round_trips_and_places_added_tokens_after_bpe() {
        let corpus = vec![
            "How many red shapes are there?".to_string(),
            "\\boxed{3}".into(),
        ];
        let tok = train_tokenizer(&corpus).unwrap();
        let bpe = tok.get_vocab_size(false);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(bpe as u32));
        assert_eq!(tok.token_to_id("<|file_sep|>"), Some(bpe as u32 + 21));
        let text = "How many red shapes are there? \\boxed{3}";
        let enc = tok.encode(text, false).unwrap();
        assert!(enc.get_ids().len() < text.len() / 2, "merges were learned");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        // Unseen text still encodes (byte fallback through the alphabet).
        let other = "Zebra 42!";
        let ids = tok.encode(other, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), other);
    }
}
