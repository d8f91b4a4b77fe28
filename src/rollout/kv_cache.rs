//! The block bookkeeping of a paged KV cache: a block table per sequence,
//! reference-counted blocks so n samples of a prompt share its prefill
//! (fork), and blocks returned to a free list when a sequence finishes.
//! The keys and values themselves live in a `model::kv_cache::KvStore` on
//! the model's backend, indexed by these blocks.

/// One sequence's view of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqCache {
    pub blocks: Vec<usize>,
    pub len: usize,
}

pub struct PagedKvCache {
    pub block_size: usize,
    refcount: Vec<u32>,
    free: Vec<usize>,
}

impl PagedKvCache {
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
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
        self.refcount.push(1);
        self.refcount.len() - 1
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

    /// A second sequence with the same cached tokens: full blocks are
    /// shared (reference counted, never written again); the partial last
    /// block gets a new block, which the caller fills with a copy of the
    /// original's (`KvStore::copy_block`) so both can append independently.
    pub fn fork(&mut self, seq: &SeqCache) -> SeqCache {
        let full = seq.len / self.block_size;
        let mut blocks: Vec<usize> = seq.blocks[..full].to_vec();
        for &b in &blocks {
            self.refcount[b] += 1;
        }
        if seq.len % self.block_size != 0 {
            blocks.push(self.alloc_block());
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
    fn fork_shares_full_blocks_and_gives_the_partial_one_its_own() {
        let mut c = PagedKvCache::new(4);
        let mut a = SeqCache::default();
        let slots: Vec<usize> = (0..6).map(|_| c.push_slot(&mut a)).collect();
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.blocks.len(), 2);
        let mut b = c.fork(&a);
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_eq!(c.blocks_in_use(), 3);
        // Appending to the fork writes into its own block.
        let s = c.push_slot(&mut b);
        assert_eq!(s, b.blocks[1] * 4 + 2);
        c.release(a);
        assert_eq!(c.blocks_in_use(), 2);
        c.release(b);
        assert_eq!(c.blocks_in_use(), 0);
        // A fork on a block boundary has nothing of its own.
        let mut full = SeqCache::default();
        (0..4).for_each(|_| {
            c.push_slot(&mut full);
        });
        let g = c.fork(&full);
        assert_eq!(g.blocks, full.blocks, "nothing to copy on a block boundary");
    }
}
