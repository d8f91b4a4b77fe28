//! Continuous batching (chunked prefill mixed into decode steps, seats
//! refilled as samples finish, preemption under a small KV budget) against
//! an independent reference: each sample decoded alone by full forwards of
//! its whole sequence (no KV cache, no paging, no batching), drawing from
//! the same `(seed, prompt, sample)` stream.

mod common;

use common::fixtures::{case_dir, fixture_input};
use vppo_engine::model::engine::Engine;
use vppo_engine::model::{ModelError, Qwen25Vl, SequenceInput};
use vppo_engine::ops::cpu::{sample_row, CpuBackend};
use vppo_engine::ops::cpu_bf16::CpuBf16Backend;
use vppo_engine::ops::Precision;
use vppo_engine::rollout::decode_graph::{row_bucket, DecodeMode};
use vppo_engine::rollout::generate::{draw_uniform, FinishReason, Generator, KvBudget, Sample};
use vppo_engine::rollout::sampling::{sample_rng, SamplingParams};
use vppo_engine::rollout::scheduler::ScheduleConfig;

const CASE: &str = "resize";
const N: usize = 3;

/// The fixture's prompt (130 tokens, three images) and two text-only
/// prompts cut from its text after the last image.
fn prompts() -> Vec<SequenceInput> {
    let (mut full, prompt_len) = fixture_input(CASE);
    full.ids.truncate(prompt_len);
    let vision_end = 370;
    let tail_start = full.ids.iter().rposition(|&t| t == vision_end).unwrap() + 1;
    let text = |skip: usize| SequenceInput {
        ids: full.ids[tail_start + skip..].to_vec(),
        pixel_values: Vec::new(),
        grids: Vec::new(),
        resized: Vec::new(),
        loaded: Vec::new(),
    };
    let (a, b) = (text(0), text(9));
    assert!(a.ids.len() > 20 && b.ids.len() > 10);
    vec![a, full, b]
}

/// Sample (p, s) alone: at each step a full forward of prompt + tokens so
/// far, the last row's logits, the sampler's draw from its own stream.
fn reference(
    model: &Qwen25Vl,
    prompt: &SequenceInput,
    key: (usize, usize),
    params: &SamplingParams,
    seed: u64,
    eos: &[u32],
    max_new: usize,
) -> (Vec<u32>, Vec<f32>, FinishReason) {
    let banned = [
        model.config.tokens.image_token_id,
        model.config.tokens.video_token_id,
    ];
    let mut rng = sample_rng(seed, key.0, key.1);
    let mut input = prompt.clone();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    loop {
        let out = model.forward(&input).unwrap();
        let logits = model.logits(&out, &[input.ids.len() - 1]);
        let u = draw_uniform(params, &mut rng);
        let (t, lp) = sample_row(&logits, params, &banned, u);
        tokens.push(t);
        logprobs.push(lp);
        input.ids.push(t);
        if eos.contains(&t) {
            return (tokens, logprobs, FinishReason::Stop);
        }
        if tokens.len() == max_new {
            return (tokens, logprobs, FinishReason::Length);
        }
    }
}

fn check_against_reference(
    model: &Qwen25Vl,
    prompts: &[SequenceInput],
    out: &[Sample],
    params: &SamplingParams,
    seed: u64,
    eos: &[u32],
    max_new: usize,
) {
    // No sample lost or duplicated, in (prompt, sample) order.
    let keys: Vec<(usize, usize)> = out
        .iter()
        .map(|s| (s.prompt_index, s.sample_index))
        .collect();
    let want: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|p| (0..N).map(move |s| (p, s)))
        .collect();
    assert_eq!(keys, want);
    for s in out {
        let (p, i) = (s.prompt_index, s.sample_index);
        let (tokens, logprobs, reason) =
            reference(model, &prompts[p], (p, i), params, seed, eos, max_new);
        assert_eq!(s.token_ids, tokens, "sample ({p}, {i}): tokens");
        assert_eq!(s.finish_reason, reason, "sample ({p}, {i})");
        let d = s
            .logprobs
            .iter()
            .zip(&logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-4, "sample ({p}, {i}): log-probs differ by {d}");
    }
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 0,
    }
}

/// Four sequences at once, 24 rows a step: the 130-token prompt takes six
/// chunks, prefilled while the text prompts' samples decode.
fn small_schedule() -> ScheduleConfig {
    ScheduleConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 24,
    }
}

