//! Data-parallel training on the CPU with in-process ranks: 2 and 4 ranks
//! land on the weights 1 rank reaches on the same global batch, a sharded
//! checkpoint resumes at another world size, and a rank that dies stops
//! the others with an error that names it, the last checkpoint intact.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;
use vppo_engine::distributed::threads::ThreadGroup;
use vppo_engine::distributed::{Collective, DistError};
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
fn two_and_four_ranks_reach_the_weights_of_one_with_zero2_and_zero3() {
    let o = settings(&["max_steps=4"]);
    let one = run_dir("one");
    for r in run_ranks(1, &one, &o, false) {
        assert_eq!(r.unwrap().steps, 4);
    }
    let base = weights(&one);
    let reference = read_metrics(&one.join(METRICS_FILE)).unwrap();
    for (world, stage) in [(2, 2), (4, 2), (2, 3), (4, 3)] {
        let dir = run_dir(&format!("world{world}-zero{stage}"));
        let o = settings(&["max_steps=4", &format!("zero_stage={stage}")]);
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
        eprintln!("{world} ranks, ZeRO-{stage}, vs 1: weights differ by {gap:.3e} (L2, relative), {max_gap:.3e} (largest difference over largest weight)");
        assert!(gap < 1e-6, "{world} ranks, ZeRO-{stage}: {gap}");
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

/// A rank that dies (drops its handle, as a killed process closes its
/// connections) after `calls` collectives.
struct DiesAfter {
    inner: Option<ThreadGroup>,
    calls: usize,
    rank: usize,
    world: usize,
}

impl Collective for DiesAfter {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        if self.calls == 0 {
            self.inner = None;
            return Err(DistError::PeerLost { rank: self.rank });
        }
        self.calls -= 1;
        self.inner.as_mut().expect("alive").exchange(mine)
    }
}

#[test]
fn a_rank_that_dies_mid_run_stops_the_others_and_the_run_resumes_from_its_last_checkpoint() {
    // Deaths at different points: in the rollouts, the updates, a save.
    for calls in [9, 150, 400] {
        let dir = run_dir(&format!("dies{calls}"));
        let o = settings(&["max_steps=6", "save_every=1"]);
        let mut groups = ThreadGroup::new(2, Duration::from_secs(120));
        let dying = DiesAfter {
            inner: groups.pop(),
            calls,
            rank: 1,
            world: 2,
        };
        let rank0 = groups.pop().unwrap();
        let (lead, _) = std::thread::scope(|s| {
            let o = &o;
            let dir = &dir;
            let a = s.spawn(move || {
                run_as(
                    Membership::Given(Box::new(rank0)),
                    None,
                    o,
                    Some(dir),
                    false,
                    false,
                )
            });
            let b = s.spawn(move || {
                run_as(
                    Membership::Given(Box::new(dying)),
                    None,
                    o,
                    Some(dir),
                    false,
                    false,
                )
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        let err = lead.expect_err("rank 0 must stop").to_string();
        assert!(err.contains("rank 1"), "after {calls} calls: {err}");
        // The newest complete checkpoint loads, and the run resumes from
        // it to the end on 2 healthy ranks.
        let latest = latest_checkpoint(&dir)
            .unwrap()
            .expect("the warm-up's at least");
        let (_, _, state) =
            vppo_engine::train::checkpoint::load_training_checkpoint(&latest).unwrap();
        eprintln!(
            "died after {calls} collectives: last checkpoint at step {}",
            state.step
        );
        for r in run_ranks(2, &dir, &["max_steps=6".to_string()], true) {
            assert_eq!(r.unwrap().steps, 6);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// One ZeRO-2 step over 3 ranks, each holding a third of the gradient sum,
/// lands on the weights one whole AdamW step gives on the summed gradient
/// (clipping on), in fp32 and in bf16 (fp32 masters, bf16 weights).
#[test]
fn three_shards_step_like_one_whole_optimizer() {
    use vppo_engine::backend::cpu::adamw::AdamWConfig;
    use vppo_engine::model::engine::Engine;
    use vppo_engine::model::params::Tensors;
    use vppo_engine::ops::cpu::CpuBackend;
    use vppo_engine::ops::cpu_bf16::CpuBf16Backend;
    use vppo_engine::ops::{Backend, Precision};
    use vppo_engine::train::optimizer::{AdamW, WeightPrecision};
    use vppo_engine::train::zero::ShardedAdamW;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/two_images");
    let model = Qwen25Vl::load(&dir).unwrap();
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    // Rank r's gradient: a fixed pattern, different per rank.
    let grads: Vec<Tensors> = (0..3)
        .map(|r| {
            Tensors(
                model
                    .weights
                    .0
                    .iter()
                    .enumerate()
                    .map(|(t, w)| {
                        (0..w.len())
                            .map(|i| (((i * 7 + t * 3 + r * 5) % 11) as f32 - 5.0) * 1e-2)
                            .collect()
                    })
                    .collect(),
            )
        })
        .collect();

    fn sharded<B: Backend + Copy + Send>(
        be: B,
        precision: Precision,
        model: &Qwen25Vl,
        grads: &[Tensors],
        opt: &AdamW,
    ) -> Vec<Vec<f32>> {
        let groups = ThreadGroup::new(3, Duration::from_secs(60));
        std::thread::scope(|s| {
            let joins: Vec<_> = groups
                .into_iter()
                .zip(grads)
                .map(|(mut g, mine)| {
                    s.spawn(move || {
                        let mut engine = Engine::with_precision(be, model, precision).unwrap();
                        engine.grads = Some(mine.0.iter().map(|v| be.upload(v).unwrap()).collect());
                        let (rank, world) = (g.rank(), g.world_size());
                        let mut zero =
                            ShardedAdamW::from_full(opt, &model.weights, &engine, rank, world)
                                .unwrap();
                        let report = zero.step(&mut engine, &mut g).unwrap();
                        assert!(!report.skipped);
                        let mut out = model.weights.clone();
                        engine.download_weights(&mut out).unwrap();
                        out.0.concat()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        })
    }

    for precision in [Precision::Fp32, Precision::Bf16] {
        let weight_precision = match precision {
            Precision::Fp32 => WeightPrecision::Fp32,
            Precision::Bf16 => WeightPrecision::Bf16Model,
        };
        let opt = AdamW::new(&model.weights, cfg, Some(0.5), weight_precision);
        let mut whole = AdamW::new(&model.weights, cfg, Some(0.5), weight_precision);
        let mut want = model.weights.clone();
        let mut total = grads[0].clone();
        for g in &grads[1..] {
            for (a, b) in total.0.iter_mut().zip(&g.0) {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
        }
        let report = whole.step(&mut want, &mut total);
        assert!(!report.skipped);
        let want = want.0.concat();
        let got = match precision {
            Precision::Fp32 => sharded(CpuBackend, precision, &model, &grads, &opt),
            Precision::Bf16 => sharded(CpuBf16Backend, precision, &model, &grads, &opt),
        };
        for rank in got {
            let (gap, max_gap) = relative_gap(&rank, &want);
            assert!(
                gap < 1e-6 && max_gap < 1e-5,
                "{precision:?}: {gap} {max_gap}"
            );
        }
    }
}

/// ZeRO-3 on 2 in-process ranks: with the engines' weights released (every
/// buffer empty, so a unit the model forgot to gather would fail), the
/// forward gathers each unit and gives the whole model's log-probs; the
/// backward hands each unit's gradients over as it goes, and the sharded
/// step on them lands where one whole AdamW step on the ranks' summed
/// gradients does. One rank runs an idle pass after its real one, the
/// other two real ones (the same batch again): the collectives stay in
/// step, and the idle pass adds nothing.
#[test]
fn zero3_gathers_every_unit_and_matches_the_whole_model() {
    use vppo_engine::backend::cpu::adamw::AdamWConfig;
    use vppo_engine::model::acts::Save;
    use vppo_engine::model::engine::Engine;
    use vppo_engine::model::graph::GatherWeights;
    use vppo_engine::model::params::Tensors;
    use vppo_engine::model::TrainSequence;
    use vppo_engine::ops::cpu::CpuBackend;
    use vppo_engine::train::optimizer::{AdamW, WeightPrecision};
    use vppo_engine::train::zero::ShardedAdamW;

    let case = "two_images";
    let model = Qwen25Vl::load(&common::fixtures::case_dir(case)).unwrap();
    let (input, prompt_len) = common::fixtures::fixture_input(case);
    let batch = vec![TrainSequence { input, prompt_len }];
    let mut whole = Engine::new(CpuBackend, &model).unwrap();
    let want = whole.train_forward(&batch, Save::All).unwrap().logprobs;
    let d: Vec<f32> = (0..want.len()).map(|i| 1.0 + i as f32 * 0.01).collect();
    whole.train_backward(&d, &vec![0.0; d.len()]).unwrap();
    let mut grads = Tensors::zeros(&whole.layout);
    whole.take_grads(&mut grads).unwrap();
    // Rank 0 runs the batch once, rank 1 twice: 3 x the gradient.
    for g in grads.0.iter_mut() {
        g.iter_mut().for_each(|v| *v *= 3.0);
    }
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let mut want_weights = model.weights.clone();
    AdamW::new(&model.weights, cfg, None, WeightPrecision::Fp32)
        .step(&mut want_weights, &mut grads);
    let want_weights = want_weights.0.concat();

    let opt = AdamW::new(&model.weights, cfg, None, WeightPrecision::Fp32);
    let groups = ThreadGroup::new(2, Duration::from_secs(60));
    let results: Vec<(Vec<Vec<f32>>, Vec<f32>)> = std::thread::scope(|s| {
        let joins: Vec<_> = groups
            .into_iter()
            .map(|mut g| {
                let (model, batch, opt, d) = (&model, &batch, &opt, &d);
                s.spawn(move || {
                    let mut engine = Engine::new(CpuBackend, model).unwrap();
                    let (rank, world) = (g.rank(), g.world_size());
                    let mut zero =
                        ShardedAdamW::from_full(opt, &model.weights, &engine, rank, world).unwrap();
                    zero.zero3 = true;
                    zero.release(&mut engine).unwrap();
                    assert!(engine.weights.iter().all(|w| w.is_empty()));
                    let mut lps = Vec::new();
                    {
                        let gather = zero
                            .unit_source(&engine.be, &engine.layout, &mut g)
                            .unwrap()
                            .unwrap();
                        let source = &gather as &dyn GatherWeights<CpuBackend>;
                        for _ in 0..=rank {
                            let lp = engine
                                .train_forward_from(batch, Save::All, Some(source))
                                .unwrap();
                            lps.push(lp.logprobs);
                            engine
                                .train_backward_from(d, &vec![0.0; d.len()], Some(source))
                                .unwrap();
                        }
                        if rank == 0 {
                            engine.idle_pass(source).unwrap();
                        }
                        // Every unit but the first of each forward and
                        // backward came from the one gathered ahead.
                        let units =
                            engine.layout.vision.blocks.len() + engine.layout.text.layers.len();
                        assert_eq!(gather.gathered_ahead(), 2 * 2 * (units - 1));
                    }
                    let report = zero.step(&mut engine, &mut g).unwrap();
                    assert!(!report.skipped);
                    zero.materialize(&mut engine, &mut g).unwrap();
                    let mut out = model.weights.clone();
                    engine.download_weights(&mut out).unwrap();
                    (lps, out.0.concat())
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (lps, weights) in results {
        for lp in lps {
            assert_eq!(lp, want, "the gathered weights are the whole weights");
        }
        let (gap, max_gap) = relative_gap(&weights, &want_weights);
        assert!(gap < 1e-6 && max_gap < 1e-5, "{gap} {max_gap}");
    }
}

/// bf16 weights over fp32 masters: 2 ranks with ZeRO-3 take the steps 1
/// rank takes (the bf16 weights gathered from the ranks' rounded shards).
#[test]
fn bf16_zero3_on_two_ranks_follows_one_rank() {
    let one = run_dir("bf16-one");
    let two = run_dir("bf16-two");
    let o = |extra: &str| settings(&["max_steps=2", "precision=bf16", extra]);
    for r in run_ranks(1, &one, &o("zero_stage=2"), false) {
        r.unwrap();
    }
    for r in run_ranks(2, &two, &o("zero_stage=3"), false) {
        r.unwrap();
    }
    let (a, b) = (
        read_metrics(&two.join(METRICS_FILE)).unwrap(),
        read_metrics(&one.join(METRICS_FILE)).unwrap(),
    );
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.reward_mean, y.reward_mean);
        assert!(
            (x.loss - y.loss).abs() <= 1e-4 * y.loss.abs().max(1e-3),
            "{x:?} {y:?}"
        );
    }
    let (gap, _) = relative_gap(&weights(&two), &weights(&one));
    eprintln!("bf16, 2 ranks ZeRO-3 vs 1: weights differ by {gap:.3e} (L2, relative)");
    assert!(gap < 1e-6, "{gap}");
    std::fs::remove_dir_all(&one).unwrap();
    std::fs::remove_dir_all(&two).unwrap();
}
