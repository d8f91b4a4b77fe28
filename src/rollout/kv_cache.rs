//! A paged KV cache: keys and values of every layer in fixed-size blocks
//! from one pool, a block table per sequence, reference-counted blocks so n
//! samples of a prompt share its prefill (fork), and blocks returned to a
//! free list when a sequence finishes. The GPU backend reuses the layout.

/// One sequence's view of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqCache {
    pub blocks: Vec<usize>,
    pub len: usize,
}

pub struct PagedKvCache {
    pub block_size: usize,
    pub layers: usize,
    /// Floats per token slot: kv_heads * head_dim.
    pub slot: usize,
    /// Per layer: `[blocks, block_size, slot]`.
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    refcount: Vec<u32>,
    free: Vec<usize>,
}

impl PagedKvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, block_size: usize) -> Self {
        Self {
            block_size,
            layers,
            slot: kv_heads * head_dim,
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            refcount: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Blocks in use (referenced by at least one sequence).
    pub fn blocks_in_use(&self) -> usize {
        self.refcount.iter().filter(|&&r| r > 0).count()
    }

    fn alloc_block(&mut self) -> usize {
        if let Some(b) = self.free.pop() {
            self.refcount[b] = 1;
            return b;
        }
        let b = self.refcount.len();
        self.refcount.push(1);
        let floats = self.block_size * self.slot;
        for l in 0..self.layers {
            self.k[l].resize((b + 1) * floats, 0.0);
            self.v[l].resize((b + 1) * floats, 0.0);
        }
        b
    }

    /// Reserves the next token slot of `seq` (allocating a block when the
    /// last one is full) and returns its flat slot index.
    pub fn push_slot(&mut self, seq: &mut SeqCache) -> usize {
        if seq.len == seq.blocks.len() * self.block_size {
            let b = self.alloc_block();
            seq.blocks.push(b);
        }
        let slot =
            seq.blocks[seq.len / self.block_size] * self.block_size + seq.len % self.block_size;
        seq.len += 1;
        slot
    }

    /// Writes one token's keys and values of one layer at `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let r = slot * self.slot..(slot + 1) * self.slot;
        self.k[layer][r.clone()].copy_from_slice(k);
        self.v[layer][r].copy_from_slice(v);
    }

    /// A second sequence with the same cached tokens: full blocks are
    /// shared (reference counted, never written again), the partial last
    /// block is copied so both can append independently.
    pub fn fork(&mut self, seq: &SeqCache) -> SeqCache {
        let full = seq.len / self.block_size;
        let mut blocks: Vec<usize> = seq.blocks[..full].to_vec();
        for &b in &blocks {
            self.refcount[b] += 1;
        }
        if seq.len % self.block_size != 0 {
            let src = seq.blocks[full];
            let dst = self.alloc_block();
            let floats = self.block_size * self.slot;
            for l in 0..self.layers {
                self.k[l].copy_within(src * floats..(src + 1) * floats, dst * floats);
                self.v[l].copy_within(src * floats..(src + 1) * floats, dst * floats);
            }
            blocks.push(dst);
        }
        SeqCache {
            blocks,
            len: seq.len,
        }
    }

    /// Returns a finished sequence's blocks.
    pub fn release(&mut self, seq: SeqCache) {
        for b in seq.blocks {
            self.refcount[b] -= 1;
            if self.refcount[b] == 0 {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut c = PagedKvCache::new(1, 1, 2, 4);
        let mut a = SeqCache::default();
        for i in 0..6 {
            let s = c.push_slot(&mut a);
            c.write(0, s, &[i as f32, 0.0], &[0.0, i as f32]);
        }
        assert_eq!(a.blocks.len(), 2);
        let mut b = c.fork(&a);
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_eq!(c.blocks_in_use(), 3);
        // Appending to the fork does not touch the original.
        let s = c.push_slot(&mut b);
        c.write(0, s, &[99.0, 0.0], &[0.0, 99.0]);
        let a_slot6 = a.blocks[1] * 4 + 2;
        assert_eq!(c.k[0][a_slot6 * 2], 0.0);
        assert_eq!(c.k[0][s * 2], 99.0);
        // The shared prefix is intact for both.
        assert_eq!(c.k[0][(b.blocks[1] * 4 + 1) * 2], 5.0);
        c.release(a);
        assert_eq!(c.blocks_in_use(), 2);
        c.release(b);
        assert_eq!(c.blocks_in_use(), 0);
    }
}