#[test]
fn chunked_continuous_batching_matches_each_sample_decoded_alone() {
    let model = Qwen25Vl::load(&case_dir(CASE)).unwrap();
    let engine = Engine::new(CpuBackend, &model).unwrap();
    let prompts = prompts();
    let seed = 11;
    // Pick an end-of-sequence id that some samples meet early, so lengths
    // differ and seats free at different steps.
    let probe = reference(&model, &prompts[0], (0, 0), &sampled(), seed, &[], 10).0;
    let eos = vec![probe[3]];
    for params in [
        sampled(),
        SamplingParams {
            temperature: 0.0,
            ..sampled()
        },
    ] {
        let mut generator = Generator::new(&engine, eos.clone());
        generator.schedule = small_schedule();
        let out = generator.generate(&prompts, N, &params, 10, seed).unwrap();
        check_against_reference(&model, &prompts, &out, &params, seed, &eos, 10);
        assert_eq!(generator.cache_blocks_in_use(), 0);
        assert_eq!(
            generator.stats.preemptions, 0,
            "the default budget never preempts"
        );
        // The trace: prefill chunks and decode rows share steps, every step
        // within the limits, each prompt's chunks cover it once, in order.
        let trace = &generator.trace;
        let mixed = trace
            .iter()
            .filter(|t| t.decode_rows > 0 && !t.chunks.is_empty())
            .count();
        assert!(
            mixed >= 2,
            "{mixed} steps mixed prefill chunks and decode rows: {trace:?}"
        );
        for t in trace {
            let rows = t.decode_rows + t.chunks.iter().map(|c| c.2 - c.1).sum::<usize>();
            assert!(rows <= 24 && t.decode_rows + t.chunks.len() <= 4, "{t:?}");
        }
        for (p, prompt) in prompts.iter().enumerate() {
            let spans: Vec<(usize, usize)> = trace
                .iter()
                .flat_map(|t| &t.chunks)
                .filter(|c| c.0 == p)
                .map(|c| (c.1, c.2))
                .collect();
            assert_eq!(spans.first().map(|s| s.0), Some(0));
            assert!(
                spans.windows(2).all(|w| w[0].1 == w[1].0),
                "prompt {p}: {spans:?}"
            );
            assert_eq!(spans.last().map(|s| s.1), Some(prompt.ids.len()));
        }
        assert_eq!(generator.stats.prefills, 3);
        assert_eq!(
            generator.stats.images_encoded, 3,
            "one vision pass per image"
        );
    }
}

#[test]
fn a_small_kv_budget_preempts_and_recomputes_with_the_same_samples() {
    let model = Qwen25Vl::load(&case_dir(CASE)).unwrap();
    let engine = Engine::new(CpuBackend, &model).unwrap();
    let mut prompts = prompts();
    prompts.swap(0, 1);
    let (seed, max_new) = (5, 24);
    let params = sampled();
    let mut generator = Generator::new(&engine, vec![]);
    generator.schedule = small_schedule();
    // (130 + 24) / 16 -> 10 blocks, +1 for a fork's copy: the least that
    // holds one sequence, so four in flight must preempt.
    generator.kv_budget = KvBudget::Blocks(11);
    let out = generator
        .generate(&prompts, N, &params, max_new, seed)
        .unwrap();
    let stats = generator.stats;
    assert!(stats.preemptions > 0, "{stats:?}");
    assert!(stats.recomputed_tokens > 0, "{stats:?}");
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    assert_eq!(stats.prefill_tokens, prompt_tokens, "{stats:?}");
    // Decoding samples themselves were preempted and restored: a prefill
    // past a prompt's end recomputes generated tokens.
    let resumed = generator
        .trace
        .iter()
        .flat_map(|t| &t.chunks)
        .filter(|c| c.2 > prompts[c.0].ids.len())
        .count();
    assert!(resumed > 0, "{stats:?}");
    assert_eq!(generator.cache_blocks_in_use(), 0);
    check_against_reference(&model, &prompts, &out, &params, seed, &[], max_new);
    // Too small for even one sequence: a clear error, not a crash or hang.
    generator.kv_budget = KvBudget::Blocks(10);
    let err = generator
        .generate(&prompts, N, &params, max_new, seed)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::KvCacheTooSmall {
                need: 11,
                have: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_new_tokens"));
    // Bad limits are refused.
    generator.kv_budget = KvBudget::Unbounded;
    generator.schedule = ScheduleConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 4,
    };
    let err = generator
        .generate(&prompts, N, &params, max_new, seed)
        .unwrap_err();
    assert!(matches!(err, ModelError::ScheduleLimits { .. }), "{err}");
}

