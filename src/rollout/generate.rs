//! Batched generation: each prompt is prefilled once (its images through the
//! vision tower once), its n samples fork the prefill's KV cache, and all
//! live samples of all prompts decode together, one token per step, until
//! they sample an end-of-sequence id or reach the token budget.

use super::kv_cache::{PagedKvCache, SeqCache};
use super::sampling::{sample_rng, SamplingParams};
use crate::backend::desc::RopeFreqs;
use crate::model::acts::Save;
use crate::model::engine::Engine;
use crate::model::kv_cache::{DecodeBatch, KvStore};
use crate::model::plan::HostPlan;
use crate::model::text::KvSink;
use crate::model::{ModelError, SequenceInput};
use crate::ops::Backend;
use rand::rngs::StdRng;
use rand::Rng;
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

/// A sample being generated.
struct Live {
    prompt_index: usize,
    sample_index: usize,
    cache: SeqCache,
    rope_delta: i64,
    rng: StdRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

/// Moves the samples of `live` that ended (an EOS token, or `max_new_tokens`
/// tokens) into `done`, handing their caches to `release`; returns the rest,
/// whose last token is the next to decode.
fn retire_finished(
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

/// The uniform the sampler consumes for one row: one draw when sampling
/// (temperature > 0), none for greedy, as `sampling::sample_token` does.
pub fn draw_uniform(params: &SamplingParams, rng: &mut StdRng) -> f32 {
    if params.temperature > 0.0 {
        rng.random::<f32>()
    } else {
        0.0
    }
}

/// Blocks of `block_size` tokens that a generate call can hold at once:
/// every prompt's prefill plus, for each of its `n` samples, a whole
/// sequence of prompt + `max_new_tokens` tokens (a fork's copied partial
/// block included). All prompts are prefilled before decoding starts.
pub fn kv_block_bound(
    prompt_lens: &[usize],
    n: usize,
    max_new_tokens: usize,
    block_size: usize,
) -> usize {
    prompt_lens
        .iter()
        .map(|&t| t.div_ceil(block_size) + n * (t + max_new_tokens).div_ceil(block_size))
        .sum()
}

/// Generation on the model of one backend (the CPU, or a GPU where the
/// cache, the forward and the sampling kernel run on the device).
pub struct Generator<'e, B: Backend> {
    pub engine: &'e Engine<B>,
    pub eos: Vec<u32>,
    /// Never sampled: the image and video placeholders, which stand for
    /// vision embeddings and would make a response unreadable by the model.
    pub banned: Vec<u32>,
    pub stats: GenerationStats,
    /// Which blocks each sequence owns; the numbers live in a [`KvStore`].
    blocks: PagedKvCache,
}

impl<'e, B: Backend> Generator<'e, B> {
    pub fn new(engine: &'e Engine<B>, eos: Vec<u32>) -> Self {
        let cfg = engine.config();
        Self {
            engine,
            eos,
            banned: vec![cfg.tokens.image_token_id, cfg.tokens.video_token_id],
            stats: GenerationStats::default(),
            blocks: PagedKvCache::new(KV_BLOCK_SIZE),
        }
    }

    /// KV-cache blocks still held (0 once every sample finished).
    pub fn cache_blocks_in_use(&self) -> usize {
        self.blocks.blocks_in_use()
    }

