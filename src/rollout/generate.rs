//! Batched generation: each prompt is prefilled once (its images through the
//! vision tower once), its n samples fork the prefill's KV cache, and all
//! live samples of all prompts decode together, one token per step, until
//! they sample an end-of-sequence id or reach the token budget.

use super::kv_cache::{PagedKvCache, SeqCache};
use super::sampling::{sample_rng, sample_token, SamplingParams};
use crate::backend::cpu::embedding::embedding_fwd;
use crate::backend::cpu::rope::RopeTable;
use crate::model::acts::Save;
use crate::model::text::{decode_step, lm_head_rows};
use crate::model::{ModelError, Qwen25Vl, SequenceInput};
use rand::rngs::StdRng;
use rayon::prelude::*;
use std::path::Path;

/// Tokens per KV-cache block.
pub const KV_BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled (it ends the sample's tokens).
    Stop,
    /// The token budget ran out.
    Length,
}

/// One generated sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub token_ids: Vec<u32>,
    /// Temperature-1 log-prob of each sampled token (the RL "old log-probs").
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Work counters, so reuse claims are measured rather than assumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// Prompt forwards run (one per prompt, however many samples).
    pub prefills: usize,
    pub prefill_tokens: usize,
    /// Images through the vision tower.
    pub images_encoded: usize,
    pub decode_steps: usize,
    pub decoded_tokens: usize,
}

/// The end-of-sequence ids of a checkpoint: `eos_token_id` of
/// generation_config.json (a number or a list), else of config.json.
pub fn eos_ids(dir: &Path) -> Vec<u32> {
    let read = |name: &str| -> Option<Vec<u32>> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let v = json
            .get("eos_token_id")
            .or_else(|| json.get("text_config")?.get("eos_token_id"))?;
        match v {
            serde_json::Value::Number(n) => Some(vec![n.as_u64()? as u32]),
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect(),
            ),
            _ => None,
        }
    };
    read("generation_config.json")
        .or_else(|| read("config.json"))
        .unwrap_or_default()
}

/// A sample still decoding.
/// A sample being generated (the CPU and the device generator share it).
pub(crate) struct Live {
    pub(crate) prompt_index: usize,
    pub(crate) sample_index: usize,
    pub(crate) cache: SeqCache,
    pub(crate) rope_delta: i64,
    pub(crate) rng: StdRng,
    pub(crate) tokens: Vec<u32>,
    pub(crate) logprobs: Vec<f32>,
}

/// Moves the samples of `live` that ended (an EOS token, or `max_new_tokens`
/// tokens) into `done`, handing their caches to `release`; returns the rest,
/// whose last token is the next to decode.
pub(crate) fn retire_finished(
    live: Vec<Live>,
    eos: &[u32],
    max_new_tokens: usize,
    done: &mut Vec<Sample>,
    mut release: impl FnMut(SeqCache),
) -> Vec<Live> {
    let mut still = Vec::with_capacity(live.len());
    for s in live {
        let last = *s.tokens.last().expect("every live sample has a token");
        let reason = if eos.contains(&last) {
            Some(FinishReason::Stop)
        } else if s.tokens.len() >= max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            Some(finish_reason) => {
                release(s.cache);
                done.push(Sample {
                    prompt_index: s.prompt_index,
                    sample_index: s.sample_index,
                    token_ids: s.tokens,
                    logprobs: s.logprobs,
                    finish_reason,
                });
            }
            None => still.push(s),
        }
    }
    still
}

/// Samples from `row` with the `banned` tokens removed (`row` is changed);
/// the log-prob is under the full distribution, as scoring the token gives it.
pub fn sample_allowed(
    row: &mut [f32],
    banned: &[u32],
    params: &SamplingParams,
    rng: &mut StdRng,
) -> (u32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    for &id in banned {
        if let Some(z) = row.get_mut(id as usize) {
            *z = f32::NEG_INFINITY;
        }
    }
    let (tok, _) = sample_token(row, params, rng);
    (tok, row[tok as usize] - lse)
}

