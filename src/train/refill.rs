//! Dynamic sampling's refill: generation batches until the rollout batch
//! holds enough informative groups. The reference regenerates until it is
//! full (`max_try_make_batch = -1`); a cap trains on what there is after
//! that many tries. A batch whose prompts never give mixed rewards would
//! otherwise loop forever, so an uncapped refill gives up after a fixed
//! number of tries that kept no group at all.

use super::step::Rollouts;

/// How a rollout batch was filled.
pub struct Filled {
    /// `None`: the data ran out before the first generation batch.
    pub rollouts: Option<Rollouts>,
    /// Generation batches run.
    pub tries: u64,
}

impl Filled {
    pub fn groups(&self) -> usize {
        self.rollouts.as_ref().map_or(0, Rollouts::groups)
    }
}

/// Runs `generate(try)` (a generation batch, `None` at the end of the
/// data) until `want` groups are kept, `cap` tries are spent (0: no cap),
/// or, uncapped, `give_up` tries have kept no group at all. Without
/// dynamic sampling one try is enough.
pub fn fill<E>(
    want: usize,
    cap: usize,
    dynamic: bool,
    give_up: u64,
    mut generate: impl FnMut(u64) -> Result<Option<Rollouts>, E>,
) -> Result<Filled, E> {
    let mut filled = Filled {
        rollouts: None,
        tries: 0,
    };
    while cap == 0 || filled.tries < cap as u64 {
        let Some(more) = generate(filled.tries)? else {
            break;
        };
        filled.tries += 1;
        match &mut filled.rollouts {
            None => filled.rollouts = Some(more),
            Some(r) => r.append(more),
        }
        let kept = filled.groups();
        if !dynamic || kept >= want || (cap == 0 && kept == 0 && filled.tries >= give_up) {
            break;
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SequenceInput, TrainSequence};
    use crate::train::step::StepStats;

    /// A generation batch that kept `kept` groups of one response.
    fn kept(kept: usize) -> Rollouts {
        Rollouts {
            batch: vec![
                TrainSequence {
                    input: SequenceInput::default(),
                    prompt_len: 0,
                };
                kept
            ],
            advantages: vec![0.0; kept],
            lens: vec![0; kept],
            sample_ids: (0..kept).collect(),
            lp_old: Vec::new(),
            dependency: None,
            lp_ref: None,
            group_size: 1,
            stats: StepStats {
                kept_groups: kept,
                ..Default::default()
            },
        }
    }

    fn run(want: usize, cap: usize, dynamic: bool, per_try: &[usize]) -> (u64, usize) {
        let f = fill::<()>(want, cap, dynamic, 4, |t| {
            Ok(per_try.get(t as usize).map(|&k| kept(k)))
        })
        .unwrap();
        (f.tries, f.groups())
    }

    #[test]
    fn uncapped_refill_runs_until_the_batch_is_full() {
        // One informative group per try: 7 tries for 7 groups, past any cap.
        assert_eq!(run(7, 0, true, &[1; 20]), (7, 7));
        // Capped at 3: trains on 3 groups.
        assert_eq!(run(7, 3, true, &[1; 20]), (3, 3));
        // The data ends first.
        assert_eq!(run(7, 0, true, &[1, 2]), (2, 3));
        assert_eq!(run(7, 0, true, &[]), (0, 0));
        // Without dynamic sampling one generation batch is the batch.
        assert_eq!(run(7, 0, false, &[2; 20]), (1, 2));
        // Uncapped, but no group ever kept: gives up after 4 tries.
        assert_eq!(run(7, 0, true, &[0; 20]), (4, 0));
        // A slow start is not hopeless once a group is kept.
        assert_eq!(run(3, 0, true, &[0, 0, 0, 1, 0, 0, 2]), (7, 3));
    }
}
