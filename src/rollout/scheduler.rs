//! Continuous batching: which rows run in the next model step. Up to
//! `max_num_seqs` sequences are in the batch (decoding samples and prompts
//! being prefilled); each step every decoding sample adds one row and
//! prompt chunks fill the rest of a `max_num_batched_tokens` budget, so a
//! finished sample's seat goes to the next sample of a prefilled prompt or
//! to the next prompt's prefill at once. When the KV cache has no free
//! block, the youngest sequence gives its blocks back and is recomputed
//! later (a prefill of everything it had cached); a sample's tokens never
//! change, so preemption costs time, not results.
//!
//! Pure bookkeeping: block tables and slots, no numbers. The generator
//! runs the rows, samples, and reports finished samples back.

use super::kv_cache::{PagedKvCache, SeqCache};
use std::collections::VecDeque;

/// vLLM's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Sequences in the batch at once (decoding or being prefilled).
    pub max_num_seqs: usize,
    /// Rows of one step: a token per decoding sample plus prompt chunks.
    pub max_num_batched_tokens: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
        }
    }
}

/// One sample of one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqKey {
    pub prompt: usize,
    pub sample: usize,
}

/// What a prefill computes, and what it becomes when done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// A prompt's first prefill: its last row's logits give every sample's
    /// first token ([`Scheduler::prefilled`] says which samples go on).
    Prompt,
    /// A prompt prefilled again after preemption, for its samples that
    /// had not started (their first tokens are already drawn).
    Restore { pending: Vec<usize> },
    /// A preempted sample: its prompt and generated tokens but the last,
    /// which is the input of its next decode row.
    Resume { sample: usize },
}

/// A prefill, queued or in the batch.
#[derive(Debug, Clone)]
struct Job {
    prompt: usize,
    fill: Fill,
    /// Tokens to prefill, and how many are in the cache already.
    len: usize,
    done: usize,
    cache: SeqCache,
    age: u64,
}

/// A prefilled prompt whose samples have not all started.
#[derive(Debug, Clone)]
struct Parent {
    prompt: usize,
    cache: SeqCache,
    /// Samples still to start, in order; `None` until the generator says.
    pending: Option<VecDeque<usize>>,
    age: u64,
}

#[derive(Debug, Clone)]
struct Running {
    key: SeqKey,
    cache: SeqCache,
    age: u64,
}

/// A sample joining the batch: its cache is a fork of its prompt's; the
/// partial last block was given a new block the caller fills first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub key: SeqKey,
    /// `(src, dst)` block copy, before this step's forward.
    pub copy: Option<(usize, usize)>,
}

/// A decoding sample's row: its last token goes in at `slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeRow {
    pub key: SeqKey,
    pub slot: usize,
    pub table: Vec<usize>,
    /// Cached tokens with this one.
    pub len: usize,
}

/// Tokens `start..end` of a prefill; row `i` attends to the first
/// `start + i + 1` cached tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub prompt: usize,
    pub fill: Fill,
    pub start: usize,
    pub end: usize,
    pub slots: Vec<usize>,
    pub table: Vec<usize>,
    /// The prefill is complete after this chunk.
    pub completes: bool,
}

/// The rows of one step: decode rows first, then chunk rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub spawns: Vec<Spawn>,
    pub decodes: Vec<DecodeRow>,
    pub chunks: Vec<Chunk>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<Preempted>,
}

impl Step {
    pub fn rows(&self) -> usize {
        self.decodes.len() + self.chunks.iter().map(|c| c.end - c.start).sum::<usize>()
    }
}

/// Who gave its blocks back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preempted {
    Sample(SeqKey),
    Prefill { prompt: usize },
    Parent { prompt: usize },
}

/// The KV cache cannot hold even the oldest sequence on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheExhausted {
    pub capacity: usize,
}

