//! An in-process group: ranks are threads of one process (tests, and
//! multi-rank runs of the CPU backend without separate processes).

use super::{Collective, DistError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Round {
    /// Bumped each time a round completes.
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's messages, read by its waiters.
    published: Arc<Vec<Vec<u8>>>,
    /// The first rank whose handle was dropped: the one to blame, not the
    /// ranks that stopped because of it.
    first_gone: Option<usize>,
}

struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
    timeout: Duration,
}

/// One rank's handle; [`ThreadGroup::new`] makes all of them.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles for ranks `0..world_size`, to move into one thread each.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                generation: 0,
                slots: vec![None; world_size],
                published: Arc::new(Vec::new()),
                first_gone: None,
            }),
            changed: Condvar::new(),
            timeout,
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock leaves consistent
        // state (every update is a single assignment), so keep going.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.lock().slots.len()
    }

    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let deadline = Instant::now() + self.shared.timeout;
        let mut round = self.lock();
        if let Some(rank) = round.first_gone {
            return Err(DistError::PeerLost { rank });
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(mine.to_vec());
        if round.slots.iter().all(Option::is_some) {
            let all: Vec<Vec<u8>> = round
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            round.published = Arc::new(all);
            round.generation += 1;
            self.shared.changed.notify_all();
            return Ok(round.published.as_ref().clone());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                let ranks = round
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r)
                    .collect();
                // Withdraw, so a late peer does not complete a round this
                // rank has given up on.
                round.slots[self.rank] = None;
                return Err(DistError::Timeout {
                    ranks,
                    timeout: self.shared.timeout,
                });
            }
            round = self
                .shared
                .changed
                .wait_timeout(round, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            if round.generation != generation {
                return Ok(round.published.as_ref().clone());
            }
            if let Some(rank) = round.first_gone {
                round.slots[self.rank] = None;
                return Err(DistError::PeerLost { rank });
            }
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        let mut round = self.lock();
        round.first_gone.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(
        world: usize,
        f: impl Fn(ThreadGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::new(world, Duration::from_secs(10))
            .into_iter()
            .map(|g| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(g))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    #[test]
    fn all_reduce_adds_in_rank_order_and_every_rank_holds_the_same_bits() {
        let initial = |r: usize| {
            let r = r as f32;
            [1e8 * (r - 1.5) + 0.3, 1.0 + r / 7.0, 0.1 * r]
        };
        let results = run(4, move |mut g| {
            let mut buf = initial(g.rank()).to_vec();
            for _ in 0..3 {
                g.all_reduce_sum(&mut buf).unwrap();
            }
            buf
        });
        // The same three rounds added sequentially in rank order.
        let mut bufs: Vec<[f32; 3]> = (0..4).map(initial).collect();
        for _ in 0..3 {
            let mut sum = [0f32; 3];
            for b in &bufs {
                for i in 0..3 {
                    sum[i] += b[i];
                }
            }
            bufs = vec![sum; 4];
        }
        for got in &results {
            assert_eq!(got.as_slice(), bufs[0].as_slice());
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce() {
        let results = run(3, |mut g| {
            let input: Vec<f32> = (0..6).map(|i| (i * (g.rank() + 1)) as f32).collect();
            let mut shard = vec![0.0; 2];
            g.reduce_scatter_sum(&input, &mut shard).unwrap();
            let mut gathered = vec![0.0; 6];
            g.all_gather(&shard, &mut gathered).unwrap();
            let mut reduced = input.clone();
            g.all_reduce_sum(&mut reduced).unwrap();
            (shard, gathered, reduced)
        });
        // Sum over ranks of i * (r + 1) = 6 i.
        let want: Vec<f32> = (0..6).map(|i| 6.0 * i as f32).collect();
        for (rank, (shard, gathered, reduced)) in results.iter().enumerate() {
            assert_eq!(shard.as_slice(), &want[rank * 2..rank * 2 + 2]);
            assert_eq!(gathered, &want);
            assert_eq!(reduced, &want);
        }
    }

    #[test]
    fn broadcast_and_f64_sums_reach_every_rank() {
        let results = run(3, |mut g| {
            let mut b = vec![g.rank() as f32; 2];
            g.broadcast(&mut b, 2).unwrap();
            let mut m = vec![g.rank() as f64 + 0.5];
            g.all_reduce_sum_f64(&mut m).unwrap();
            g.barrier().unwrap();
            (b, m)
        });
        for (b, m) in results {
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(m, vec![4.5]);
        }
    }

    #[test]
    fn a_rank_that_leaves_stops_the_others_with_its_number() {
        let results = run(3, |mut g| {
            if g.rank() == 1 {
                return None; // dropped: its process "exited"
            }
            let mut buf = vec![1.0];
            Some(g.all_reduce_sum(&mut buf))
        });
        for r in results.into_iter().flatten() {
            assert_eq!(r, Err(DistError::PeerLost { rank: 1 }));
        }
    }

    #[test]
    fn a_rank_that_hangs_is_named_after_the_timeout() {
        let mut groups = ThreadGroup::new(2, Duration::from_millis(200));
        let hung = groups.pop().unwrap(); // rank 1 never calls
        let mut g0 = groups.pop().unwrap();
        let err = g0.barrier().unwrap_err();
        assert!(
            matches!(&err, DistError::Timeout { ranks, .. } if ranks == &vec![1]),
            "{err}"
        );
        assert!(err.to_string().contains("collective_timeout_s"), "{err}");
        drop(hung);
    }

    #[test]
    fn ranks_that_disagree_on_a_size_get_an_error_not_garbage() {
        let results = run(2, |mut g| {
            let mut buf = vec![0.0; 2 + g.rank()];
            g.all_reduce_sum(&mut buf)
        });
        for r in results {
            assert!(matches!(r, Err(DistError::SizeMismatch { .. })), "{r:?}");
        }
    }
}
