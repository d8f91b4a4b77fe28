//! The reference's sequence-length balancing (verl's
//! `get_seqlen_balanced_partitions` with `equal_size`): the largest
//! differencing method (Karmarkar-Karp) over `k` parts that each hold the
//! same number of responses. It decides which responses share a TAS range
//! and mean, so it must be the same partition every time for the same
//! lengths.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One part being built: its token total and members `(index, length)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Part {
    sum: u64,
    items: Vec<(usize, u64)>,
}

impl Part {
    /// Larger sum first; then more members; then the members themselves, so
    /// the order is total and the result never depends on the sort.
    fn cmp_desc(&self, other: &Self) -> Ordering {
        other
            .sum
            .cmp(&self.sum)
            .then(other.items.len().cmp(&self.items.len()))
            .then(other.items.cmp(&self.items))
    }
}

/// A partial solution: `k` parts, kept sorted by decreasing sum.
#[derive(Debug, PartialEq, Eq)]
struct State {
    parts: Vec<Part>,
    /// Creation order: equal spreads merge first-made first, which makes
    /// the heap's choice deterministic.
    seq: usize,
}

impl State {
    fn spread(&self) -> u64 {
        self.parts[0].sum - self.parts[self.parts.len() - 1].sum
    }

    /// Pairs this state's fullest part with the other's emptiest, and so on:
    /// the difference between two states' spreads is what remains.
    fn merge(&mut self, other: State) {
        let k = self.parts.len();
        for (i, part) in other.parts.into_iter().enumerate() {
            let mine = &mut self.parts[k - 1 - i];
            mine.sum += part.sum;
            mine.items.extend(part.items);
        }
        self.parts.sort_by(Part::cmp_desc);
    }
}

impl Ord for State {
    /// The heap pops the largest spread; among equals the earliest made.
    fn cmp(&self, other: &Self) -> Ordering {
        self.spread()
            .cmp(&other.spread())
            .then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for State {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Splits the indices of `lens` into `k` parts of equal count (when `k`
/// divides `lens.len()`; otherwise the counts differ by at most one) whose
/// length totals are balanced: the largest total minus the smallest is at
/// most `max(lens) - min(lens)`. Each part's indices are ascending, the
/// order the reference reorders a batch in.
pub fn balanced_partitions(lens: &[usize], k: usize) -> Vec<Vec<usize>> {
    let k = k.max(1);
    let mut order: Vec<(u64, usize)> = lens.iter().map(|&l| (l as u64, 0)).collect();
    for (i, o) in order.iter_mut().enumerate() {
        o.1 = i;
    }
    order.sort();
    // Runs of k neighbours in sorted order: each state starts with one
    // response per part, so every part ends with the same count.
    let mut heap = BinaryHeap::new();
    for (seq, run) in order.chunks(k).enumerate() {
        let mut parts = vec![Part::default(); k];
        for (part, &(len, idx)) in parts.iter_mut().zip(run) {
            part.sum = len;
            part.items.push((idx, len));
        }
        parts.sort_by(Part::cmp_desc);
        heap.push(State { parts, seq });
    }
    let mut seq = heap.len();
    while heap.len() > 1 {
        let mut a = heap.pop().expect("two states");
        let b = heap.pop().expect("two states");
        a.merge(b);
        a.seq = seq;
        seq += 1;
        heap.push(a);
    }
    let Some(last) = heap.pop() else {
        return vec![Vec::new(); k];
    };
    last.parts
        .into_iter()
        .map(|p| {
            let mut idx: Vec<usize> = p.items.into_iter().map(|(i, _)| i).collect();
            idx.sort_unstable();
            idx
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(lens: &[usize], parts: &[Vec<usize>]) -> Vec<usize> {
        parts
            .iter()
            .map(|p| p.iter().map(|&i| lens[i]).sum())
            .collect()
    }

    /// A fixed pseudo-random length list (splitmix64), skewed like response
    /// lengths: mostly short, some long.
    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 40) as usize % 1000;
                50 + u * u / 400
            })
            .collect()
    }

    #[test]
    fn parts_have_equal_counts_balanced_sums_and_cover_every_index_once() {
        for (n, k, seed) in [(3072, 8, 1), (96, 8, 2), (40, 4, 3), (16, 1, 4), (24, 3, 5)] {
            let lens = lengths(n, seed);
            let parts = balanced_partitions(&lens, k);
            assert_eq!(parts.len(), k);
            assert!(parts.iter().all(|p| p.len() == n / k), "equal counts");
            assert!(parts.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])));
            let mut all: Vec<usize> = parts.concat();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>());
            let s = sums(&lens, &parts);
            let spread = s.iter().max().unwrap() - s.iter().min().unwrap();
            let bound = lens.iter().max().unwrap() - lens.iter().min().unwrap();
            assert!(spread <= bound, "spread {spread} over the bound {bound}");
            // Far better than the bound on many items: balanced, not just legal.
            if n >= 96 {
                assert!(spread * 10 <= bound, "spread {spread} of {bound}");
            }
            assert_eq!(parts, balanced_partitions(&lens, k), "deterministic");
        }
    }

    #[test]
    fn a_small_case_by_hand() {
        // Sorted runs of two: (1,2) (3,4) (5,9). Spreads 1, 1, 4: (5,9)
        // merges with the first-made spread-1 state (1,2): {9+1, 5+2} =
        // {10, 7}; then with (3,4): {10+3, 7+4} = {13, 11}.
        let lens = [9, 1, 5, 2, 4, 3];
        let parts = balanced_partitions(&lens, 2);
        assert_eq!(sums(&lens, &parts), vec![13, 11]);
        assert_eq!(parts, vec![vec![0, 1, 5], vec![2, 3, 4]]);
        // Uneven counts differ by one; an empty list gives empty parts.
        let parts = balanced_partitions(&[5, 5, 5], 2);
        let mut counts: Vec<usize> = parts.iter().map(Vec::len).collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![1, 2]);
        assert_eq!(balanced_partitions(&[], 3), vec![Vec::<usize>::new(); 3]);
    }
}