pub struct Generator<'m> {
    pub model: &'m Qwen25Vl,
    pub eos: Vec<u32>,
    /// Never sampled: the image and video placeholders, which stand for
    /// vision embeddings and would make a response unreadable by the model.
    pub banned: Vec<u32>,
    pub stats: GenerationStats,
    cache: PagedKvCache,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Qwen25Vl, eos: Vec<u32>) -> Self {
        let t = &model.config.text;
        Self {
            model,
            eos,
            banned: vec![
                model.config.tokens.image_token_id,
                model.config.tokens.video_token_id,
            ],
            stats: GenerationStats::default(),
            cache: PagedKvCache::new(t.num_layers, t.num_kv_heads, t.head_dim, KV_BLOCK_SIZE),
        }
    }

    fn sample(&self, row: &mut [f32], params: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
        sample_allowed(row, &self.banned, params, rng)
    }

    /// KV-cache blocks still held (0 once every sample finished).
    pub fn cache_blocks_in_use(&self) -> usize {
        self.cache.blocks_in_use()
    }

    /// Generates `n` samples for each prompt; results are ordered by prompt,
    /// then sample. `seed` makes every sample reproducible on its own.
    pub fn generate(
        &mut self,
        prompts: &[SequenceInput],
        n: usize,
        params: &SamplingParams,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Sample>, ModelError> {
        let mut done: Vec<Sample> = Vec::new();
        let mut live: Vec<Live> = Vec::new();
        let vocab = self.model.config.text.vocab_size;
        for (pi, prompt) in prompts.iter().enumerate() {
            let (cache, logits, rope_delta) = self.prefill(prompt)?;
            for si in 0..n {
                let seq_cache = if si + 1 == n {
                    cache.clone()
                } else {
                    self.cache.fork(&cache)
                };
                let mut rng = sample_rng(seed, pi, si);
                // Each sample bans on its own copy: the row serves all n.
                let mut row = logits[..vocab].to_vec();
                let (tok, lp) = self.sample(&mut row, params, &mut rng);
                live.push(Live {
                    prompt_index: pi,
                    sample_index: si,
                    cache: seq_cache,
                    rope_delta,
                    rng,
                    tokens: vec![tok],
                    logprobs: vec![lp],
                });
            }
            if n == 0 {
                self.cache.release(cache);
            }
        }
        loop {
            // Retire finished samples; the rest leave their last token to decode.
            let cache = &mut self.cache;
            live = retire_finished(live, &self.eos, max_new_tokens, &mut done, |c| {
                cache.release(c)
            });
            if live.is_empty() {
                break;
            }
            let mut logits = self.decode(&mut live)?;
            // Top-p sorts the vocabulary: sample the live sequences in parallel.
            live.par_iter_mut()
                .zip(logits.par_chunks_mut(vocab))
                .for_each(|(s, row)| {
                    let (tok, lp) = self.sample(row, params, &mut s.rng);
                    s.tokens.push(tok);
                    s.logprobs.push(lp);
                });
        }
        done.sort_by_key(|s| (s.prompt_index, s.sample_index));
        Ok(done)
    }

    /// Runs the prompt once, filling a fresh cache sequence; returns it, the
    /// last position's logits and the M-RoPE delta for decoding.
    fn prefill(&mut self, prompt: &SequenceInput) -> Result<(SeqCache, Vec<f32>, i64), ModelError> {
        let mut seq = SeqCache::default();
        let slots: Vec<usize> = (0..prompt.ids.len())
            .map(|_| self.cache.push_slot(&mut seq))
            .collect();
        let slot_width = self.cache.slot;
        let cache = &mut self.cache;
        let mut sink = |layer: usize, k: &[f32], v: &[f32]| {
            for (i, &slot) in slots.iter().enumerate() {
                cache.write(
                    layer,
                    slot,
                    &k[i * slot_width..(i + 1) * slot_width],
                    &v[i * slot_width..(i + 1) * slot_width],
                );
            }
        };
        let packed = self.model.forward_packed_kv(
            std::slice::from_ref(prompt),
            Save::Nothing,
            Some(&mut sink),
        )?;
        let t = prompt.ids.len();
        let tc = &self.model.config.text;
        let logits = lm_head_rows(
            tc,
            &self.model.layout.text,
            &self.model.weights,
            &packed.hidden,
            &[t - 1],
        );
        self.stats.prefills += 1;
        self.stats.prefill_tokens += t;
        self.stats.images_encoded += prompt.grids.len();
        let rope_delta = packed.positions[0].rope_delta;
        Ok((seq, logits, rope_delta))
    }

    /// One decode step over every live sample; returns logits `[B, vocab]`.
    fn decode(&mut self, live: &mut [Live]) -> Result<Vec<f32>, ModelError> {
        let model = self.model;
        let tc = &model.config.text;
        let h = tc.hidden_size;
        let ids: Vec<u32> = live.iter().map(|s| *s.tokens.last().unwrap()).collect();
        let mut x = vec![0.0; ids.len() * h];
        embedding_fwd(&ids, model.weights.get(model.layout.text.embed), h, &mut x)?;
        // The new token's index is the number of cached tokens; text tokens
        // sit at index + rope_delta on all three M-RoPE streams.
        let positions: Vec<i32> = live
            .iter()
            .map(|s| (s.cache.len as i64 + s.rope_delta) as i32)
            .collect();
        let rope = RopeTable::text_1d(&positions, tc.head_dim, tc.rope_theta);
        let slots: Vec<usize> = live
            .iter_mut()
            .map(|s| self.cache.push_slot(&mut s.cache))
            .collect();
        let caches: Vec<SeqCache> = live.iter().map(|s| s.cache.clone()).collect();
        let hidden = decode_step(
            tc,
            &model.layout.text,
            &model.weights,
            x,
            &rope,
            &mut self.cache,
            &caches,
            &slots,
        );
        let rows: Vec<usize> = (0..live.len()).collect();
        self.stats.decode_steps += 1;
        self.stats.decoded_tokens += live.len();
        Ok(lm_head_rows(
            tc,
            &model.layout.text,
            &model.weights,
            &hidden,
            &rows,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn banned_tokens_are_never_sampled_and_log_probs_stay_unmasked() {
        let logits = [1.0f32, 3.0, 2.5, -1.0];
        let lse = logits.iter().map(|z| z.exp()).sum::<f32>().ln();
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        let (tok, lp) = sample_allowed(&mut logits.clone(), &[1], &greedy, &mut rng);
        assert_eq!(tok, 2, "the best allowed token");
        assert!((lp - (2.5 - lse)).abs() < 1e-6);
        let hot = SamplingParams {
            temperature: 5.0,
            top_p: 1.0,
            top_k: 0,
        };
        for _ in 0..200 {
            let (tok, _) = sample_allowed(&mut logits.clone(), &[1, 2], &hot, &mut rng);
            assert!(tok == 0 || tok == 3);
        }
    }
}