/// Decode-only steps padded to row buckets (the path CUDA graphs replay;
/// the CPU runs it op by op) give every sample what eager steps give, and
/// what the sample decoded alone gives: padding rows write and read only
/// their own cache block. Under preemption (4 seats, 3 samples decoding
/// -> 4 rows) and with every sample at once (9 rows -> 16).
#[test]
fn padded_decode_steps_give_the_samples_of_eager_steps() {
    let model = Qwen25Vl::load(&case_dir(CASE)).unwrap();
    let engine = Engine::new(CpuBackend, &model).unwrap();
    let prompts = prompts();
    let (seed, max_new) = (9, 14);
    let params = sampled();
    let cases = [
        (small_schedule(), KvBudget::Blocks(11)),
        (
            ScheduleConfig {
                max_num_seqs: 9,
                max_num_batched_tokens: 200,
            },
            KvBudget::Unbounded,
        ),
    ];
    for (schedule, budget) in cases {
        let run = |mode: DecodeMode| {
            let mut generator = Generator::new(&engine, vec![]);
            assert_eq!(
                generator.decode_mode,
                DecodeMode::Eager,
                "the CPU captures nothing, so it defaults to eager steps"
            );
            generator.decode_mode = mode;
            generator.schedule = schedule;
            generator.kv_budget = budget;
            let out = generator
                .generate(&prompts, N, &params, max_new, seed)
                .unwrap();
            (out, generator.stats, generator.trace.clone())
        };
        let (eager, eager_stats, _) = run(DecodeMode::Eager);
        let (padded, stats, trace) = run(DecodeMode::Graphs);
        assert_eq!(eager_stats.bucketed_steps, 0);
        let decode_only = trace
            .iter()
            .filter(|t| t.chunks.is_empty() && t.decode_rows > 0)
            .count();
        assert!(decode_only > 0);
        assert_eq!(stats.bucketed_steps, decode_only, "{stats:?}");
        assert_eq!((stats.graphs_captured, stats.graph_replays), (0, 0));
        assert!(
            trace
                .iter()
                .any(|t| t.chunks.is_empty() && row_bucket(t.decode_rows) > t.decode_rows),
            "some step pads rows"
        );
        if budget != KvBudget::Unbounded {
            assert!(stats.preemptions > 0, "{stats:?}");
        }
        for (a, b) in eager.iter().zip(&padded) {
            assert_eq!(a.token_ids, b.token_ids);
            assert_eq!(a.logprobs, b.logprobs);
            assert_eq!(a.finish_reason, b.finish_reason);
        }
        check_against_reference(&model, &prompts, &padded, &params, seed, &[], max_new);
    }
}

/// The padded path in bf16 storage (the bf16 twin, as the GPU's bf16
/// decode stores): the bucket's logits take the head's storage, and the
/// samples are the eager steps' bit for bit.
#[test]
fn padded_decode_steps_in_bf16_give_the_samples_of_eager_steps() {
    let model = Qwen25Vl::load(&case_dir(CASE)).unwrap();
    let engine = Engine::with_precision(CpuBf16Backend, &model, Precision::Bf16).unwrap();
    let prompts = prompts();
    let run = |mode: DecodeMode| {
        let mut generator = Generator::new(&engine, vec![]);
        generator.decode_mode = mode;
        generator.schedule = ScheduleConfig {
            max_num_seqs: 9,
            max_num_batched_tokens: 200,
        };
        let out = generator.generate(&prompts, N, &sampled(), 8, 4).unwrap();
        (out, generator.stats)
    };
    let (eager, _) = run(DecodeMode::Eager);
    let (padded, stats) = run(DecodeMode::Graphs);
    assert!(stats.bucketed_steps > 0, "{stats:?}");
    for (a, b) in eager.iter().zip(&padded) {
        assert_eq!(a.token_ids, b.token_ids);
        assert_eq!(a.logprobs, b.logprobs);
    }
}

/// `generate --max-num-seqs 1 --max-num-batched-tokens 8 --kv-cache-blocks`:
/// one sequence at a time, 8-token chunks, a cache for one sequence: the
/// same JSON lines as the defaults (everything at once).
#[test]
fn cli_limits_change_the_schedule_not_the_samples() {
    let dir = case_dir("single_noresize");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
            .args(["generate", "--model", dir.to_str().unwrap()])
            .args(["--image", dir.join("img0.png").to_str().unwrap()])
            .args(["--prompt", "<image>What is shown?", "--n", "3"])
            .args(["--max-new-tokens", "6", "--seed", "4", "--device", "cpu"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (all_at_once, _) = run(&[]);
    let tight = [
        "--max-num-seqs",
        "1",
        "--max-num-batched-tokens",
        "8",
        "--kv-cache-blocks",
        "8",
    ];
    let (one_by_one, stderr) = run(&tight);
    assert_eq!(all_at_once.lines().count(), 3);
    assert_eq!(one_by_one, all_at_once);
    assert!(stderr.contains("1 prefill(s)"), "{stderr}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
        ])
        .args(["--max-num-seqs", "8", "--max-num-batched-tokens", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("--max-num-seqs"),
        "{stderr}"
    );
}
