//! `vppo-engine bench-rollout`: rollout throughput of the generator on
//! random weights at a checkpoint's shapes (a config.json: the published
//! 7B and 3B, or the tiny default), prompts of a fixed length with one
//! image, fixed response lengths (end-of-sequence ids ignored), and the
//! HBM roofline beside each measurement: every step reads the decoder's
//! weights once and each sequence's cached keys and values once, so
//! `sum over steps of (weight bytes + KV bytes) / bandwidth` bounds the
//! time from below. `scripts/bench_rollout_torch.py` times transformers'
//! `generate` on the same shapes.

use crate::model::config::{ModelConfig, TextConfig, TokenIds, VisionConfig};
use crate::model::engine::Engine;
use crate::model::kv_cache::KvStore;
use crate::model::params::{ParamLayout, Tensors};
use crate::model::{ModelError, SequenceInput};
use crate::ops::{Backend, Buffer, DType};
use crate::rollout::generate::{Generator, RolloutLimits, StepTrace, KV_BLOCK_SIZE};
use crate::rollout::sampling::SamplingParams;
use rayon::prelude::*;
use std::time::Instant;

/// A Qwen2.5-VL of a few thousand parameters (the default shape: the
/// bench's path, not a throughput figure).
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 512,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            mrope_section: [2, 3, 3],
            tie_word_embeddings: false,
        },
        vision: VisionConfig {
            depth: 2,
            hidden_size: 32,
            intermediate_size: 48,
            num_heads: 2,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: 112,
            fullatt_block_indexes: vec![1],
            out_hidden_size: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
        },
        tokens: TokenIds {
            image_token_id: 505,
            video_token_id: 506,
            vision_start_token_id: 503,
            vision_end_token_id: 504,
        },
    }
}

/// Random weights for `layout`: norm scales 1, everything else uniform in
/// [-0.02, 0.02) from a hash of (tensor, element), filled in parallel
/// (a 7B model in seconds; values need no statistics here).
pub fn random_weights(layout: &ParamLayout, seed: u64) -> Tensors {
    let mut weights = Tensors::zeros(layout);
    weights.0.par_iter_mut().enumerate().for_each(|(i, t)| {
        let name = &layout.specs[i].name;
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        if leaf.contains("norm") || leaf == "ln_q" {
            t.fill(1.0);
            return;
        }
        t.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, v) in chunk.iter_mut().enumerate() {
                    let k = ((c << 16) + j) as u64 ^ ((i as u64) << 40) ^ seed;
                    let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    *v = 0.04 * (h as f32 / (1u64 << 24) as f32 - 0.5);
                }
            });
    });
    weights
}

/// A prompt of `tokens` ids: `<vision_start>`, the image tokens of one
/// `side x side` image (side a multiple of 28; 0: no image),
/// `<vision_end>`, then text ids that differ from prompt to prompt.
pub fn bench_prompt(
    cfg: &ModelConfig,
    tokens: usize,
    side: usize,
    index: usize,
) -> Result<SequenceInput, String> {
    let vc = &cfg.vision;
    let unit = vc.patch_size * vc.spatial_merge_size;
    if side % unit != 0 {
        return Err(format!(
            "--image-side {side} is not a multiple of {unit} (patch x merge)"
        ));
    }
    let grid = side / vc.patch_size;
    let image_tokens = (side / unit) * (side / unit);
    let framing = if side > 0 { image_tokens + 2 } else { 0 };
    if tokens <= framing {
        return Err(format!(
            "--prompt-tokens {tokens} leaves no text after the image's {framing} tokens"
        ));
    }
    let t = &cfg.tokens;
    let special = [
        t.image_token_id,
        t.video_token_id,
        t.vision_start_token_id,
        t.vision_end_token_id,
    ];
    let vocab = cfg.text.vocab_size as u64;
    let mut ids = Vec::with_capacity(tokens);
    if side > 0 {
        ids.push(t.vision_start_token_id);
        ids.extend(std::iter::repeat_n(t.image_token_id, image_tokens));
        ids.push(t.vision_end_token_id);
    }
    let mut k = index as u64 * 0x1000_0000;
    while ids.len() < tokens {
        k += 1;
        let id = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % vocab;
        if !special.contains(&(id as u32)) {
            ids.push(id as u32);
        }
    }
    let patches = grid * grid;
    let pixel_values = (0..patches * vc.patch_dim())
        .map(|i| ((i * 31 + index * 7) % 255) as f32 / 127.0 - 1.0)
        .collect();
    Ok(SequenceInput {
        ids,
        pixel_values,
        grids: if side > 0 {
            vec![[1, grid, grid]]
        } else {
            vec![]
        },
        resized: Vec::new(),
        loaded: Vec::new(),
    })
}

