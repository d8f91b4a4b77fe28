//! Generation with continuous batching: the [`Scheduler`] keeps up to
//! `max_num_seqs` sequences in the batch; each model step runs one row per
//! decoding sample plus chunks of prompts being prefilled (their images
//! through the vision tower once), all in one forward over the paged KV
//! cache. A prompt's n samples fork its prefill; a finished sample's seat
//! goes to the next sample or prompt at the next step. Every sample draws
//! from its own stream, so `(seed, prompt, sample)` fixes its tokens
//! whatever shares the batch, the schedule, or preemptions.

use super::decode_graph::{row_bucket, DecodeGraphs, DecodeMode, DecodeRow};
use super::kv_cache::PagedKvCache;
use super::sampling::{sample_rng, SamplingParams};
use super::scheduler::{Chunk, Fill, ScheduleConfig, Scheduler, SeqKey, Step};
use crate::backend::desc::RopeFreqs;
use crate::model::acts::Save;
use crate::model::engine::Engine;
use crate::model::graph::Graph;
use crate::model::kv_cache::{DecodeBatch, KvStore};
use crate::model::plan::HostPlan;
use crate::model::vision::VisionInputs;
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
    /// Prompts prefilled (one prefill per prompt, however many samples),
    /// and their tokens (a prefill redone after preemption counts again).
    pub prefills: usize,
    pub prefill_tokens: usize,
    /// Images through the vision tower.
    pub images_encoded: usize,
    /// Model steps with decode rows, and those rows.
    pub decode_steps: usize,
    pub decoded_tokens: usize,
    /// Sequences that gave their cache blocks back, and the tokens
    /// prefilled again to restore them.
    pub preemptions: usize,
    pub recomputed_tokens: usize,
    /// Decode steps padded to a row bucket ([`DecodeMode::Graphs`]), the
    /// graphs captured for them, and the steps replayed from one.
    pub bucketed_steps: usize,
    pub graphs_captured: usize,
    pub graph_replays: usize,
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

/// How many KV-cache blocks a generate call gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    /// Enough that nothing is ever preempted: every prompt and every
    /// sample whole at once ([`kv_block_bound`]).
    Unbounded,
    /// A fixed number of blocks (the CPU's budget; tests force preemption).
    Blocks(usize),
    /// This fraction of the device's free memory (vLLM's
    /// `gpu_memory_utilization`, of what is free after the weights); on a
    /// backend with no device memory to ask, [`KvBudget::Unbounded`].
    MemoryFraction(f64),
}

/// The batch and cache limits of a generator (the `max_num_seqs`,
/// `max_num_batched_tokens` and KV-cache settings of the train config and
/// of `generate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutLimits {
    pub schedule: ScheduleConfig,
    pub kv_budget: KvBudget,
    /// Never capture decode steps (vLLM's `enforce_eager`): every step's
    /// ops launch one by one, for debugging and profiling.
    pub enforce_eager: bool,
}

impl Default for RolloutLimits {
    fn default() -> Self {
        Self {
            schedule: ScheduleConfig::default(),
            kv_budget: KvBudget::Unbounded,
            enforce_eager: false,
        }
    }
}

impl RolloutLimits {
    /// From the settings' values: a block count when non-zero, else a
    /// memory fraction when non-zero, else a cache for the whole batch.
    pub fn new(
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        kv_cache_blocks: usize,
        kv_cache_memory_fraction: f64,
    ) -> Self {
        let kv_budget = if kv_cache_blocks > 0 {
            KvBudget::Blocks(kv_cache_blocks)
        } else if kv_cache_memory_fraction > 0.0 {
            KvBudget::MemoryFraction(kv_cache_memory_fraction)
        } else {
            KvBudget::Unbounded
        };
        Self {
            schedule: ScheduleConfig {
                max_num_seqs,
                max_num_batched_tokens,
            },
            kv_budget,
            enforce_eager: false,
        }
    }

