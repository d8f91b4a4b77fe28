//! The small random Qwen2.5-VL-shaped model the CPU benches share: the
//! Qwen2.5-0.5B decoder (hidden 896, 24 layers, 14/2 heads, vocab 151936,
//! tied head) under a shortened real vision tower (8 blocks of hidden 1280,
//! 16 heads), and a 512-token input with one 448x448 image.
#![allow(dead_code)]

use vppo_engine::model::checkpoint::NameLayout;
use vppo_engine::model::config::{ModelConfig, TextConfig, TokenIds, VisionConfig};
use vppo_engine::model::params::{ParamLayout, Tensors};
use vppo_engine::model::{Qwen25Vl, SequenceInput};

pub fn small_config() -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 151_936,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            mrope_section: [8, 12, 12],
            tie_word_embeddings: true,
        },
        vision: VisionConfig {
            depth: 8,
            hidden_size: 1280,
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: 112,
            fullatt_block_indexes: vec![3, 7],
            out_hidden_size: 896,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
        },
        tokens: TokenIds {
            image_token_id: 151_655,
            video_token_id: 151_656,
            vision_start_token_id: 151_652,
            vision_end_token_id: 151_653,
        },
    }
}

/// The model with deterministic random weights: norm weights 1, everything
/// else uniform in [-0.02, 0.02) (a hash of the position, no RNG needed).
pub fn small_model() -> Qwen25Vl {
    let config = small_config();
    let layout = ParamLayout::new(&config);
    let mut weights = Tensors::zeros(&layout);
    for (i, t) in weights.0.iter_mut().enumerate() {
        let is_norm = layout.specs[i].shape.len() == 1 && layout.specs[i].name.contains("norm");
        for (j, v) in t.iter_mut().enumerate() {
            let h = ((j as u64) ^ ((i as u64) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            *v = if is_norm {
                1.0
            } else {
                0.04 * (h as f32 / (1u64 << 24) as f32 - 0.5)
            };
        }
    }
    Qwen25Vl {
        dir: "random".into(),
        config,
        layout,
        weights,
        names: NameLayout::Hub,
    }
}

/// 128 text tokens, a 32x32-patch image (256 tokens), 128 text tokens.
pub fn small_input() -> SequenceInput {
    let mut ids: Vec<u32> = (0..128).map(|i| (i * 7 % 150_000) as u32).collect();
    ids.extend(std::iter::repeat_n(151_655u32, 256));
    ids.extend((0..128).map(|i| (i * 13 % 150_000) as u32));
    SequenceInput {
        ids,
        pixel_values: (0..1024 * 1176)
            .map(|i| ((i % 255) as f32 / 127.0) - 1.0)
            .collect(),
        grids: vec![[1, 32, 32]],
        resized: Vec::new(),
        loaded: Vec::new(),
    }
}