    /// Generates `n` samples for each prompt; results are ordered by prompt,
    /// then sample. `seed` makes every sample reproducible on its own: the
    /// same tokens whatever else shares the batch, on every backend.
    pub fn generate(
        &mut self,
        prompts: &[SequenceInput],
        n: usize,
        params: &SamplingParams,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Sample>, ModelError> {
        let engine = self.engine;
        let be = &engine.be;
        let cfg = engine.config();
        let (h, vocab) = (cfg.text.hidden_size, cfg.text.vocab_size);
        let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        let bound = kv_block_bound(&lens, n, max_new_tokens, KV_BLOCK_SIZE);
        let mut store = KvStore::new(be, cfg, KV_BLOCK_SIZE, bound, engine.precision.dtype())?;
        let graph = engine.graph();
        let mut done: Vec<Sample> = Vec::new();
        let mut live: Vec<Live> = Vec::new();
        for (pi, prompt) in prompts.iter().enumerate() {
            let t = prompt.ids.len();
            if t == 0 {
                return Err(ModelError::NoResponse {
                    seq: pi,
                    prompt_len: 0,
                    len: 0,
                });
            }
            let plan = HostPlan::new(cfg, prompt, None)?;
            let mut seq = SeqCache::default();
            let slots: Vec<i32> = (0..t)
                .map(|_| self.blocks.push_slot(&mut seq) as i32)
                .collect();
            let slots = be.index(&slots)?;
            let pixels = match plan.vision {
                Some(_) => Some(be.upload(&prompt.pixel_values)?),
                None => None,
            };
            let sink = KvSink {
                store: &mut store,
                slots: &slots,
            };
            let fwd = graph.forward(&plan, &prompt.ids, pixels, Save::Nothing, Some(sink))?;
            self.stats.prefills += 1;
            self.stats.prefill_tokens += t;
            self.stats.images_encoded += prompt.grids.len();
            let mut rngs: Vec<StdRng> = (0..n).map(|si| sample_rng(seed, pi, si)).collect();
            let uniforms: Vec<f32> = rngs.iter_mut().map(|r| draw_uniform(params, r)).collect();
            // The last position's logits, once per sample.
            let last = be.gather_rows(&fwd.hidden, &be.index(&vec![(t - 1) as i32; n])?, h)?;
            let logits = graph.lm_head(&last)?;
            let (tokens, logprobs) = be.sample(&logits, vocab, params, &self.banned, &uniforms)?;
            let rope_delta = plan.positions[0].rope_delta;
            for (si, rng) in rngs.into_iter().enumerate() {
                let cache = if si + 1 == n {
                    seq.clone()
                } else {
                    let forked = self.blocks.fork(&seq);
                    if let (Some(&src), Some(&dst)) = (seq.blocks.last(), forked.blocks.last()) {
                        if src != dst {
                            store.copy_block(be, src, dst)?;
                        }
                    }
                    forked
                };
                live.push(Live {
                    prompt_index: pi,
                    sample_index: si,
                    cache,
                    rope_delta,
                    rng,
                    tokens: vec![tokens[si]],
                    logprobs: vec![logprobs[si]],
                });
            }
            if n == 0 {
                self.blocks.release(seq);
            }
        }
        let freqs = RopeFreqs::text_1d(cfg.text.head_dim, cfg.text.rope_theta);
        loop {
            let blocks = &mut self.blocks;
            live = retire_finished(live, &self.eos, max_new_tokens, &mut done, |c| {
                blocks.release(c)
            });
            if live.is_empty() {
                break;
            }
            let ids: Vec<u32> = live.iter().map(|s| *s.tokens.last().unwrap()).collect();
            // The new token's index is the number of cached tokens; text
            // tokens sit at index + rope_delta on all three M-RoPE streams.
            let positions: Vec<i32> = live
                .iter()
                .map(|s| (s.cache.len as i64 + s.rope_delta) as i32)
                .collect();
            let slots: Vec<usize> = live
                .iter_mut()
                .map(|s| self.blocks.push_slot(&mut s.cache))
                .collect();
            let seqs: Vec<(&[usize], usize)> = live
                .iter()
                .map(|s| (s.cache.blocks.as_slice(), s.cache.len))
                .collect();
            let batch = DecodeBatch::new(be, &seqs, &slots)?;
            let x = be.embedding_fwd(&be.ids(&ids)?, graph.w(engine.layout.text.embed), h)?;
            let rope = be.rope(&freqs, &[&positions])?;
            let hidden = graph.decode_step(x, &rope, &mut store, &batch)?;
            let logits = graph.lm_head(&hidden)?;
            let uniforms: Vec<f32> = live
                .iter_mut()
                .map(|s| draw_uniform(params, &mut s.rng))
                .collect();
            let (tokens, logprobs) = be.sample(&logits, vocab, params, &self.banned, &uniforms)?;
            self.stats.decode_steps += 1;
            self.stats.decoded_tokens += live.len();
            for ((s, t), lp) in live.iter_mut().zip(tokens).zip(logprobs) {
                s.tokens.push(t);
                s.logprobs.push(lp);
            }
        }
        done.sort_by_key(|s| (s.prompt_index, s.sample_index));
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::sample_row;
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
        let u = draw_uniform(&greedy, &mut rng);
        let (tok, lp) = sample_row(&logits, &greedy, &[1], u);
        assert_eq!(tok, 2, "the best allowed token");
        assert!((lp - (2.5 - lse)).abs() < 1e-6);
        let hot = SamplingParams {
            temperature: 5.0,
            top_p: 1.0,
            top_k: 0,
        };
        for _ in 0..200 {
            let u = draw_uniform(&hot, &mut rng);
            let (tok, _) = sample_row(&logits, &hot, &[1, 2], u);
            assert!(tok == 0 || tok == 3);
        }
    }

    #[test]
    fn uniforms_follow_the_cpu_sampler_draws() {
        let hot = SamplingParams::default();
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let (mut a, mut b) = (sample_rng(3, 1, 0), sample_rng(3, 1, 0));
        assert_eq!(draw_uniform(&greedy, &mut a), 0.0);
        // Greedy draws nothing: both streams are still in step.
        assert_eq!(draw_uniform(&hot, &mut a), b.random::<f32>());
    }

    #[test]
    fn block_bound_covers_prefill_forks_and_growth() {
        // 20 prompt tokens (2 blocks of 16); 3 samples of up to 20 + 13.
        assert_eq!(kv_block_bound(&[20], 3, 13, 16), 2 + 3 * 3);
        assert_eq!(kv_block_bound(&[16, 1], 1, 1, 16), (1 + 2) + (1 + 1));
        // Simulate the generator's worst case and check the bound holds.
        let (t, n, max_new, bs) = (21usize, 3usize, 30usize, 16usize);
        let mut c = PagedKvCache::new(bs);
        let mut seq = SeqCache::default();
        (0..t).for_each(|_| {
            c.push_slot(&mut seq);
        });
        let mut seqs: Vec<SeqCache> = (0..n - 1).map(|_| c.fork(&seq)).collect();
        seqs.push(seq);
        for _ in 0..max_new - 1 {
            for s in &mut seqs {
                c.push_slot(s);
            }
        }
        assert!(c.blocks_in_use() <= kv_block_bound(&[t], n, max_new, bs));
        let top = seqs.iter().flat_map(|s| s.blocks.iter()).max().unwrap();
        assert!(*top < kv_block_bound(&[t], n, max_new, bs));
    }
}
