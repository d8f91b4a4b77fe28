//! Batched generation on a CUDA device: the twin of [`Generator`] with the
//! forwards, the paged KV cache and the sampling on the device
//! ([`DeviceModel::prefill_sample`], [`DeviceModel::decode_sample`]).
//! The host keeps the block bookkeeping ([`PagedKvCache`] with no layers of
//! its own: tables, forks, free list), the per-sample RNG streams (one
//! uniform per row and step, drawn exactly as the CPU sampler draws it),
//! and the EOS / token-budget logic, so the same seed gives the same
//! samples on both backends up to fp32 rounding.
//!
//! [`Generator`]: super::generate::Generator

use super::generate::{retire_finished, GenerationStats, Live, Sample, KV_BLOCK_SIZE};
use super::kv_cache::{PagedKvCache, SeqCache};
use super::sampling::{sample_rng, SamplingParams};
use crate::backend::cpu::paged_attention::PagedSeq;
use crate::backend::cuda::flatten_block_tables;
use crate::model::device::{ArenaPlan, DeviceKvCache, DeviceModel, ForwardShape, HostPlan};
use crate::model::{ModelError, SequenceInput};
use rand::rngs::StdRng;
use rand::Rng;

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

/// The host inputs of one decode step over `seqs` (each after its new
/// token's slot was pushed): i32 cache slots of the new tokens, flattened
/// block tables `[B, stride]`, the stride and the lengths.
pub struct DecodeBatch {
    pub slots: Vec<i32>,
    pub tables: Vec<i32>,
    pub stride: usize,
    pub lens: Vec<i32>,
}

impl DecodeBatch {
    pub fn new(seqs: &[&SeqCache], slots: &[usize]) -> Self {
        let paged: Vec<PagedSeq> = seqs
            .iter()
            .map(|s| PagedSeq {
                block_table: &s.blocks,
                len: s.len,
            })
            .collect();
        let (tables, lens, stride) = flatten_block_tables(&paged);
        Self {
            slots: slots.iter().map(|&s| s as i32).collect(),
            tables,
            stride,
            lens,
        }
    }
}

/// A sample still decoding.
pub struct DeviceGenerator<'d> {
    pub model: &'d mut DeviceModel,
    pub eos: Vec<u32>,
    /// Never sampled (as `Generator::banned`): the image and video ids.
    pub banned: Vec<u32>,
    pub stats: GenerationStats,
    /// Host block bookkeeping; its blocks index the device cache.
    blocks: PagedKvCache,
}

impl<'d> DeviceGenerator<'d> {
    pub fn new(model: &'d mut DeviceModel, eos: Vec<u32>) -> Self {
        let cfg = model.config();
        let t = &cfg.text;
        let banned = vec![cfg.tokens.image_token_id, cfg.tokens.video_token_id];
        let blocks = PagedKvCache::new(0, t.num_kv_heads, t.head_dim, KV_BLOCK_SIZE);
        Self {
            model,
            eos,
            banned,
            stats: GenerationStats::default(),
            blocks,
        }
    }

    /// KV-cache blocks still held (0 once every sample finished).
    pub fn cache_blocks_in_use(&self) -> usize {
        self.blocks.blocks_in_use()
    }

