//! Qwen2.5-VL `config.json`, in both layouts found in the wild: the flat Hub
//! layout (text fields at the top level, `rope_scaling.mrope_section`) and
//! the nested layout of newer tools (`text_config`, `rope_parameters`).

use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: missing or invalid field `{field}` ({expected})")]
    Field {
        path: PathBuf,
        field: String,
        expected: &'static str,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The Qwen2 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequencies per position stream (t, h, w); sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    pub tie_word_embeddings: bool,
}

/// The vision tower and patch merger.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    /// The merger's output width (= the text hidden size).
    pub out_hidden_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values per patch row of `pixel_values`: C * T * P * P (1176 for Qwen2.5-VL).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Patches merged into one LLM token (4).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
    /// Window side in merged tokens (112 / 2 / 14 = 4).
    pub fn window_merged(&self) -> usize {
        (self.window_size / self.spatial_merge_size / self.patch_size).max(1)
    }
}

/// Special token ids the graph needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenIds {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tokens: TokenIds,
}

/// Field lookup that names the file on failure.
struct Fields<'a> {
    path: &'a Path,
    /// Objects searched in order (e.g. `text_config` first, then the top level).
    scopes: Vec<&'a Value>,
}

impl Fields<'_> {
    fn find(&self, key: &str) -> Option<&Value> {
        self.scopes
            .iter()
            .find_map(|s| s.get(key))
            .filter(|v| !v.is_null())
    }
    fn err(&self, field: &str, expected: &'static str) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            expected,
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.find(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.err(key, "a non-negative integer"))
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.find(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.find(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number")),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.find(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }
    fn u32_or(&self, key: &str, default: u32) -> Result<u32, ConfigError> {
        Ok(self.usize_or(key, default as usize)? as u32)
    }
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint directory (or the file itself).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: file.clone(),
            source,
        })?;
        Self::from_json(&json, &file)
    }

    pub fn from_json(json: &Value, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if !json.is_object() {
            return Err(invalid("the top level is not a JSON object".into()));
        }
        if let Some(mt) = json.get("model_type").and_then(Value::as_str) {
            if mt != "qwen2_5_vl" {
                return Err(invalid(format!(
                    "model_type is `{mt}`, expected `qwen2_5_vl`"
                )));
            }
        }
        let mut scopes = Vec::new();
        if let Some(tc) = json.get("text_config").filter(|v| v.is_object()) {
            scopes.push(tc);
        }
        scopes.push(json);
        let top = Fields { path, scopes };

        // RoPE: `rope_scaling` (flat Hub) or `rope_parameters` (newer), in
        // either scope; rope_theta may live inside rope_parameters.
        let rope = top
            .find("rope_parameters")
            .or_else(|| top.find("rope_scaling"));
        let rope_fields = Fields {
            path,
            scopes: rope.into_iter().chain(top.scopes.iter().copied()).collect(),
        };
        let section: Vec<usize> = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect()
            })
            .ok_or_else(|| top.err("rope_scaling.mrope_section", "a list of 3 integers"))?;
        let mrope_section: [usize; 3] = section
            .clone()
            .try_into()
            .map_err(|_| top.err("rope_scaling.mrope_section", "a list of 3 integers"))?;

        let hidden_size = top.usize("hidden_size")?;
        let num_heads = top.usize("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 && top.find("head_dim").is_none() {
            return Err(invalid(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
            )));
        }
        let num_kv_heads = top.usize_or("num_key_value_heads", num_heads)?;
        let head_dim = top.usize_or("head_dim", hidden_size / num_heads)?;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")));
        }
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(invalid(format!(
                "mrope_section {mrope_section:?} must sum to head_dim/2 = {}",
                head_dim / 2
            )));
        }
        // tie_word_embeddings: the nested layout may set it on either level;
        // the top level wins because that is what transformers reads.
        let tie = match json.get("tie_word_embeddings").and_then(Value::as_bool) {
            Some(t) => t,
            None => top.bool_or("tie_word_embeddings", false)?,
        };
        let text = TextConfig {
            hidden_size,
            intermediate_size: top.usize("intermediate_size")?,
            num_layers: top.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: top.usize("vocab_size")?,
            rms_norm_eps: top.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: rope_fields.f64_or("rope_theta", 1_000_000.0)?,
            mrope_section,
            tie_word_embeddings: tie,
        };

        let vision_json = json
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| top.err("vision_config", "an object"))?;
        let v = Fields {
            path,
            scopes: vec![vision_json],
        };
        let in_channels = match v.find("in_channels") {
            Some(_) => v.usize("in_channels")?,
            None => v.usize_or("in_chans", 3)?,
        };
        if let Some(act) = v.find("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(invalid(format!(
                    "vision_config.hidden_act `{act}` is not supported (silu only)"
                )));
            }
        }
        // Missing vision fields take transformers' `Qwen2_5_VLVisionConfig`
        // defaults: the published 32B and 72B configs leave out depth,
        // heads, windows and the full-attention blocks.
        let vision = VisionConfig {
            depth: v.usize_or("depth", 32)?,
            hidden_size: v.usize_or("hidden_size", 3584)?,
            intermediate_size: v.usize_or("intermediate_size", 3420)?,
            num_heads: v.usize_or("num_heads", 16)?,
            in_channels,
            patch_size: v.usize_or("patch_size", 14)?,
            spatial_merge_size: v.usize_or("spatial_merge_size", 2)?,
            temporal_patch_size: v.usize_or("temporal_patch_size", 2)?,
            window_size: v.usize_or("window_size", 112)?,
            fullatt_block_indexes: v
                .find("fullatt_block_indexes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            out_hidden_size: v.usize_or("out_hidden_size", hidden_size)?,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
        };
        if vision.num_heads == 0
            || vision.hidden_size % vision.num_heads != 0
            || vision.head_dim() % 4 != 0
        {
            return Err(invalid(format!(
                "vision hidden_size {} / num_heads {} must give a head_dim divisible by 4",
                vision.hidden_size, vision.num_heads
            )));
        }
        if vision.out_hidden_size != hidden_size {
            return Err(invalid(format!(
                "vision_config.out_hidden_size {} differs from the text hidden_size {hidden_size}",
                vision.out_hidden_size
            )));
        }
        let tokens = TokenIds {
            image_token_id: top.u32_or("image_token_id", 151_655)?,
            video_token_id: top.u32_or("video_token_id", 151_656)?,
            vision_start_token_id: top.u32_or("vision_start_token_id", 151_652)?,
            vision_end_token_id: top.u32_or("vision_end_token_id", 151_653)?,
        };
        Ok(Self {
            text,
            vision,
            tokens,
        })
    }
}
