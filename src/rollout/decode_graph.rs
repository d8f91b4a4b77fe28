//! Decode steps replayed from captured graphs (CUDA graphs): a step of
//! only decode rows is padded to a bucket of rows, and each bucket's
//! forward (embedding, every layer with its cache write and paged
//! attention, the final norm) is captured once per generate call and
//! replayed at every later step of that size, so the host does one launch
//! instead of hundreds. Between replays the host only refills the bucket's
//! inputs in place (token ids, positions, cache slots, block tables,
//! lengths); the hidden states land in the bucket's own buffer, and the
//! head and the sampler run after the replay (one GEMM: capturing it would
//! keep a `[rows, vocab]` logits buffer per bucket, 0.6 GiB at 7B).
//!
//! Padding rows are harmless by construction: they read token 0 at
//! position 0, write their key and value into a cache block that no
//! sequence owns (the store's last block) and attend to that block alone.
//! Every row's result depends only on its own inputs, so a padded step
//! gives each real row what an unpadded one does.
//!
//! Where the backend records nothing (the CPU) the same padded buffers run
//! op by op each step: that is how the CPU tests this path.

use crate::backend::desc::{block_tables_at, PagedSeq, RopeFreqs};
use crate::model::graph::Graph;
use crate::model::kv_cache::{DecodeBatch, KvStore};
use crate::ops::{Backend, Buffer, DType, Result};
use std::collections::HashMap;

/// How decode-only steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// Each step's ops launch one by one at the step's own row count
    /// (vLLM's `enforce_eager`).
    Eager,
    /// Through [`DecodeGraphs`]: replayed graphs where the backend captures
    /// them (CUDA), else the same padded step op by op.
    Graphs,
}

/// The row count a decode step of `rows` rows is padded to: powers of two
/// up to 8, then multiples of 16 (vLLM's capture sizes are as dense), so
/// a step wastes at most 15 rows and a call captures few graphs.
pub fn row_bucket(rows: usize) -> usize {
    match rows {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        5..=8 => 8,
        _ => rows.div_ceil(16) * 16,
    }
}

/// One decode row: the sample's last token and where it goes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    pub token: u32,
    /// Its rotary position (the same on the three M-RoPE streams).
    pub position: i32,
    /// The sequence's cache blocks and its length, this token counted.
    pub table: &'a [usize],
    pub len: usize,
    /// The cache slot reserved for this token's key and value.
    pub slot: usize,
}

/// A bucket's inputs and hidden states, made before its capture and
/// refilled in place at every step.
struct Bucket<B: Backend> {
    ids: B::Ids,
    rope: B::Rope,
    batch: DecodeBatch<B>,
    /// The final norm's output `[rows, hidden]`, in the activations'
    /// storage.
    hidden: B::Buf,
    graph: Option<B::Graph>,
}

/// What one generate call's captured decode steps share: the cache block
/// padding rows use, the block-table width, and a bucket per row count.
pub struct DecodeGraphs<B: Backend> {
    pad: Padding,
    buckets: HashMap<usize, Bucket<B>>,
    /// False on a backend that records nothing, or once a capture failed:
    /// then each step runs its ops on the bucket's buffers.
    capturing: bool,
    /// Graphs captured, and steps replayed from one.
    pub captured: usize,
    pub replays: usize,
    /// Steps through a bucket (replayed or run op by op).
    pub steps: usize,
}

impl<B: Backend> DecodeGraphs<B> {
    /// For a call whose sequences hold at most `stride` blocks of
    /// `block_size` tokens, over a store whose block `scratch_block` no
    /// sequence is ever given.
    pub fn new(
        graph: &Graph<'_, B>,
        stride: usize,
        block_size: usize,
        scratch_block: usize,
    ) -> Self {
        let tc = &graph.cfg.text;
        Self {
            pad: Padding {
                stride: stride.max(1),
                scratch_block,
                block_size,
                freqs: RopeFreqs::mrope(tc.mrope_section, tc.head_dim, tc.rope_theta),
            },
            buckets: HashMap::new(),
            capturing: true,
            captured: 0,
            replays: 0,
            steps: 0,
        }
    }