    /// The same limits, with decode steps never captured when `eager`.
    pub fn eager(mut self, eager: bool) -> Self {
        self.enforce_eager = eager;
        self
    }
}

/// One model step of the last generate call, for tests and benches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepTrace {
    pub decode_rows: usize,
    /// `(prompt, start, end)` of each prefill chunk (a recomputation too).
    pub chunks: Vec<(usize, usize, usize)>,
    pub spawns: usize,
    pub preempted: usize,
    /// Cached tokens the step's sequences attend to (each decode row's
    /// length, each chunk's end): the KV traffic of an ideal kernel.
    pub context_tokens: usize,
}

/// A sample being generated.
struct Live {
    rng: StdRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

/// A prompt's host plan and, while a prefill of it is queued or running,
/// its input embeddings (images merged in).
struct PromptRows<B: Backend> {
    plan: HostPlan,
    embeds: Option<B::Buf>,
    /// Prompt tokens prefilled so far (a preempted prefill starts over).
    prefilled: usize,
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
/// block included). A cache this large never preempts.
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

/// Blocks one sequence can need on its own: its longest cache plus the
/// prompt's partial block it forked from.
pub fn kv_blocks_per_sequence(
    prompt_lens: &[usize],
    n: usize,
    max_new_tokens: usize,
    block_size: usize,
) -> usize {
    let longest = prompt_lens.iter().copied().max().unwrap_or(0);
    (longest + max_new_tokens).div_ceil(block_size) + usize::from(n > 1)
}

/// The decoder's input rows of a prompt: token embeddings with the vision
/// tower's output in the image rows.
fn prompt_embeddings<B: Backend>(
    graph: &Graph<'_, B>,
    plan: &HostPlan,
    prompt: &SequenceInput,
) -> Result<B::Buf, ModelError> {
    let be = graph.be;
    let h = graph.cfg.text.hidden_size;
    let mut x = be.embedding_fwd(&be.ids(&prompt.ids)?, graph.w(graph.layout.text.embed), h)?;
    if let Some(vision) = &plan.vision {
        let inputs = VisionInputs::upload(graph, vision)?;
        let pixels = be.upload(&prompt.pixel_values)?;
        let (embeds, _) = graph.vision_fwd(&pixels, &inputs, Save::Nothing)?;
        be.scatter_rows(&embeds, &be.index(&plan.image_rows)?, h, &mut x)?;
    }
    Ok(x)
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
    pub schedule: ScheduleConfig,
    pub kv_budget: KvBudget,
    /// The steps of the last generate call.
    pub trace: Vec<StepTrace>,
    /// KV-cache blocks of the last call, and those still held at its end.
    pub kv_blocks: usize,
    blocks_left: usize,
    /// The global index of the first prompt passed to `generate`: a rank
    /// generating its share of a batch draws the same samples as one
    /// process generating the whole batch.
    pub first_prompt: usize,
    /// How decode-only steps run: [`DecodeMode::Graphs`] where the backend
    /// captures graphs, unless the limits enforce eager steps.
    pub decode_mode: DecodeMode,
}

impl<'e, B: Backend> Generator<'e, B> {
    pub fn new(engine: &'e Engine<B>, eos: Vec<u32>) -> Self {
        let cfg = engine.config();
        Self {
            engine,
            eos,
            banned: vec![cfg.tokens.image_token_id, cfg.tokens.video_token_id],
            stats: GenerationStats::default(),
            schedule: ScheduleConfig::default(),
            kv_budget: KvBudget::Unbounded,
            trace: Vec::new(),
            kv_blocks: 0,
            blocks_left: 0,
            first_prompt: 0,
            decode_mode: if engine.be.captures() {
                DecodeMode::Graphs
            } else {
                DecodeMode::Eager
            },
        }
    }

