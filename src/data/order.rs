//! The order rows are trained in, as the reference's data loader gives
//! them: a fresh shuffle every epoch from the seed (its `RandomSampler`),
//! the last incomplete rollout batch of each epoch dropped (`drop_last`).
//! A pure function of (seed, epoch, position), so `--resume` at a position
//! continues the same order without reading what came before.

/// Rows of a data set in training order, epoch after epoch.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    rows: u64,
    epoch_len: u64,
    shuffle: bool,
    seed: u64,
    /// The permutation of the last epoch asked for.
    cached: Option<(u64, Vec<u64>)>,
}

impl EpochOrder {
    /// `batch`: positions per epoch are the largest multiple of it that fits
    /// (all rows when there are fewer than `batch`; 0 or 1 keeps all).
    pub fn new(rows: u64, batch: u64, shuffle: bool, seed: u64) -> Self {
        let epoch_len = if batch > 1 && rows >= batch {
            rows / batch * batch
        } else {
            rows
        };
        Self {
            rows,
            epoch_len,
            shuffle,
            seed,
            cached: None,
        }
    }

    /// Positions in one epoch.
    pub fn epoch_len(&self) -> u64 {
        self.epoch_len
    }

    /// The global row at `position` (counted over all epochs).
    pub fn row(&mut self, position: u64) -> u64 {
        let epoch_len = self.epoch_len.max(1);
        let (epoch, k) = (position / epoch_len, position % epoch_len);
        if !self.shuffle {
            return k;
        }
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, permutation(self.rows, self.seed, epoch)));
        }
        self.cached.as_ref().expect("cached above").1[k as usize]
    }
}

/// splitmix64: a small, well-mixed generator; the order only has to be
/// reproducible, not the reference's torch generator.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform permutation of `0..n` for (seed, epoch): Fisher-Yates with
/// unbiased bounded draws.
pub fn permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut state = seed ^ 0x5851_F42D_4C95_7F2D;
    state = next(&mut state) ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut p: Vec<u64> = (0..n).collect();
    for i in (1..n as usize).rev() {
        let bound = i as u64 + 1;
        // Rejection keeps every index equally likely.
        let zone = u64::MAX - u64::MAX % bound;
        let j = loop {
            let x = next(&mut state);
            if x < zone {
                break x % bound;
            }
        };
        p.swap(i, j as usize);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_fresh_shuffle_of_every_row_and_repeats_per_seed() {
        let mut order = EpochOrder::new(10, 1, true, 1);
        let epoch = |o: &mut EpochOrder, e: u64| -> Vec<u64> {
            (0..10).map(|k| o.row(e * 10 + k)).collect()
        };
        let (e0, e1) = (epoch(&mut order, 0), epoch(&mut order, 1));
        for e in [&e0, &e1] {
            let mut sorted = e.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(e0, (0..10).collect::<Vec<_>>(), "shuffled");
        assert_ne!(e0, e1, "reshuffled every epoch");
        // A fresh order (a resumed run) at any position agrees.
        let mut again = EpochOrder::new(10, 1, true, 1);
        assert_eq!(again.row(13), e1[3]);
        assert_eq!(again.row(2), e0[2]);
        let mut other = EpochOrder::new(10, 1, true, 2);
        assert_ne!(epoch(&mut other, 0), e0, "another seed, another order");
        // Unshuffled: file order.
        let mut plain = EpochOrder::new(10, 1, false, 1);
        assert_eq!(epoch(&mut plain, 1), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn the_last_incomplete_batch_of_an_epoch_is_dropped() {
        // 10 rows, batches of 4: 8 positions an epoch, the rest never seen
        // in that epoch (a different rest each epoch when shuffled).
        let mut order = EpochOrder::new(10, 4, false, 1);
        assert_eq!(order.epoch_len(), 8);
        assert_eq!((order.row(7), order.row(8)), (7, 0));
        let mut shuffled = EpochOrder::new(10, 4, true, 1);
        let first: Vec<u64> = (0..8).map(|k| shuffled.row(k)).collect();
        let mut distinct = first.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 8);
        // Fewer rows than a batch: the epoch is every row.
        assert_eq!(EpochOrder::new(3, 4, false, 1).epoch_len(), 3);
    }

    #[test]
    fn permutations_are_uniform_enough() {
        // Over 4000 shuffles of 4, each row lands first about 1/4 of the time.
        let mut first = [0usize; 4];
        for e in 0..4000 {
            first[permutation(4, 7, e)[0] as usize] += 1;
        }
        assert!(first.iter().all(|&c| (850..1150).contains(&c)), "{first:?}");
    }
}
