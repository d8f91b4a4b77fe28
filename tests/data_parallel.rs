//! Data-parallel training on the CPU with in-process ranks: 2 and 4 ranks
//! land on the weights 1 rank reaches on the same global batch, a sharded
//! checkpoint resumes at another world size, and a rank that leaves stops
//! the others with an error that names it, the last checkpoint intact.

use std::path::{Path, PathBuf};
use std::time::Duration;
use vppo_engine::distributed::threads::ThreadGroup;
use vppo_engine::distributed::Collective;
use vppo_engine::model::Qwen25Vl;
use vppo_engine::train::checkpoint::latest_checkpoint;
use vppo_engine::train::metrics::read_metrics;
use vppo_engine::train::run::{run_as, Membership, RunError, RunSummary, METRICS_FILE};

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vppo-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The built-in task, small: 4 prompts x 4 responses per rollout batch,
/// steps of 2 groups in micro-batches of 2 responses (4 per step, so every
/// rank of 4 has one).
fn settings(extra: &[&str]) -> Vec<String> {
    let mut o: Vec<String> = [
        "warmup_steps=60",
        "warmup_batch=16",
        "rollout_batch=4",
        "mini_batch=2",
        "group_size=4",
        "micro_batch=2",
        "tas_partitions=2",
        "save_every=2",
        "collective_timeout_s=300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// Runs `world` in-process ranks (threads) on `dir`; every rank's result.
fn run_ranks(
    world: usize,
    dir: &Path,
    overrides: &[String],
    resume: bool,
) -> Vec<Result<RunSummary, RunError>> {
    let groups = ThreadGroup::new(world, Duration::from_secs(300));
    std::thread::scope(|s| {
        let joins: Vec<_> = groups
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    run_as(
                        Membership::Given(Box::new(g)),
                        None,
                        overrides,
                        Some(dir),
                        resume,
                        false,
                    )
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn weights(dir: &Path) -> Vec<f32> {
    let latest = latest_checkpoint(dir).unwrap().expect("a checkpoint");
    Qwen25Vl::load(&latest).unwrap().weights.0.concat()
}

/// ||a - b|| / ||b|| (L2 over every weight), and max |a - b| / max |b|.
fn relative_gap(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut d2, mut b2, mut dmax, mut bmax) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y) as f64;
        d2 += d * d;
        b2 += (y as f64) * (y as f64);
        dmax = dmax.max(d.abs());
        bmax = bmax.max((y as f64).abs());
    }
    ((d2 / b2).sqrt(), dmax / bmax)
}

#[test]
fn two_and_four_ranks_reach_the_weights_of_one() {
    let o = settings(&["max_steps=4"]);
    let one = run_dir("one");
    for r in run_ranks(1, &one, &o, false) {
        assert_eq!(r.unwrap().steps, 4);
    }
    let base = weights(&one);
    let reference = read_metrics(&one.join(METRICS_FILE)).unwrap();
    for world in [2, 4] {
        let dir = run_dir(&format!("world{world}"));
        for r in run_ranks(world, &dir, &o, false) {
            assert_eq!(r.unwrap().steps, 4);
        }
        for (a, b) in read_metrics(&dir.join(METRICS_FILE))
            .unwrap()
            .iter()
            .zip(&reference)
        {
            eprintln!(
                "step {}: reward {} vs {}, loss {:e} vs {:e}, grad norm {:e} vs {:e}",
                a.step, a.reward_mean, b.reward_mean, a.loss, b.loss, a.grad_norm, b.grad_norm
            );
        }
        let (gap, max_gap) = relative_gap(&weights(&dir), &base);
        eprintln!("{world} ranks vs 1: weights differ by {gap:.3e} (L2, relative), {max_gap:.3e} (largest difference over largest weight)");
        assert!(gap < 1e-6, "{world} ranks: {gap}");
        let metrics = read_metrics(&dir.join(METRICS_FILE)).unwrap();
        assert_eq!(metrics.len(), reference.len());
        for (a, b) in metrics.iter().zip(&reference) {
            // The same rollouts (tokens and rewards) and the same loss to
            // rounding: the ranks split the work, not the math.
            assert_eq!(a.reward_mean, b.reward_mean);
            assert_eq!(a.groups, b.groups);
            assert!(
                (a.loss - b.loss).abs() <= 1e-4 * b.loss.abs().max(1e-3),
                "{a:?} {b:?}"
            );
        }
        // Each rank wrote its optimizer shard; rank 0 the weights.
        let latest = latest_checkpoint(&dir).unwrap().unwrap();
        for r in 0..world {
            let shard = latest.join(format!("optimizer-rank{r:05}-of-{world:05}.safetensors"));
            assert!(shard.is_file(), "{}", shard.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&one).unwrap();
}

#[test]
fn a_checkpoint_saved_at_four_ranks_resumes_at_two_and_continues_identically() {
    let whole = run_dir("whole4");
    for r in run_ranks(4, &whole, &settings(&["max_steps=6"]), false) {
        r.unwrap();
    }
    let split = run_dir("split4to2");
    for r in run_ranks(4, &split, &settings(&["max_steps=4"]), false) {
        r.unwrap();
    }
    for r in run_ranks(2, &split, &["max_steps=6".to_string()], true) {
        assert_eq!(r.unwrap().steps, 6);
    }
    let (gap, max_gap) = relative_gap(&weights(&split), &weights(&whole));
    eprintln!("4 ranks, resumed at 2, vs 4 ranks throughout: weights differ by {gap:.3e} (L2, relative), {max_gap:.3e} (largest)");
    assert!(gap < 1e-6, "{gap}");
    let (a, b) = (
        read_metrics(&split.join(METRICS_FILE)).unwrap(),
        read_metrics(&whole.join(METRICS_FILE)).unwrap(),
    );
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.reward_mean, y.reward_mean);
    }
    // A sharded checkpoint also resumes in one process.
    let latest = latest_checkpoint(&split).unwrap().unwrap();
    let (_, optimizer, state) =
        vppo_engine::train::checkpoint::load_training_checkpoint(&latest).unwrap();
    assert_eq!(state.step, 6);
    assert!(optimizer.exp_avg_sq.0.iter().flatten().any(|&v| v > 0.0));
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&split).unwrap();
}

#[test]
fn a_rank_that_leaves_stops_the_others_naming_it_and_the_checkpoint_survives() {
    let dir = run_dir("leaver");
    for r in run_ranks(2, &dir, &settings(&["max_steps=2"]), false) {
        r.unwrap();
    }
    let before = latest_checkpoint(&dir).unwrap().unwrap();
    let weights_before = weights(&dir);
    // Resume on 2 ranks, but rank 1 leaves at once (its process died).
    let mut groups = ThreadGroup::new(2, Duration::from_secs(60));
    drop(groups.pop());
    let rank0 = groups.pop().unwrap();
    assert_eq!(rank0.rank(), 0);
    let err = run_as(
        Membership::Given(Box::new(rank0)),
        None,
        &["max_steps=6".to_string()],
        Some(&dir),
        true,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 1"), "{err}");
    assert_eq!(latest_checkpoint(&dir).unwrap().unwrap(), before);
    assert_eq!(weights(&dir), weights_before);
    std::fs::remove_dir_all(&dir).unwrap();
}