    /// Runs the forward of `rows` (at most the call's batch) and returns
    /// the final hidden states of the padded batch: row `i < rows.len()` is
    /// `rows[i]`'s.
    pub fn run(
        &mut self,
        graph: &Graph<'_, B>,
        store: &mut KvStore<B>,
        rows: &[DecodeRow<'_>],
    ) -> Result<&B::Buf> {
        let n = row_bucket(rows.len());
        if !self.buckets.contains_key(&n) {
            let bucket = self.new_bucket(graph, store, n)?;
            self.buckets.insert(n, bucket);
        }
        let bucket = self.buckets.get_mut(&n).expect("just made");
        self.pad.fill(graph.be, n, rows, bucket)?;
        match &bucket.graph {
            Some(g) => {
                graph.be.replay(g)?;
                self.replays += 1;
            }
            None => forward(graph, store, bucket)?,
        }
        self.steps += 1;
        Ok(&bucket.hidden)
    }

    /// A bucket of `n` rows, captured where the backend can. The capture
    /// sees every length at the call's largest, so launches sized from the
    /// lengths (the split decode attention's grid) cover every later step.
    fn new_bucket(
        &mut self,
        graph: &Graph<'_, B>,
        store: &mut KvStore<B>,
        n: usize,
    ) -> Result<Bucket<B>> {
        let be = graph.be;
        let tc = &graph.cfg.text;
        let pad = &self.pad;
        let widest = vec![pad.scratch_block; pad.stride];
        let full = pad.stride * pad.block_size;
        let spans: Vec<(&[usize], usize)> = vec![(&widest[..], full); n];
        let slots = vec![pad.scratch_block * pad.block_size; n];
        let zeros = vec![0i32; n];
        // The activations' storage is the token embedding's.
        let hidden = be.zeros(n * tc.hidden_size)?;
        let hidden = match graph.w(graph.layout.text.embed).dtype() {
            DType::F32 => hidden,
            dtype => be.cast(&hidden, dtype)?,
        };
        let mut bucket = Bucket {
            ids: be.ids(&vec![0; n])?,
            rope: be.rope(&pad.freqs, &[&zeros, &zeros, &zeros])?,
            batch: DecodeBatch::new(be, &spans, &slots)?,
            hidden,
            graph: None,
        };
        if self.capturing {
            let mut body = || forward(graph, store, &mut bucket);
            match be.capture(&mut body) {
                Ok(Some(g)) => {
                    bucket.graph = Some(g);
                    self.captured += 1;
                }
                Ok(None) => self.capturing = false,
                Err(e) => {
                    eprintln!(
                        "warning: capturing a decode step of {n} rows failed ({e}); \
                         decode steps run without CUDA graphs for the rest of this call"
                    );
                    self.capturing = false;
                }
            }
        }
        Ok(bucket)
    }
}

/// How a call's rows are padded: the block-table width, the cache block
/// padding rows use, and the rotary frequencies of the positions.
struct Padding {
    /// Blocks in every padded table: the most one sequence of the call holds.
    stride: usize,
    /// The cache block no sequence owns.
    scratch_block: usize,
    block_size: usize,
    freqs: RopeFreqs,
}

impl Padding {
    /// Writes `rows` and the padding after them into the bucket's inputs.
    fn fill<B: Backend>(
        &self,
        be: &B,
        n: usize,
        rows: &[DecodeRow<'_>],
        bucket: &mut Bucket<B>,
    ) -> Result<()> {
        let pad = n - rows.len();
        let mut ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        ids.resize(n, 0);
        let mut positions: Vec<i32> = rows.iter().map(|r| r.position).collect();
        positions.resize(n, 0);
        let mut slots: Vec<i32> = rows.iter().map(|r| r.slot as i32).collect();
        slots.resize(n, (self.scratch_block * self.block_size) as i32);
        // Padding rows attend to the spare block alone.
        let spare = [self.scratch_block];
        let padding = PagedSeq {
            block_table: &spare,
            len: 1,
        };
        let seqs: Vec<PagedSeq> = rows
            .iter()
            .map(|r| PagedSeq {
                block_table: r.table,
                len: r.len,
            })
            .chain(std::iter::repeat_n(padding, pad))
            .collect();
        let (tables, lens) = block_tables_at(&seqs, self.stride);
        be.write_ids(&mut bucket.ids, &ids)?;
        be.write_rope(
            &mut bucket.rope,
            &self.freqs,
            &[&positions, &positions, &positions],
        )?;
        be.write_index(&mut bucket.batch.slots, &slots)?;
        be.write_index(&mut bucket.batch.tables, &tables)?;
        be.write_index(&mut bucket.batch.lens, &lens)
    }
}

/// The captured work: every row's forward into the bucket's hidden states. It
/// reads and writes only buffers made before the capture (its temporaries
/// are made and freed inside it).
fn forward<B: Backend>(
    graph: &Graph<'_, B>,
    store: &mut KvStore<B>,
    bucket: &mut Bucket<B>,
) -> Result<()> {
    let be = graph.be;
    let h = graph.cfg.text.hidden_size;
    let x = be.embedding_fwd(&bucket.ids, graph.w(graph.layout.text.embed), h)?;
    let hidden = graph.decode_step(x, &bucket.rope, store, &bucket.batch)?;
    be.copy_into(&mut bucket.hidden, &hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_row_count_with_little_padding() {
        assert_eq!(
            (1..=9).map(row_bucket).collect::<Vec<_>>(),
            [1, 2, 4, 4, 8, 8, 8, 8, 16]
        );
        for rows in 1..=600 {
            let b = row_bucket(rows);
            assert!(b >= rows && b - rows < 16, "{rows} -> {b}");
        }
        assert_eq!(row_bucket(256), 256);
        assert_eq!(row_bucket(257), 272);
    }
}