pub struct Scheduler {
    pub config: ScheduleConfig,
    pub blocks: PagedKvCache,
    queue: VecDeque<Job>,
    prefilling: Vec<Job>,
    parents: Vec<Parent>,
    /// Oldest first.
    running: Vec<Running>,
    next_age: u64,
}

impl Scheduler {
    /// Queues each prompt (of `prompt_lens[i]` tokens) for its prefill.
    pub fn new(config: ScheduleConfig, blocks: PagedKvCache, prompt_lens: &[usize]) -> Self {
        assert!(
            config.max_num_seqs >= 1 && config.max_num_batched_tokens >= config.max_num_seqs,
            "the generator checks the schedule limits"
        );
        let queue = prompt_lens
            .iter()
            .enumerate()
            .map(|(prompt, &len)| Job {
                prompt,
                fill: Fill::Prompt,
                len,
                done: 0,
                cache: SeqCache::default(),
                age: 0,
            })
            .collect();
        Self {
            config,
            blocks,
            queue,
            prefilling: Vec::new(),
            parents: Vec::new(),
            running: Vec::new(),
            next_age: 0,
        }
    }

    /// Nothing queued, prefilling, waiting or decoding.
    pub fn is_done(&self) -> bool {
        self.queue.is_empty()
            && self.prefilling.is_empty()
            && self.parents.is_empty()
            && self.running.is_empty()
    }

    /// Samples decoding now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether prompt `prompt` has a prefill queued or under way (its input
    /// rows are still needed).
    pub fn fills_prompt(&self, prompt: usize) -> bool {
        self.queue
            .iter()
            .chain(&self.prefilling)
            .any(|j| j.prompt == prompt)
    }

    /// Sequences holding cache blocks (or about to).
    fn holders(&self) -> usize {
        self.running.len() + self.prefilling.len() + self.parents.len()
    }

    fn age(&mut self) -> u64 {
        self.next_age += 1;
        self.next_age
    }

    fn seats(&self) -> usize {
        self.config
            .max_num_seqs
            .saturating_sub(self.running.len() + self.prefilling.len())
    }

    /// The next step's rows; `None` once everything finished.
    pub fn schedule(&mut self) -> Result<Option<Step>, CacheExhausted> {
        let mut step = Step::default();
        loop {
            if self.is_done() {
                return Ok(None);
            }
            self.plan_decodes(&mut step);
            self.plan_spawns(&mut step);
            self.plan_chunks(&mut step);
            if step.rows() > 0 {
                return Ok(Some(step));
            }
            // Nothing could run: free the youngest holder's blocks so the
            // older ones can go on. One holder alone that cannot go on with
            // the whole cache never will.
            if self.holders() <= 1 {
                return Err(CacheExhausted {
                    capacity: self.blocks.capacity,
                });
            }
            let victim = self.preempt_youngest().expect("two holders");
            step.preempted.push(victim);
        }
    }

    /// A row for each decoding sample, oldest first; a sample whose next
    /// token needs a block that is not free preempts the youngest
    /// sequence (itself if it is the youngest).
    fn plan_decodes(&mut self, step: &mut Step) {
        let mut i = 0;
        while i < self.running.len() {
            let key = self.running[i].key;
            let slot = loop {
                if let Some(slot) = self.blocks.push_slot(&mut self.running[i].cache) {
                    break Some(slot);
                }
                let victim = self
                    .preempt_youngest()
                    .expect("the sample itself holds blocks");
                step.preempted.push(victim);
                if victim == Preempted::Sample(key) {
                    break None;
                }
            };
            if let Some(slot) = slot {
                let r = &self.running[i];
                step.decodes.push(DecodeRow {
                    key,
                    slot,
                    table: r.cache.blocks.clone(),
                    len: r.cache.len,
                });
                i += 1;
            }
        }
    }