    /// Same contract and results as `Generator::generate`.
    pub fn generate(
        &mut self,
        prompts: &[SequenceInput],
        n: usize,
        params: &SamplingParams,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Sample>, ModelError> {
        let bs = self.blocks.block_size;
        let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let batch = prompts.len() * n;
        let stride = (max_len + max_new_tokens).div_ceil(bs).max(1);
        let stream = self.model.backend().stream().clone();
        // One arena for every prefill and the widest decode step, sized now
        // so it is not regrown mid-generation.
        let cfg = self.model.config().clone();
        let mut need = ArenaPlan::new(
            &cfg,
            &ForwardShape {
                tokens: batch.max(1),
                response: batch.max(n),
                ..Default::default()
            },
        );
        for p in prompts {
            need = need.max(&ArenaPlan::new(&cfg, &HostPlan::new(&cfg, p, None)?.shape));
        }
        self.model.ensure_arena(&need)?;
        let mut kv = DeviceKvCache::new(
            &stream,
            self.model.config(),
            bs,
            kv_block_bound(&lens, n, max_new_tokens, bs),
            max_len.max(batch),
            batch * stride,
        )?;
        let mut done: Vec<Sample> = Vec::new();
        let mut live: Vec<Live> = Vec::new();
        for (pi, prompt) in prompts.iter().enumerate() {
            let mut seq = SeqCache::default();
            let slots: Vec<i32> = (0..prompt.ids.len())
                .map(|_| self.blocks.push_slot(&mut seq) as i32)
                .collect();
            let mut rngs: Vec<StdRng> = (0..n).map(|si| sample_rng(seed, pi, si)).collect();
            let uniforms: Vec<f32> = rngs.iter_mut().map(|r| draw_uniform(params, r)).collect();
            let (rope_delta, tokens, logprobs) = self.model.prefill_sample(
                &mut kv,
                prompt,
                &slots,
                n,
                &uniforms,
                params,
                &self.banned,
            )?;
            self.stats.prefills += 1;
            self.stats.prefill_tokens += prompt.ids.len();
            self.stats.images_encoded += prompt.grids.len();
            for (si, rng) in rngs.into_iter().enumerate() {
                let cache = if si + 1 == n {
                    seq.clone()
                } else {
                    let forked = self.blocks.fork(&seq);
                    if let (Some(&src), Some(&dst)) = (seq.blocks.last(), forked.blocks.last()) {
                        if src != dst {
                            kv.copy_block(&stream, src, dst)?;
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
        loop {
            let blocks = &mut self.blocks;
            live = retire_finished(live, &self.eos, max_new_tokens, &mut done, |c| {
                blocks.release(c)
            });
            if live.is_empty() {
                break;
            }
            let ids: Vec<u32> = live.iter().map(|s| *s.tokens.last().unwrap()).collect();
            // The new token sits at index len (before the push) + rope_delta.
            let positions: Vec<i32> = live
                .iter()
                .map(|s| (s.cache.len as i64 + s.rope_delta) as i32)
                .collect();
            let slots: Vec<usize> = live
                .iter_mut()
                .map(|s| self.blocks.push_slot(&mut s.cache))
                .collect();
            let seqs: Vec<&SeqCache> = live.iter().map(|s| &s.cache).collect();
            let batch = DecodeBatch::new(&seqs, &slots);
            let uniforms: Vec<f32> = live
                .iter_mut()
                .map(|s| draw_uniform(params, &mut s.rng))
                .collect();
            let (tokens, logprobs) = self.model.decode_sample(
                &mut kv,
                &ids,
                &positions,
                &batch.slots,
                &batch.tables,
                batch.stride,
                &batch.lens,
                &uniforms,
                params,
                &self.banned,
            )?;
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
    use crate::model::device::ban_indices;

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
        let mut c = PagedKvCache::new(0, 2, 4, bs);
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

    #[test]
    fn decode_batch_lays_out_tables_for_the_paged_kernel() {
        let mut c = PagedKvCache::new(0, 2, 4, 4);
        let (mut a, mut b) = (SeqCache::default(), SeqCache::default());
        (0..6).for_each(|_| {
            c.push_slot(&mut a);
        });
        (0..2).for_each(|_| {
            c.push_slot(&mut b);
        });
        let slots = [c.push_slot(&mut a), c.push_slot(&mut b)];
        // a: blocks 0, 1 (7 tokens); b: block 2 (3 tokens).
        assert_eq!(slots, [4 + 2, 2 * 4 + 2]);
        let batch = DecodeBatch::new(&[&a, &b], &slots);
        assert_eq!(batch.stride, 2);
        assert_eq!(batch.tables, vec![0, 1, 2, 0]);
        assert_eq!(batch.lens, vec![7, 3]);
        assert_eq!(batch.slots, vec![6, 10]);
    }

    #[test]
    fn fork_copies_the_partial_block_only() {
        let mut c = PagedKvCache::new(0, 2, 4, 4);
        let mut seq = SeqCache::default();
        (0..5).for_each(|_| {
            c.push_slot(&mut seq);
        });
        let f = c.fork(&seq);
        assert_eq!(f.blocks[0], seq.blocks[0]);
        assert_ne!(f.blocks.last(), seq.blocks.last());
        let mut full = SeqCache::default();
        (0..4).for_each(|_| {
            c.push_slot(&mut full);
        });
        let g = c.fork(&full);
        assert_eq!(g.blocks, full.blocks, "nothing to copy on a block boundary");
    }

    #[test]
    fn ban_indices_cover_every_row_and_skip_out_of_vocab_ids() {
        assert_eq!(ban_indices(2, 10, &[3, 12, 9]), vec![3, 9, 13, 19]);
        assert!(ban_indices(3, 10, &[]).is_empty());
    }
}