/// Long-tailed response lengths in [1, max]: a Pareto(alpha 1.5) quantile
/// of scale max/8 at the golden-ratio sequence `u_k = frac(0.5 + k *
/// 0.618034)`, capped at `max`. The PyTorch script computes the same.
pub fn mix_lengths(count: usize, max: usize) -> Vec<usize> {
    (0..count)
        .map(|k| {
            let u = (0.5 + k as f64 * 0.618_034).fract();
            let x = (max as f64 / 8.0) / (1.0 - u).powf(1.0 / 1.5);
            (x.round() as usize).clamp(1, max)
        })
        .collect()
}

/// One bench case: `prompts` prompts x `n` samples, sample `k` generating
/// `lengths[k]` tokens.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub prompts: usize,
    pub n: usize,
    pub lengths: Vec<usize>,
}

/// What a case measured, and its roofline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub id: String,
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub sequences: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub steps: usize,
    /// Bytes every step reads: decoder weights, and KV traffic in all.
    pub weight_bytes: usize,
    pub kv_bytes: usize,
    pub roofline_s: f64,
    pub roofline_tokens_per_s: f64,
    pub pct_of_roofline: f64,
    pub preemptions: usize,
    pub kv_blocks: usize,
    /// Decode-only steps padded to a row bucket, and those replayed from a
    /// captured CUDA graph (0 with `--enforce-eager` or on the CPU).
    pub bucketed_steps: usize,
    pub graph_replays: usize,
}

/// Bytes of the decoder's weights as the engine holds them (the vision
/// tower runs once per image, not per step).
pub fn decoder_weight_bytes<B: Backend>(engine: &Engine<B>) -> usize {
    engine
        .layout
        .specs
        .iter()
        .zip(&engine.weights)
        .filter(|(spec, _)| !spec.name.starts_with("visual."))
        .map(|(_, w)| {
            w.len()
                * match w.dtype() {
                    DType::F32 => 4,
                    DType::Bf16 => 2,
                }
        })
        .sum()
}

/// The HBM lower bound of a generate call's steps at `bandwidth` bytes/s:
/// (weight bytes, KV bytes in all, seconds).
pub fn roofline(
    trace: &[StepTrace],
    weight_bytes: usize,
    kv_token_bytes: usize,
    bandwidth: f64,
) -> (usize, usize, f64) {
    let kv: usize = trace
        .iter()
        .map(|t| t.context_tokens * kv_token_bytes)
        .sum();
    let total = (weight_bytes * trace.len() + kv) as f64;
    (weight_bytes, kv, total / bandwidth)
}