    /// Samples of prefilled prompts take free seats (oldest prompt first)
    /// while free blocks allow; they decode in this step.
    fn plan_spawns(&mut self, step: &mut Step) {
        let mut p = 0;
        while p < self.parents.len() && self.seats() > 0 {
            let parent = &self.parents[p];
            let Some(&sample) = parent.pending.as_ref().and_then(|q| q.front()) else {
                p += 1;
                continue;
            };
            let prompt = parent.prompt;
            let last = parent.pending.as_ref().is_some_and(|q| q.len() == 1);
            let (mut cache, copy) = if last {
                // The last sample takes the prompt's blocks themselves.
                if self.blocks.needs_block(&parent.cache) && self.blocks.free_blocks() == 0 {
                    break;
                }
                (parent.cache.clone(), None)
            } else {
                // One block either way: the fork's copy of a partial last
                // block (room for its next token), or on a block boundary
                // a block for the next token.
                if self.blocks.free_blocks() == 0 {
                    break;
                }
                let fork = self.blocks.fork(&parent.cache).expect("a block is free");
                let copy = match (parent.cache.blocks.last(), fork.blocks.last()) {
                    (Some(&src), Some(&dst)) if src != dst => Some((src, dst)),
                    _ => None,
                };
                (fork, copy)
            };
            let slot = self.blocks.push_slot(&mut cache).expect("room was checked");
            if last {
                self.parents.remove(p);
            } else if let Some(q) = self.parents[p].pending.as_mut() {
                q.pop_front();
            }
            let key = SeqKey { prompt, sample };
            step.spawns.push(Spawn { key, copy });
            step.decodes.push(DecodeRow {
                key,
                slot,
                table: cache.blocks.clone(),
                len: cache.len,
            });
            let age = self.age();
            self.running.push(Running { key, cache, age });
        }
    }

    /// Prefill chunks in the token budget left by the decode rows: the
    /// prefills under way (oldest first), then queued ones admitted while
    /// seats and free blocks last. Chunks only take free blocks.
    fn plan_chunks(&mut self, step: &mut Step) {
        let mut budget = self
            .config
            .max_num_batched_tokens
            .saturating_sub(step.decodes.len());
        // A prompt whose prefill completes in this step is in its batch.
        let mut completed_prompts = 0;
        let mut j = 0;
        while budget > 0 {
            if j == self.prefilling.len() {
                // What was preempted in this step waits for the next, so
                // it does not take back the blocks it just gave up.
                if !step.preempted.is_empty()
                    || self.seats() <= completed_prompts
                    || self.blocks.free_blocks() == 0
                {
                    break;
                }
                let Some(mut job) = self.queue.pop_front() else {
                    break;
                };
                job.age = self.age();
                self.prefilling.push(job);
            }
            let job = &mut self.prefilling[j];
            let take = (job.len - job.done)
                .min(budget)
                .min(self.blocks.room(&job.cache));
            if take == 0 {
                j += 1;
                continue;
            }
            let slots: Vec<usize> = (0..take)
                .map(|_| self.blocks.push_slot(&mut job.cache).expect("room"))
                .collect();
            let start = job.done;
            job.done += take;
            budget -= take;
            let completes = job.done == job.len;
            step.chunks.push(Chunk {
                prompt: job.prompt,
                fill: job.fill.clone(),
                start,
                end: job.done,
                slots,
                table: job.cache.blocks.clone(),
                completes,
            });
            if completes {
                let job = self.prefilling.remove(j);
                completed_prompts += usize::from(!matches!(job.fill, Fill::Resume { .. }));
                self.complete(job);
            } else {
                j += 1;
            }
        }
    }

    /// A prefill whose last chunk is planned: its cache is whole once this
    /// step ran, so it becomes a prompt waiting for its samples to start,
    /// or a decoding sample again.
    fn complete(&mut self, job: Job) {
        let Job {
            prompt,
            fill,
            cache,
            age,
            ..
        } = job;
        match fill {
            Fill::Prompt => self.parents.push(Parent {
                prompt,
                cache,
                pending: None,
                age,
            }),
            Fill::Restore { pending } => self.parents.push(Parent {
                prompt,
                cache,
                pending: Some(pending.into()),
                age,
            }),
            Fill::Resume { sample } => {
                let at = self.running.partition_point(|r| r.age < age);
                let key = SeqKey { prompt, sample };
                self.running.insert(at, Running { key, cache, age });
            }
        }
        self.parents.sort_by_key(|p| p.age);
    }

