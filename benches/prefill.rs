//! CPU prefill throughput of a small Qwen2.5-VL-shaped model with random
//! weights: the Qwen2.5-0.5B decoder (hidden 896, 24 layers, 14/2 heads,
//! vocab 151936) under a shortened real vision tower (8 blocks of hidden
//! 1280, 16 heads), one 448x448 image (256 image tokens) plus text, 512
//! tokens in all. Run with `cargo bench --bench prefill`.

use std::time::Instant;
use vppo_engine::model::config::{ModelConfig, TextConfig, TokenIds, VisionConfig};
use vppo_engine::model::params::{ParamLayout, Tensors};
use vppo_engine::model::{Qwen25Vl, SequenceInput};

fn small_config() -> ModelConfig {
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

fn main() {
    let config = small_config();
    let layout = ParamLayout::new(&config);
    let mut weights = Tensors::zeros(&layout);
    // Norm weights 1, everything else uniform in [-0.02, 0.02) (a hash of
    // the position, so the run is deterministic without an RNG).
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
    let params = layout.numel();
    let model = Qwen25Vl {
        dir: "random".into(),
        config,
        layout,
        weights,
        names: vppo_engine::model::checkpoint::NameLayout::Hub,
    };
    let grid = [1usize, 32, 32];
    let image_tokens = 256;
    let text_tokens = 256;
    let mut ids: Vec<u32> = (0..text_tokens / 2)
        .map(|i| (i * 7 % 150_000) as u32)
        .collect();
    ids.extend(std::iter::repeat_n(151_655u32, image_tokens));
    ids.extend((0..text_tokens / 2).map(|i| (i * 13 % 150_000) as u32));
    let pixel_values: Vec<f32> = (0..1024 * 1176)
        .map(|i| ((i % 255) as f32 / 127.0) - 1.0)
        .collect();
    let input = SequenceInput {
        ids,
        pixel_values,
        grids: vec![grid],
    };
    println!(
        "prefill bench: {:.0}M params, {} threads, {} tokens ({} image tokens from 1024 patches)",
        params as f64 / 1e6,
        rayon::current_num_threads(),
        input.ids.len(),
        image_tokens
    );
    let mut best = f64::INFINITY;
    for run in 0..3 {
        let t = Instant::now();
        let out = model.forward(&input).unwrap();
        let logits = model.logits(&out, &[input.ids.len() - 1]);
        let secs = t.elapsed().as_secs_f64();
        assert!(logits.iter().all(|v| v.is_finite()));
        println!(
            "run {run}: {secs:.2} s, {:.1} tokens/s",
            input.ids.len() as f64 / secs
        );
        best = best.min(secs);
    }
    println!(
        "best: {:.1} prefill tokens/s (vision tower + decoder + last-row lm_head)",
        input.ids.len() as f64 / best
    );
}