    /// The same generator with these batch and cache limits.
    pub fn with_limits(mut self, limits: RolloutLimits) -> Self {
        self.schedule = limits.schedule;
        self.kv_budget = limits.kv_budget;
        if limits.enforce_eager {
            self.decode_mode = DecodeMode::Eager;
        }
        self
    }

    /// KV-cache blocks still held (0 once every sample finished).
    pub fn cache_blocks_in_use(&self) -> usize {
        self.blocks_left
    }

    /// The cache's blocks for a call whose whole working set is `bound`.
    fn kv_capacity(&self, bound: usize) -> usize {
        match self.kv_budget {
            KvBudget::Unbounded => bound,
            KvBudget::Blocks(b) => b.min(bound),
            KvBudget::MemoryFraction(f) => match self.engine.be.free_memory() {
                Some(free) => {
                    let block = KvStore::<B>::block_bytes(
                        self.engine.config(),
                        KV_BLOCK_SIZE,
                        self.engine.precision.dtype(),
                    );
                    ((free as f64 * f) as usize / block).min(bound)
                }
                None => bound,
            },
        }
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
        let caps = vec![max_new_tokens; prompts.len() * n];
        self.generate_capped(prompts, n, params, &caps, seed)
    }

    /// [`Self::generate`] with a token budget per sample: sample `s` of
    /// prompt `p` stops after `caps[p * n + s]` tokens (the rollout bench
    /// fixes lengths this way, end-of-sequence ids aside).
    pub fn generate_capped(
        &mut self,
        prompts: &[SequenceInput],
        n: usize,
        params: &SamplingParams,
        caps: &[usize],
        seed: u64,
    ) -> Result<Vec<Sample>, ModelError> {
        assert_eq!(caps.len(), prompts.len() * n, "one cap per sample");
        let max_new_tokens = caps.iter().copied().max().unwrap_or(1).max(1);
        let engine = self.engine;
        let cfg = engine.config();
        if let Some(pi) = prompts.iter().position(|p| p.ids.is_empty()) {
            return Err(ModelError::NoResponse {
                seq: pi,
                prompt_len: 0,
                len: 0,
            });
        }
        let ScheduleConfig {
            max_num_seqs: seqs,
            max_num_batched_tokens: tokens,
        } = self.schedule;
        if seqs == 0 || tokens < seqs {
            return Err(ModelError::ScheduleLimits { seqs, tokens });
        }
        self.trace.clear();
        let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        let bound = kv_block_bound(&lens, n, max_new_tokens, KV_BLOCK_SIZE);
        let capacity = self.kv_capacity(bound);
        let need = kv_blocks_per_sequence(&lens, n, max_new_tokens, KV_BLOCK_SIZE);
        if capacity < need.min(bound) {
            return Err(ModelError::KvCacheTooSmall {
                need,
                have: capacity,
                block_size: KV_BLOCK_SIZE,
            });
        }
        self.kv_blocks = capacity;
        let graph = engine.graph();
        // Captured decode steps pad their rows into one more block, which
        // the scheduler never hands out.
        let bucketed = self.decode_mode == DecodeMode::Graphs && !graph.gathers_units();
        let mut store = KvStore::new(
            &engine.be,
            cfg,
            KV_BLOCK_SIZE,
            capacity + usize::from(bucketed),
            engine.precision.dtype(),
        )?;
        let mut graphs = bucketed.then(|| DecodeGraphs::new(&graph, need, KV_BLOCK_SIZE, capacity));
        let mut sched = Scheduler::new(
            self.schedule,
            PagedKvCache::new(KV_BLOCK_SIZE, capacity),
            &lens,
        );
        let mut rows: Vec<PromptRows<B>> = prompts
            .iter()
            .map(|p| {
                Ok(PromptRows {
                    plan: HostPlan::new(cfg, p, None)?,
                    embeds: None,
                    prefilled: 0,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let mut live: Vec<Option<Live>> = (0..prompts.len() * n).map(|_| None).collect();
        let mut done: Vec<Sample> = Vec::new();
        let run = StepRun {
            graph,
            prompts,
            n,
            params,
            caps,
            seed,
            first_prompt: self.first_prompt,
            eos: &self.eos,
            banned: &self.banned,
        };
        loop {
            let step = match sched.schedule() {
                Ok(Some(step)) => step,
                Ok(None) => break,
                Err(e) => {
                    return Err(ModelError::KvCacheTooSmall {
                        need,
                        have: e.capacity,
                        block_size: KV_BLOCK_SIZE,
                    })
                }
            };
            run.step(
                &step,
                &mut store,
                graphs.as_mut(),
                &mut rows,
                &mut live,
                &mut sched,
                &mut done,
                &mut self.stats,
            )?;
            for (p, r) in rows.iter_mut().enumerate() {
                if r.embeds.is_some() && !sched.fills_prompt(p) {
                    r.embeds = None;
                }
            }
            self.trace.push(StepTrace {
                decode_rows: step.decodes.len(),
                chunks: step
                    .chunks
                    .iter()
                    .map(|c| (c.prompt, c.start, c.end))
                    .collect(),
                spawns: step.spawns.len(),
                preempted: step.preempted.len(),
                context_tokens: step.decodes.iter().map(|d| d.len).sum::<usize>()
                    + step.chunks.iter().map(|c| c.end).sum::<usize>(),
            });
        }
        if let Some(g) = graphs.take() {
            self.stats.bucketed_steps += g.steps;
            self.stats.graphs_captured += g.captured;
            self.stats.graph_replays += g.replays;
            let captured = g.captured > 0;
            drop(g);
            if captured {
                engine.be.release_graph_memory()?;
            }
        }
        self.blocks_left = sched.blocks.blocks_in_use();
        done.sort_by_key(|s| (s.prompt_index, s.sample_index));
        Ok(done)
    }
}

/// What every step of one generate call shares.
struct StepRun<'a, B: Backend> {
    graph: Graph<'a, B>,
    prompts: &'a [SequenceInput],
    n: usize,
    params: &'a SamplingParams,
    caps: &'a [usize],
    seed: u64,
    first_prompt: usize,
    eos: &'a [u32],
    banned: &'a [u32],
}

impl<B: Backend> StepRun<'_, B> {
    /// Why sample `key` ends after its last token, if it does.
    fn finish_reason(&self, key: SeqKey, s: &Live) -> Option<FinishReason> {
        let last = *s.tokens.last().expect("every live sample has a token");
        if self.eos.contains(&last) {
            Some(FinishReason::Stop)
        } else if s.tokens.len() >= self.caps[key.prompt * self.n + key.sample] {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// The input embedding rows of a chunk: the prompt's own rows (images
    /// merged), then for a resumed sample its generated tokens.
    fn chunk_inputs(
        &self,
        chunk: &Chunk,
        rows: &mut PromptRows<B>,
        live: &[Option<Live>],
        stats: &mut GenerationStats,
    ) -> Result<Vec<B::Buf>, ModelError> {
        let be = self.graph.be;
        let h = self.graph.cfg.text.hidden_size;
        let prompt = &self.prompts[chunk.prompt];
        let t = prompt.ids.len();
        let mut parts = Vec::new();
        if chunk.start < t {
            if rows.embeds.is_none() {
                rows.embeds = Some(prompt_embeddings(&self.graph, &rows.plan, prompt)?);
                stats.images_encoded += prompt.grids.len();
            }
            let embeds = rows.embeds.as_ref().expect("just computed");
            let span: Vec<i32> = (chunk.start..chunk.end.min(t)).map(|r| r as i32).collect();
            parts.push(be.gather_rows(embeds, &be.index(&span)?, h)?);
        }
        if chunk.end > t {
            let Fill::Resume { sample } = chunk.fill else {
                unreachable!("only a resumed sample prefills past its prompt")
            };
            let s = live[chunk.prompt * self.n + sample]
                .as_ref()
                .expect("a resumed sample is live");
            let ids = &s.tokens[chunk.start.max(t) - t..chunk.end - t];
            parts.push(be.embedding_fwd(
                &be.ids(ids)?,
                self.graph.w(self.graph.layout.text.embed),
                h,
            )?);
        }
        Ok(parts)
    }

    /// Runs one scheduled step: block copies, the forward of every row,
    /// sampling for decode rows and completed prompts, and the bookkeeping
    /// of finished samples. A step of decode rows only goes through
    /// `graphs` when there are any.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        step: &Step,
        store: &mut KvStore<B>,
        graphs: Option<&mut DecodeGraphs<B>>,
        rows: &mut [PromptRows<B>],
        live: &mut [Option<Live>],
        sched: &mut Scheduler,
        done: &mut Vec<Sample>,
        stats: &mut GenerationStats,
    ) -> Result<(), ModelError> {
        let be = self.graph.be;
        for sp in &step.spawns {
            if let Some((src, dst)) = sp.copy {
                store.copy_block(be, src, dst)?;
            }
        }
        stats.decode_steps += usize::from(!step.decodes.is_empty());
        stats.decoded_tokens += step.decodes.len();
        stats.preemptions += step.preempted.len();
        let sampled = match graphs {
            Some(graphs) if step.chunks.is_empty() && !step.decodes.is_empty() => {
                self.decode_bucketed(step, store, graphs, rows, live)?
            }
            _ => match self.forward_and_sample(step, store, rows, live, stats)? {
                Some(sampled) => sampled,
                None => return Ok(()),
            },
        };
        self.record(step, sampled, live, sched, done, stats);
        Ok(())
    }

    /// The sampling uniform of every decode row, from its sample's stream.
    fn decode_uniforms(&self, step: &Step, live: &mut [Option<Live>]) -> Vec<f32> {
        step.decodes
            .iter()
            .map(|d| {
                let s = live[d.key.prompt * self.n + d.key.sample]
                    .as_mut()
                    .expect("decoding samples are live");
                draw_uniform(self.params, &mut s.rng)
            })
            .collect()
    }

    /// The last token of decode row `d`'s sample.
    fn last_token(&self, key: SeqKey, live: &[Option<Live>]) -> u32 {
        let s = live[key.prompt * self.n + key.sample]
            .as_ref()
            .expect("decoding samples are live");
        *s.tokens.last().expect("a sample has its first token")
    }

    /// A step of decode rows only, padded to its row bucket and replayed
    /// from the bucket's graph (or run on its buffers where nothing is
    /// captured); the padding rows' samples are dropped.
    fn decode_bucketed(
        &self,
        step: &Step,
        store: &mut KvStore<B>,
        graphs: &mut DecodeGraphs<B>,
        rows: &[PromptRows<B>],
        live: &mut [Option<Live>],
    ) -> Result<Sampled, ModelError> {
        let decode_rows: Vec<DecodeRow<'_>> = step
            .decodes
            .iter()
            .map(|d| DecodeRow {
                token: self.last_token(d.key, live),
                position: self.decode_position(rows, d.key, d.len),
                table: &d.table,
                len: d.len,
                slot: d.slot,
            })
            .collect();
        let hidden = graphs.run(&self.graph, store, &decode_rows)?;
        let logits = self.graph.lm_head(hidden)?;
        let mut uniforms = self.decode_uniforms(step, live);
        uniforms.resize(row_bucket(decode_rows.len()), 0.0);
        let vocab = self.graph.cfg.text.vocab_size;
        let (mut tokens, mut logprobs) =
            self.graph
                .be
                .sample(&logits, vocab, self.params, self.banned, &uniforms)?;
        tokens.truncate(decode_rows.len());
        logprobs.truncate(decode_rows.len());
        Ok(Sampled {
            tokens,
            logprobs,
            completed: Vec::new(),
            fresh: Vec::new(),
        })
    }

    /// Where a decode row's token sits: index + rope_delta on all three
    /// streams, as every text token after the prompt.
    fn decode_position(&self, rows: &[PromptRows<B>], key: SeqKey, len: usize) -> i32 {
        let delta = rows[key.prompt].plan.positions[0].rope_delta;
        (len as i64 - 1 + delta) as i32
    }

    /// Any step at its own row count, op by op: the forward of every decode
    /// row and prefill chunk, then sampling for the decode rows and for
    /// each completed prompt's samples; `None` when no row samples.
    fn forward_and_sample(
        &self,
        step: &Step,
        store: &mut KvStore<B>,
        rows: &mut [PromptRows<B>],
        live: &mut [Option<Live>],
        stats: &mut GenerationStats,
    ) -> Result<Option<Sampled>, ModelError> {
        let (graph, be, n) = (&self.graph, self.graph.be, self.n);
        let tc = &graph.cfg.text;
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        // Inputs, positions and attention spans of every row: decode rows,
        // then each chunk's rows.
        let mut parts: Vec<B::Buf> = Vec::new();
        let mut streams: [Vec<i32>; 3] = Default::default();
        let mut spans: Vec<(&[usize], usize)> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        if !step.decodes.is_empty() {
            let ids: Vec<u32> = step
                .decodes
                .iter()
                .map(|d| self.last_token(d.key, live))
                .collect();
            parts.push(be.embedding_fwd(&be.ids(&ids)?, graph.w(graph.layout.text.embed), h)?);
            for d in &step.decodes {
                let pos = self.decode_position(rows, d.key, d.len);
                streams.iter_mut().for_each(|s| s.push(pos));
                spans.push((&d.table, d.len));
                slots.push(d.slot);
            }
        }
        for c in &step.chunks {
            parts.extend(self.chunk_inputs(c, &mut rows[c.prompt], live, stats)?);
            let plan = &rows[c.prompt].plan;
            let t = plan.shape.tokens;
            let delta = plan.positions[0].rope_delta;
            for i in c.start..c.end {
                for (k, s) in streams.iter_mut().enumerate() {
                    s.push(if i < t {
                        plan.text_positions[k * t + i]
                    } else {
                        (i as i64 + delta) as i32
                    });
                }
                spans.push((&c.table, i + 1));
            }
            slots.extend(&c.slots);
            // A prompt's tokens count once; what preemption made us redo
            // counts as recomputed.
            let first = match c.fill {
                Fill::Prompt => {
                    let mark = &mut rows[c.prompt].prefilled;
                    let fresh = c.end.saturating_sub((*mark).max(c.start));
                    *mark = (*mark).max(c.end);
                    fresh
                }
                _ => 0,
            };
            stats.prefill_tokens += first;
            stats.recomputed_tokens += c.end - c.start - first;
        }
        let x = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            be.concat(&parts.iter().collect::<Vec<_>>())?
        };
        drop(parts);
        let freqs = RopeFreqs::mrope(tc.mrope_section, tc.head_dim, tc.rope_theta);
        let rope = be.rope(&freqs, &[&streams[0], &streams[1], &streams[2]])?;
        let batch = DecodeBatch::new(be, &spans, &slots)?;
        let hidden = graph.decode_step(x, &rope, store, &batch)?;
        // Rows that sample: every decode row, and the last row of each
        // completed prompt once per sample.
        let mut picked: Vec<i32> = (0..step.decodes.len() as i32).collect();
        let mut completed: Vec<usize> = Vec::new();
        let mut row = step.decodes.len();
        for c in &step.chunks {
            row += c.end - c.start;
            if c.completes && c.fill == Fill::Prompt {
                picked.extend(std::iter::repeat_n(row as i32 - 1, n));
                completed.push(c.prompt);
            }
        }
        if picked.is_empty() {
            return Ok(None);
        }
        let hidden =
            if picked.len() == row && picked.iter().enumerate().all(|(i, &r)| r == i as i32) {
                hidden
            } else {
                be.gather_rows(&hidden, &be.index(&picked)?, h)?
            };
        let logits = graph.lm_head(&hidden)?;
        let mut uniforms = self.decode_uniforms(step, live);
        let mut fresh: Vec<Vec<StdRng>> = Vec::new();
        for &p in &completed {
            let mut rngs: Vec<StdRng> = (0..n)
                .map(|s| sample_rng(self.seed, self.first_prompt + p, s))
                .collect();
            uniforms.extend(rngs.iter_mut().map(|r| draw_uniform(self.params, r)));
            fresh.push(rngs);
        }
        let (tokens, logprobs) = be.sample(&logits, vocab, self.params, self.banned, &uniforms)?;
        Ok(Some(Sampled {
            tokens,
            logprobs,
            completed,
            fresh,
        }))
    }

    /// Appends each decode row's token to its sample and starts each
    /// completed prompt's samples; finished samples leave the batch.
    fn record(
        &self,
        step: &Step,
        sampled: Sampled,
        live: &mut [Option<Live>],
        sched: &mut Scheduler,
        done: &mut Vec<Sample>,
        stats: &mut GenerationStats,
    ) {
        let n = self.n;
        let slot_of = |k: SeqKey| k.prompt * n + k.sample;
        let mut out = sampled.tokens.into_iter().zip(sampled.logprobs);
        for d in &step.decodes {
            let (t, lp) = out.next().expect("one token per row");
            let at = slot_of(d.key);
            let s = live[at].as_mut().expect("decoding samples are live");
            s.tokens.push(t);
            s.logprobs.push(lp);
            if let Some(reason) = self.finish_reason(d.key, s) {
                sched.finish(d.key);
                done.push(retire(live[at].take().expect("live"), d.key, reason));
            }
        }
        for (&p, rngs) in sampled.completed.iter().zip(sampled.fresh) {
            stats.prefills += 1;
            let mut go_on = Vec::new();
            for (si, rng) in rngs.into_iter().enumerate() {
                let (t, lp) = out.next().expect("one token per sample");
                let s = Live {
                    rng,
                    tokens: vec![t],
                    logprobs: vec![lp],
                };
                let key = SeqKey {
                    prompt: p,
                    sample: si,
                };
                match self.finish_reason(key, &s) {
                    Some(reason) => done.push(retire(s, key, reason)),
                    None => {
                        live[slot_of(key)] = Some(s);
                        go_on.push(si);
                    }
                }
            }
            sched.prefilled(p, go_on);
        }
    }
}

/// What a step sampled: a token and log-prob per decode row, then `n` per
/// completed prompt (`completed`), whose samples' streams are `fresh`.
struct Sampled {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    completed: Vec<usize>,
    fresh: Vec<Vec<StdRng>>,
}

fn retire(s: Live, key: SeqKey, finish_reason: FinishReason) -> Sample {
    Sample {
        prompt_index: key.prompt,
        sample_index: key.sample,
        token_ids: s.tokens,
        logprobs: s.logprobs,
        finish_reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::sample_row;
    use crate::rollout::kv_cache::SeqCache;
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
        let mut c = PagedKvCache::new(bs, usize::MAX);
        let mut seq = SeqCache::default();
        (0..t).for_each(|_| {
            c.push_slot(&mut seq).unwrap();
        });
        let mut seqs: Vec<SeqCache> = (0..n - 1).map(|_| c.fork(&seq).unwrap()).collect();
        seqs.push(seq);
        for _ in 0..max_new - 1 {
            for s in &mut seqs {
                c.push_slot(s).unwrap();
            }
        }
        assert!(c.blocks_in_use() <= kv_block_bound(&[t], n, max_new, bs));
        let top = seqs.iter().flat_map(|s| s.blocks.iter()).max().unwrap();
        assert!(*top < kv_block_bound(&[t], n, max_new, bs));
    }
}