    /// After the step that completed prompt `prompt`'s first prefill: the
    /// samples whose first token did not end them, which start decoding as
    /// seats free (in order). With none, the prompt's blocks are returned.
    pub fn prefilled(&mut self, prompt: usize, samples: Vec<usize>) {
        let at = self
            .parents
            .iter()
            .position(|p| p.prompt == prompt && p.pending.is_none())
            .expect("prefilled follows the prompt's completing chunk");
        if samples.is_empty() {
            let parent = self.parents.remove(at);
            self.blocks.release(parent.cache);
        } else {
            self.parents[at].pending = Some(samples.into());
        }
    }

    /// A sample ended: its blocks go back.
    pub fn finish(&mut self, key: SeqKey) {
        let at = self
            .running
            .iter()
            .position(|r| r.key == key)
            .expect("only decoding samples finish");
        let r = self.running.remove(at);
        self.blocks.release(r.cache);
    }

    /// The youngest sequence holding blocks gives them back and goes to the
    /// front of the queue, to be recomputed when it is admitted again.
    fn preempt_youngest(&mut self) -> Option<Preempted> {
        let youngest = |ages: &mut dyn Iterator<Item = u64>| ages.enumerate().max_by_key(|x| x.1);
        let run = youngest(&mut self.running.iter().map(|r| r.age));
        let fill = youngest(&mut self.prefilling.iter().map(|j| j.age));
        let parent = youngest(&mut self.parents.iter().map(|p| p.age));
        let best = [
            run.map(|x| (x.1, 0, x.0)),
            fill.map(|x| (x.1, 1, x.0)),
            parent.map(|x| (x.1, 2, x.0)),
        ]
        .into_iter()
        .flatten()
        .max()?;
        let (job, who) = match best {
            (_, 0, i) => {
                let r = self.running.remove(i);
                self.blocks.release(r.cache.clone());
                let job = Job {
                    prompt: r.key.prompt,
                    fill: Fill::Resume {
                        sample: r.key.sample,
                    },
                    len: r.cache.len,
                    done: 0,
                    cache: SeqCache::default(),
                    age: 0,
                };
                (job, Preempted::Sample(r.key))
            }
            (_, 1, i) => {
                let mut job = self.prefilling.remove(i);
                self.blocks.release(std::mem::take(&mut job.cache));
                job.done = 0;
                let prompt = job.prompt;
                (job, Preempted::Prefill { prompt })
            }
            (_, _, i) => {
                let p = self.parents.remove(i);
                self.blocks.release(p.cache.clone());
                let job = Job {
                    prompt: p.prompt,
                    fill: Fill::Restore {
                        pending: p
                            .pending
                            .expect("prefilled is called right after the step")
                            .into(),
                    },
                    len: p.cache.len,
                    done: 0,
                    cache: SeqCache::default(),
                    age: 0,
                };
                (job, Preempted::Parent { prompt: p.prompt })
            }
        };
        self.queue.push_front(job);
        Some(who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// What a cache slot holds: token `pos` of prompt `prompt`'s prompt
    /// (`sample` None) or of sample `sample`'s generated tokens.
    type Content = (usize, Option<usize>, usize);

    /// Runs the scheduler against a model that only writes each row's
    /// identity into its slot and checks every attended slot holds the
    /// sequence's own token at that position. Sample (p, s) ends after
    /// `lens[p][s]` tokens. Returns the steps and the finish order.
    struct Sim {
        prompt_lens: Vec<usize>,
        lens: Vec<Vec<usize>>,
        cache: HashMap<usize, Content>,
        generated: HashMap<SeqKey, usize>,
        finished: Vec<SeqKey>,
        steps: Vec<Step>,
    }

    impl Sim {
        fn new(prompt_lens: &[usize], lens: Vec<Vec<usize>>) -> Self {
            Self {
                prompt_lens: prompt_lens.to_vec(),
                lens,
                cache: HashMap::new(),
                generated: HashMap::new(),
                finished: Vec::new(),
                steps: Vec::new(),
            }
        }

        fn expect(&self, prompt: usize, sample: Option<usize>, pos: usize) -> Content {
            if pos < self.prompt_lens[prompt] {
                (prompt, None, pos)
            } else {
                (prompt, sample, pos)
            }
        }

        fn check_attended(
            &self,
            bs: usize,
            table: &[usize],
            len: usize,
            want: impl Fn(usize) -> Content,
        ) {
            for pos in 0..len {
                let slot = table[pos / bs] * bs + pos % bs;
                assert_eq!(self.cache.get(&slot), Some(&want(pos)), "position {pos}");
            }
        }

        fn run(&mut self, sched: &mut Scheduler) -> Result<(), CacheExhausted> {
            let bs = sched.blocks.block_size;
            while let Some(step) = sched.schedule()? {
                assert!(step.rows() <= sched.config.max_num_batched_tokens);
                let seqs = step.decodes.len() + step.chunks.len();
                assert!(
                    seqs <= sched.config.max_num_seqs,
                    "{seqs} sequences in a step"
                );
                assert!(sched.blocks.blocks_in_use() <= sched.blocks.capacity);
                for sp in &step.spawns {
                    if let Some((src, dst)) = sp.copy {
                        for r in 0..bs {
                            if let Some(&c) = self.cache.get(&(src * bs + r)) {
                                self.cache.insert(dst * bs + r, c);
                            }
                        }
                    }
                }
                // Every row writes before any row attends (one layer).
                for d in &step.decodes {
                    let want = self.expect(d.key.prompt, Some(d.key.sample), d.len - 1);
                    self.cache.insert(d.slot, want);
                }
                for c in &step.chunks {
                    let sample = match c.fill {
                        Fill::Resume { sample } => Some(sample),
                        _ => None,
                    };
                    for (i, &slot) in c.slots.iter().enumerate() {
                        self.cache
                            .insert(slot, self.expect(c.prompt, sample, c.start + i));
                    }
                }
                for d in &step.decodes {
                    let g = self.generated[&d.key];
                    assert_eq!(d.len, self.prompt_lens[d.key.prompt] + g, "{:?}", d.key);
                    let (p, s) = (d.key.prompt, Some(d.key.sample));
                    self.check_attended(bs, &d.table, d.len, |pos| self.expect(p, s, pos));
                }
                for c in &step.chunks {
                    let sample = match c.fill {
                        Fill::Resume { sample } => Some(sample),
                        _ => None,
                    };
                    for i in 0..c.end - c.start {
                        let len = c.start + i + 1;
                        self.check_attended(bs, &c.table, len, |pos| {
                            self.expect(c.prompt, sample, pos)
                        });
                    }
                }
                for d in &step.decodes {
                    let g = self.generated.get_mut(&d.key).unwrap();
                    *g += 1;
                    if *g == self.lens[d.key.prompt][d.key.sample] {
                        self.finished.push(d.key);
                        sched.finish(d.key);
                    }
                }
                for c in step.chunks.iter().filter(|c| c.completes) {
                    if c.fill == Fill::Prompt {
                        let mut go_on = Vec::new();
                        for (s, &len) in self.lens[c.prompt].iter().enumerate() {
                            let key = SeqKey {
                                prompt: c.prompt,
                                sample: s,
                            };
                            assert!(
                                self.generated.insert(key, 1).is_none(),
                                "{key:?} started twice"
                            );
                            if len == 1 {
                                self.finished.push(key);
                            } else {
                                go_on.push(s);
                            }
                        }
                        sched.prefilled(c.prompt, go_on);
                    }
                }
                self.steps.push(step);
            }
            Ok(())
        }

        fn check_all_finished_once(&self, sched: &Scheduler) {
            let mut got = self.finished.clone();
            got.sort();
            let want: Vec<SeqKey> = (0..self.lens.len())
                .flat_map(|p| {
                    (0..self.lens[p].len()).map(move |s| SeqKey {
                        prompt: p,
                        sample: s,
                    })
                })
                .collect();
            assert_eq!(got, want, "every sample finishes exactly once");
            for (k, &g) in &self.generated {
                assert_eq!(g, self.lens[k.prompt][k.sample], "{k:?}");
            }
            assert_eq!(sched.blocks.blocks_in_use(), 0);
            assert!(sched.is_done());
        }

        fn preemptions(&self) -> usize {
            self.steps.iter().map(|s| s.preempted.len()).sum()
        }
    }

    fn config(seqs: usize, tokens: usize) -> ScheduleConfig {
        ScheduleConfig {
            max_num_seqs: seqs,
            max_num_batched_tokens: tokens,
        }
    }

    /// Long-tailed sample lengths, fixed by (p, s).
    fn lens(prompts: usize, n: usize, max: usize) -> Vec<Vec<usize>> {
        (0..prompts)
            .map(|p| (0..n).map(|s| 1 + (p * 7 + s * 13 + p * s) % max).collect())
            .collect()
    }

    #[test]
    fn a_small_case_step_by_step() {
        // One prompt of 6 tokens, 2 samples of 3 and 2 tokens, 4-token
        // blocks, 4 rows a step.
        let mut sched = Scheduler::new(config(2, 4), PagedKvCache::new(4, 8), &[6]);
        let mut sim = Sim::new(&[6], vec![vec![3, 2]]);
        sim.run(&mut sched).unwrap();
        let shape: Vec<(usize, Vec<(usize, usize)>)> = sim
            .steps
            .iter()
            .map(|s| {
                (
                    s.decodes.len(),
                    s.chunks.iter().map(|c| (c.start, c.end)).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, vec![(0, 4)]),
                (0, vec![(4, 6)]),
                (2, vec![]), // both samples start: tokens 2 (sample 1 ends)
                (1, vec![]), // sample 0's third token
            ]
        );
        // Sample 0 forks the partial block (copy), sample 1 takes the
        // prompt's blocks.
        let spawns = &sim.steps[2].spawns;
        assert_eq!(spawns.len(), 2);
        assert!(spawns[0].copy.is_some() && spawns[1].copy.is_none());
        assert_eq!(
            sim.finished,
            vec![
                SeqKey {
                    prompt: 0,
                    sample: 1
                },
                SeqKey {
                    prompt: 0,
                    sample: 0
                }
            ]
        );
        sim.check_all_finished_once(&sched);
    }

    #[test]
    fn prefill_chunks_join_decode_steps_and_freed_seats_refill_at_once() {
        let prompt_lens = [9, 5, 12, 7, 3, 10];
        let mut sched = Scheduler::new(config(4, 8), PagedKvCache::new(4, 1000), &prompt_lens);
        let mut sim = Sim::new(&prompt_lens, lens(6, 3, 9));
        sim.run(&mut sched).unwrap();
        sim.check_all_finished_once(&sched);
        assert_eq!(sim.preemptions(), 0, "the cache is large enough");
        let mixed = sim
            .steps
            .iter()
            .filter(|s| !s.decodes.is_empty() && !s.chunks.is_empty())
            .count();
        assert!(
            mixed >= 3,
            "only {mixed} steps mixed prefill chunks with decode rows"
        );
        // Until the last prompt is prefilled and its last sample started,
        // every step fills all 4 seats or the whole 8-row budget: a
        // finished sample's seat is taken at the next step.
        let last_start = sim
            .steps
            .iter()
            .rposition(|s| !s.chunks.is_empty() || !s.spawns.is_empty())
            .unwrap();
        for (i, s) in sim.steps[..last_start].iter().enumerate() {
            let seqs = s.decodes.len() + s.chunks.len();
            assert!(
                seqs == 4 || s.rows() == 8,
                "step {i}: {seqs} sequences, {} rows",
                s.rows()
            );
        }
    }

    #[test]
    fn a_tight_cache_preempts_the_youngest_and_recomputes_them() {
        let prompt_lens = [9, 5, 12, 7, 3, 10];
        // Each sequence needs up to (12 + 9) / 4 + 1 = 7 blocks; 9 force
        // preemption with 4 sequences in flight.
        let mut sched = Scheduler::new(config(4, 8), PagedKvCache::new(4, 9), &prompt_lens);
        let mut sim = Sim::new(&prompt_lens, lens(6, 3, 9));
        sim.run(&mut sched).unwrap();
        sim.check_all_finished_once(&sched);
        assert!(sim.preemptions() > 0, "9 blocks must force preemption");
        let resumed = sim
            .steps
            .iter()
            .flat_map(|s| &s.chunks)
            .filter(|c| matches!(c.fill, Fill::Resume { .. } | Fill::Restore { .. }))
            .count();
        assert!(resumed > 0, "preempted sequences are recomputed");
        // The same run with no preemption finishes the same samples.
        let mut roomy = Scheduler::new(config(4, 8), PagedKvCache::new(4, 1000), &prompt_lens);
        let mut free = Sim::new(&prompt_lens, lens(6, 3, 9));
        free.run(&mut roomy).unwrap();
        assert!(free.steps.len() < sim.steps.len());
    }

    #[test]
    fn the_youngest_is_preempted_first() {
        // Two prompts of 4 tokens, one sample each of 9 tokens; 2-token
        // blocks; 6 blocks: prompt 1 (younger) gives way to prompt 0.
        let mut sched = Scheduler::new(config(2, 8), PagedKvCache::new(2, 6), &[4, 4]);
        let mut sim = Sim::new(&[4, 4], vec![vec![9], vec![9]]);
        sim.run(&mut sched).unwrap();
        sim.check_all_finished_once(&sched);
        let first = sim.steps.iter().flat_map(|s| &s.preempted).next().copied();
        assert_eq!(
            first,
            Some(Preempted::Sample(SeqKey {
                prompt: 1,
                sample: 0
            }))
        );
        assert_eq!(
            sim.finished[0],
            SeqKey {
                prompt: 0,
                sample: 0
            }
        );
    }

    #[test]
    fn a_cache_too_small_for_one_sequence_is_an_error_not_a_hang() {
        let mut sched = Scheduler::new(config(2, 8), PagedKvCache::new(2, 3), &[4]);
        let mut sim = Sim::new(&[4], vec![vec![9]]);
        assert_eq!(sim.run(&mut sched), Err(CacheExhausted { capacity: 3 }));
        let mut sched = Scheduler::new(config(2, 8), PagedKvCache::new(2, 1), &[4]);
        let mut sim = Sim::new(&[4], vec![vec![1]]);
        assert_eq!(sim.run(&mut sched), Err(CacheExhausted { capacity: 1 }));
    }

    #[test]
    fn samples_ending_at_their_first_token_never_take_a_seat() {
        let mut sched = Scheduler::new(config(1, 4), PagedKvCache::new(4, 4), &[3, 3]);
        let mut sim = Sim::new(&[3, 3], vec![vec![1, 1], vec![1, 2]]);
        sim.run(&mut sched).unwrap();
        sim.check_all_finished_once(&sched);
        let decodes: usize = sim.steps.iter().map(|s| s.decodes.len()).sum();
        assert_eq!(decodes, 1, "only sample (1, 1) decodes");
    }
}
