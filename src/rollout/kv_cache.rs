//! The block bookkeeping of a paged KV cache: a block table per sequence,
//! reference-counted blocks so n samples of a prompt share its prefill
//! (fork), blocks returned to a free list when a sequence finishes, and a
//! capacity (the blocks the store was sized for) that allocation never
//! passes: a full cache answers `None` and the scheduler preempts.
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
    /// Blocks that exist (block ids are `0..capacity`).
    pub capacity: usize,
    refcount: Vec<u32>,
    free: Vec<usize>,
}

impl PagedKvCache {
    pub fn new(block_size: usize, capacity: usize) -> Self {
        Self {
            block_size,
            capacity,
            refcount: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Blocks in use (referenced by at least one sequence).
    pub fn blocks_in_use(&self) -> usize {
        self.refcount.iter().filter(|&&r| r > 0).count()
    }

    /// Blocks a new allocation can take.
    pub fn free_blocks(&self) -> usize {
        self.capacity - self.blocks_in_use()
    }

    /// Whether the next slot of `seq` starts a new block.
    pub fn needs_block(&self, seq: &SeqCache) -> bool {
        seq.len == seq.blocks.len() * self.block_size
    }

    /// Token slots `seq` can still take: the rest of its last block and
    /// every free block.
    pub fn room(&self, seq: &SeqCache) -> usize {
        seq.blocks.len() * self.block_size - seq.len + self.free_blocks() * self.block_size
    }

    fn alloc_block(&mut self) -> Option<usize> {
        if let Some(b) = self.free.pop() {
            self.refcount[b] = 1;
            return Some(b);
        }
        if self.refcount.len() == self.capacity {
            return None;
        }
        self.refcount.push(1);
        Some(self.refcount.len() - 1)
    }

    /// Reserves the next token slot of `seq` (allocating a block when the
    /// last one is full) and returns its flat slot index; `None` (and `seq`
    /// unchanged) when that needs a block and none is free.
    pub fn push_slot(&mut self, seq: &mut SeqCache) -> Option<usize> {
        if self.needs_block(seq) {
            let b = self.alloc_block()?;
            seq.blocks.push(b);
        }
        let slot =
            seq.blocks[seq.len / self.block_size] * self.block_size + seq.len % self.block_size;
        seq.len += 1;
        Some(slot)
    }

    /// A second sequence with the same cached tokens: full blocks are
    /// shared (reference counted, never written again); the partial last
    /// block gets a new block, which the caller fills with a copy of the
    /// original's (`KvStore::copy_block`) so both can append independently.
    /// `None` when that block is not free.
    pub fn fork(&mut self, seq: &SeqCache) -> Option<SeqCache> {
        let full = seq.len / self.block_size;
        let mut blocks: Vec<usize> = seq.blocks[..full].to_vec();
        if seq.len % self.block_size != 0 {
            blocks.push(self.alloc_block()?);
        }
        for &b in &blocks[..full] {
            self.refcount[b] += 1;
        }
        Some(SeqCache {
            blocks,
            len: seq.len,
        })
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
        let mut c = PagedKvCache::new(4, 8);
        let mut a = SeqCache::default();
        let slots: Vec<usize> = (0..6).map(|_| c.push_slot(&mut a).unwrap()).collect();
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.blocks.len(), 2);
        let mut b = c.fork(&a).unwrap();
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_eq!(c.blocks_in_use(), 3);
        // Appending to the fork writes into its own block.
        let s = c.push_slot(&mut b).unwrap();
        assert_eq!(s, b.blocks[1] * 4 + 2);
        c.release(a);
        assert_eq!(c.blocks_in_use(), 2);
        c.release(b);
        assert_eq!(c.blocks_in_use(), 0);
        // A fork on a block boundary has nothing of its own.
        let mut full = SeqCache::default();
        (0..4).for_each(|_| {
            c.push_slot(&mut full).unwrap();
        });
        let g = c.fork(&full).unwrap();
        assert_eq!(g.blocks, full.blocks, "nothing to copy on a block boundary");
    }

    #[test]
    fn a_full_cache_refuses_without_changing_anything() {
        let mut c = PagedKvCache::new(2, 2);
        let mut a = SeqCache::default();
        for _ in 0..3 {
            c.push_slot(&mut a).unwrap();
        }
        assert_eq!((c.free_blocks(), c.room(&a)), (0, 1));
        c.push_slot(&mut a).unwrap();
        let before = a.clone();
        assert_eq!(c.push_slot(&mut a), None);
        assert_eq!(a, before, "a refused slot leaves the sequence as it was");
        let mut odd = SeqCache::default();
        assert_eq!(c.push_slot(&mut odd), None);
        // A fork of a partial sequence needs a block of its own.
        c.release(a);
        let mut p = SeqCache::default();
        for _ in 0..3 {
            c.push_slot(&mut p).unwrap();
        }
        assert_eq!(c.free_blocks(), 0);
        assert_eq!(c.fork(&p), None);
        assert_eq!(c.blocks_in_use(), 2, "a refused fork takes no reference");
        c.release(p);
        assert_eq!(c.blocks_in_use(), 0);
        assert_eq!(c.free_blocks(), 2);
    }
}