/// Runs one case on `engine` (sampling at temperature 1, the recipe's
/// top-p 0.99, no end-of-sequence ids) and sets it against the roofline.
pub fn run_case<B: Backend>(
    engine: &Engine<B>,
    prompts: &[SequenceInput],
    case: &Case,
    limits: RolloutLimits,
    bandwidth: f64,
) -> Result<CaseResult, ModelError> {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.99,
        top_k: 0,
    };
    let mut generator = Generator::new(engine, vec![]).with_limits(limits);
    generator.banned.clear();
    engine.be.synchronize()?;
    let start = Instant::now();
    let samples =
        generator.generate_capped(&prompts[..case.prompts], case.n, &params, &case.lengths, 0)?;
    engine.be.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let output_tokens: usize = samples.iter().map(|s| s.token_ids.len()).sum();
    let kv_token_bytes =
        KvStore::<B>::block_bytes(engine.config(), KV_BLOCK_SIZE, engine.precision.dtype())
            / KV_BLOCK_SIZE;
    let (weight_bytes, kv_bytes, roofline_s) = roofline(
        &generator.trace,
        decoder_weight_bytes(engine),
        kv_token_bytes,
        bandwidth,
    );
    Ok(CaseResult {
        id: case.name.clone(),
        implementation: "ours",
        sequences: samples.len(),
        prompt_tokens: prompts[0].ids.len(),
        output_tokens,
        seconds,
        tokens_per_s: output_tokens as f64 / seconds,
        steps: generator.trace.len(),
        weight_bytes,
        kv_bytes,
        roofline_s,
        roofline_tokens_per_s: output_tokens as f64 / roofline_s,
        pct_of_roofline: 100.0 * roofline_s / seconds,
        preemptions: generator.stats.preemptions,
        kv_blocks: generator.kv_blocks,
        bucketed_steps: generator.stats.bucketed_steps,
        graph_replays: generator.stats.graph_replays,
    })
}

/// The cases of a run: `batch` prompts x 1 sample of `new_tokens` for each
/// batch size, and the recipe's mix (`mix_prompts` x `mix_n` samples of
/// long-tailed lengths up to `new_tokens`) when `mix_prompts > 0`.
pub fn cases(batches: &[usize], new_tokens: usize, mix_prompts: usize, mix_n: usize) -> Vec<Case> {
    let mut cases: Vec<Case> = batches
        .iter()
        .map(|&b| Case {
            name: format!("rollout batch {b}"),
            prompts: b,
            n: 1,
            lengths: vec![new_tokens; b],
        })
        .collect();
    if mix_prompts > 0 {
        cases.push(Case {
            name: format!("rollout mix {mix_prompts}x{mix_n}"),
            prompts: mix_prompts,
            n: mix_n,
            lengths: mix_lengths(mix_prompts * mix_n, new_tokens),
        });
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_lengths_are_long_tailed_and_bounded() {
        let l = mix_lengths(384, 512);
        assert!(l.iter().all(|&x| (1..=512).contains(&x)));
        let mut sorted = l.clone();
        sorted.sort();
        let median = sorted[192];
        // Pareto(1.5) of scale 64: median 64 * 2^(2/3) ~ 102; a tail at the cap.
        assert!((90..=115).contains(&median), "median {median}");
        assert!(l.iter().filter(|&&x| x == 512).count() >= 10);
        assert!(sorted[0] >= 64);
    }

    #[test]
    fn the_roofline_counts_weights_per_step_and_kv_per_sequence() {
        let trace = vec![
            StepTrace {
                decode_rows: 0,
                chunks: vec![(0, 0, 10)],
                context_tokens: 10,
                ..Default::default()
            },
            StepTrace {
                decode_rows: 2,
                context_tokens: 11 + 5,
                ..Default::default()
            },
        ];
        let (w, kv, s) = roofline(&trace, 1000, 8, 100.0);
        assert_eq!((w, kv), (1000, (10 + 16) * 8));
        assert!((s - (2000.0 + 208.0) / 100.0).abs() < 1e-12);
    }

    #[test]
    fn prompts_have_their_length_one_image_and_no_stray_specials() {
        let cfg = tiny_config();
        let p = bench_prompt(&cfg, 40, 56, 3).unwrap();
        assert_eq!(p.ids.len(), 40);
        assert_eq!(p.grids, vec![[1, 4, 4]]);
        let image = p.ids.iter().filter(|&&t| t == 505).count();
        assert_eq!(image, 4);
        assert_eq!(p.pixel_values.len(), 16 * cfg.vision.patch_dim());
        assert_ne!(bench_prompt(&cfg, 40, 56, 4).unwrap().ids, p.ids);
        assert!(bench_prompt(&cfg, 40, 50, 0).unwrap_err().contains("28"));
        assert!(bench_prompt(&cfg, 6, 56, 0)
            .unwrap_err()
            .contains("no text"));
    }
}
