//! The storage of a paged KV cache on a backend: per layer
//! `[blocks, block_size, kv_heads, head_dim]` for K and for V (slot `s` is
//! block `s / block_size`, row `s % block_size`), as the paged attention op
//! reads it. Which blocks a sequence owns (tables, forks, the free list) is
//! the sampler's bookkeeping (`rollout::kv_cache`); this holds the numbers.

use super::config::ModelConfig;
use crate::backend::desc::{flatten_block_tables, PagedSeq};
use crate::ops::{Backend, DType, Result};

pub struct KvStore<B: Backend> {
    pub block_size: usize,
    pub blocks: usize,
    /// Values per token slot: kv_heads * head_dim.
    pub slot: usize,
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
}

impl<B: Backend> KvStore<B> {
    /// A cache of `blocks` blocks for `cfg`'s decoder, zeroed, stored as
    /// `dtype` (the weights': bf16 halves the cache and keeps the decode
    /// attention in bf16).
    pub fn new(
        be: &B,
        cfg: &ModelConfig,
        block_size: usize,
        blocks: usize,
        dtype: DType,
    ) -> Result<Self> {
        let tc = &cfg.text;
        let slot = tc.num_kv_heads * tc.head_dim;
        let n = blocks * block_size * slot;
        let layer = || match dtype {
            DType::F32 => be.zeros(n),
            DType::Bf16 => be.cast(&be.zeros(n)?, dtype),
        };
        Ok(Self {
            block_size,
            blocks,
            slot,
            k: (0..tc.num_layers).map(|_| layer()).collect::<Result<_>>()?,
            v: (0..tc.num_layers).map(|_| layer()).collect::<Result<_>>()?,
        })
    }

    /// Bytes of one block over all layers, keys and values, stored as `dtype`.
    pub fn block_bytes(cfg: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        let tc = &cfg.text;
        2 * tc.num_layers * block_size * tc.num_kv_heads * tc.head_dim * dtype.size_bytes()
    }

    /// Writes rows of keys and values `[rows, slot]` of layer `layer` at
    /// the cache slots `slots`.
    pub fn write_rows(
        &mut self,
        be: &B,
        layer: usize,
        k: &B::Buf,
        v: &B::Buf,
        slots: &B::Index,
    ) -> Result<()> {
        be.scatter_rows(k, slots, self.slot, &mut self.k[layer])?;
        be.scatter_rows(v, slots, self.slot, &mut self.v[layer])
    }

    /// Copies block `src` to block `dst` in every layer (a fork's partial
    /// last block).
    pub fn copy_block(&mut self, be: &B, src: usize, dst: usize) -> Result<()> {
        let bs = self.block_size as i32;
        let rows = |b: usize| -> Vec<i32> { (0..bs).map(|r| b as i32 * bs + r).collect() };
        let (from, to) = (be.index(&rows(src))?, be.index(&rows(dst))?);
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let block = be.gather_rows(cache, &from, self.slot)?;
            be.scatter_rows(&block, &to, self.slot, cache)?;
        }
        Ok(())
    }
}

/// The inputs of one decode step on the backend: the cache slot of each
/// new token, the block tables `[B, stride]` and each sequence's length
/// (its new token counted).
pub struct DecodeBatch<B: Backend> {
    pub slots: B::Index,
    pub tables: B::Index,
    pub stride: usize,
    pub lens: B::Index,
}

impl<B: Backend> DecodeBatch<B> {
    /// `seqs[b]` is sequence b's block table and length; `slots[b]` the slot
    /// reserved for its new token.
    pub fn new(be: &B, seqs: &[(&[usize], usize)], slots: &[usize]) -> Result<Self> {
        let paged: Vec<PagedSeq> = seqs
            .iter()
            .map(|&(block_table, len)| PagedSeq { block_table, len })
            .collect();
        let (tables, lens, stride) = flatten_block_tables(&paged);
        let slots: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        Ok(Self {
            slots: be.index(&slots)?,
            tables: be.index(&tables)?,
            stride,
            lens: be.index(&lens)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::CpuBackend;

    #[test]
    fn decode_batch_lays_out_tables_for_the_paged_kernel() {
        // a: blocks 0, 1 (7 tokens); b: block 2 (3 tokens).
        let (a, b) = (vec![0usize, 1], vec![2usize]);
        let batch = DecodeBatch::new(&CpuBackend, &[(&a, 7), (&b, 3)], &[6, 10]).unwrap();
        assert_eq!(batch.stride, 2);
        assert_eq!(batch.tables, vec![0, 1, 2, 0]);
        assert_eq!(batch.lens, vec![7, 3]);
        assert_eq!(batch.slots, vec![6, 10]);
    }

    #[test]
    fn rows_land_in_their_slots_and_a_block_copy_moves_one_block() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen2_5_vl/single_noresize");
        let cfg = ModelConfig::load(&dir).unwrap();
        let be = CpuBackend;
        let mut store = KvStore::new(&be, &cfg, 4, 3, DType::F32).unwrap();
        let w = store.slot;
        let k: Vec<f32> = (0..2 * w).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        store.write_rows(&be, 1, &k, &v, &vec![5, 6]).unwrap();
        assert_eq!(&store.k[1][5 * w..7 * w], &k[..]);
        assert_eq!(&store.v[1][5 * w..7 * w], &v[..]);
        assert!(
            store.k[0].iter().all(|&x| x == 0.0),
            "other layers untouched"
        );
        store.copy_block(&be, 1, 2).unwrap();
        assert_eq!(&store.k[1][9 * w..11 * w], &k[..]);
        assert_eq!(&store.v[1][9 * w..11 * w], &v[..]);
        assert_eq!(&store.k[1][4 * w..8 * w], &store.k[1][8 * w..12 * w]);
    }
}
