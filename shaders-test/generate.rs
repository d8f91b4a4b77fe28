//! The generator on the CUDA backend against the same generator on the CPU
//! backend on the committed fixtures: greedy ids identical and log-probs
//! within 1e-3; sampled log-probs against scoring the same tokens with the
//! device forward; prefill forks and batching across prompts of different
//! lengths; every KV block returned at the end.

use super::model::{fixture_dir, fixture_request, max_abs, NO_CUBLAS};
use super::{cuda, Case};
use vppo_engine::backend::cuda::{blas_present, CudaBackend};
use vppo_engine::model::engine::Engine;
use vppo_engine::model::{SequenceInput, TrainSequence};
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::ops::Precision;
use vppo_engine::pipeline::Pipeline;
use vppo_engine::rollout::generate::{
    eos_ids, GenerationStats, Generator, KvBudget, RolloutLimits, Sample,
};
use vppo_engine::rollout::sampling::SamplingParams;
use vppo_engine::rollout::scheduler::ScheduleConfig;

/// Generated log-probs: the device decode against the CPU decode.
const GEN_LOGPROB_TOL: f32 = 1e-3;

const GREEDY: SamplingParams = SamplingParams {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
};

/// The fixture's pipeline, its prompt (with images) and a text-only prompt
/// of another length, so a batch mixes prompt lengths and rope deltas.
fn prompts(case: &str) -> Result<(Pipeline, Vec<SequenceInput>), String> {
    let (dir, prompt, images, response) = fixture_request(case)?;
    let pipe = Pipeline::load(&dir).map_err(|e| e.to_string())?;
    let (mut input, prompt_len) = pipe
        .prepare(&images, &prompt, &response)
        .map_err(|e| e.to_string())?;
    input.ids.truncate(prompt_len);
    let text = pipe
        .prompt_input(&[], "How many shapes are there? Count them.")
        .map_err(|e| e.to_string())?;
    Ok((pipe, vec![input, text]))
}

fn device_model(pipe: &Pipeline) -> Result<Engine<CudaBackend>, String> {
    let gpu = CudaBackend::new(0).map_err(cuda)?;
    Engine::new(gpu, &pipe.model).map_err(|e| e.to_string())
}

fn cpu_model(pipe: &Pipeline) -> Result<Engine<CpuBackend>, String> {
    Engine::new(CpuBackend, &pipe.model).map_err(|e| e.to_string())
}

fn describe(s: &Sample) -> String {
    format!(
        "prompt {} sample {}: {:?} ({:?})",
        s.prompt_index, s.sample_index, s.token_ids, s.finish_reason
    )
}

/// Greedy: the device samples must be the CPU's, token for token.
fn greedy_case(case: &'static str) -> Case {
    greedy_case_with(case, None)
}

/// Greedy with the device generator under `limits` (chunked prefill, few
/// seats, a KV budget that preempts) against the CPU one with the defaults.
fn greedy_case_with(case: &'static str, limits: Option<RolloutLimits>) -> Case {
    let label = if limits.is_some() {
        " (device: 2 seats, 24-row steps, 12 KV blocks)"
    } else {
        ""
    };
    Case {
        name: format!("generate greedy device vs cpu fixture {case}{label}"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let (pipe, prompts) = prompts(case)?;
            let eos = eos_ids(&fixture_dir(case));
            let (n, max_new, seed) = (2, 24, 5);
            let host = cpu_model(&pipe)?;
            let mut cpu = Generator::new(&host, eos.clone());
            let want = cpu
                .generate(&prompts, n, &GREEDY, max_new, seed)
                .map_err(|e| e.to_string())?;
            let dev = device_model(&pipe)?;
            let mut gen = Generator::new(&dev, eos);
            if let Some(limits) = limits {
                gen = gen.with_limits(limits);
            }
            let got = gen
                .generate(&prompts, n, &GREEDY, max_new, seed)
                .map_err(|e| e.to_string())?;
            if gen.cache_blocks_in_use() != 0 {
                return Err(format!(
                    "{} KV blocks still held",
                    gen.cache_blocks_in_use()
                ));
            }
            // The CPU pads and captures nothing; the device's other work
            // counts must be the CPU's.
            let work = GenerationStats {
                bucketed_steps: 0,
                graphs_captured: 0,
                graph_replays: 0,
                ..gen.stats
            };
            if limits.is_none() && work != cpu.stats {
                return Err(format!("stats {:?} vs cpu {:?}", gen.stats, cpu.stats));
            }
            if gen.stats.graph_replays != gen.stats.bucketed_steps || gen.stats.graph_replays == 0 {
                return Err(format!(
                    "decode steps not replayed from CUDA graphs: {:?}",
                    gen.stats
                ));
            }
            if got.len() != want.len() {
                return Err(format!("{} samples vs cpu {}", got.len(), want.len()));
            }
            let mut worst = 0.0f32;
            for (g, w) in got.iter().zip(&want) {
                if g.token_ids != w.token_ids || g.finish_reason != w.finish_reason {
                    return Err(format!("device {} vs cpu {}", describe(g), describe(w)));
                }
                worst = worst.max(max_abs(&g.logprobs, &w.logprobs));
            }
            if worst.is_nan() || worst > GEN_LOGPROB_TOL {
                return Err(format!("log-probs differ by {worst:e}"));
            }
            let tokens: usize = got.iter().map(|s| s.token_ids.len()).sum();
            Ok(format!(
                "{} samples, {tokens} tokens identical; log-prob max abs {worst:.1e}; {} steps ({} replayed from {} graphs), {} preemption(s)",
                got.len(),
                gen.trace.len(),
                gen.stats.graph_replays,
                gen.stats.graphs_captured,
                gen.stats.preemptions
            ))
        }),
    }
}

/// Sampled (temperature, top-p, top-k): each sample's generated log-probs
/// against scoring its tokens with the device forward; the tokens against
/// the CPU's with the same seed (reported: a draw that lands on a CDF
/// boundary may flip under fp32 rounding).
fn sampled_case(case: &'static str) -> Case {
    Case {
        name: format!("generate sampled device log-probs vs scoring fixture {case}"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let (pipe, prompts) = prompts(case)?;
            let eos = eos_ids(&fixture_dir(case));
            let params = SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 50,
            };
            let (n, max_new, seed) = (3, 12, 7);
            let dev = device_model(&pipe)?;
            let host = cpu_model(&pipe)?;
            let got = Generator::new(&dev, eos.clone())
                .generate(&prompts, n, &params, max_new, seed)
                .map_err(|e| e.to_string())?;
            let want = Generator::new(&host, eos)
                .generate(&prompts, n, &params, max_new, seed)
                .map_err(|e| e.to_string())?;
            let same = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.token_ids == w.token_ids)
                .count();
            let mut worst = 0.0f32;
            for s in &got {
                let prompt = &prompts[s.prompt_index];
                if s.token_ids.iter().any(|&t| {
                    t == pipe.model.config.tokens.image_token_id
                        || t == pipe.model.config.tokens.video_token_id
                }) {
                    return Err(format!("banned id sampled: {}", describe(s)));
                }
                let mut input = prompt.clone();
                input.ids.extend(&s.token_ids);
                let seq = TrainSequence {
                    input,
                    prompt_len: prompt.ids.len(),
                };
                let scored = dev
                    .logprobs(std::slice::from_ref(&seq))
                    .map_err(|e| e.to_string())?;
                let d = max_abs(&s.logprobs, &scored.logprobs);
                if d.is_nan() || d > GEN_LOGPROB_TOL || scored.logprobs.len() != s.logprobs.len() {
                    return Err(format!(
                        "{}: generate vs score differ by {d:e}",
                        describe(s)
                    ));
                }
                worst = worst.max(d);
            }
            Ok(format!(
                "{} samples; log-prob vs score max abs {worst:.1e}; {same}/{} token-identical to cpu",
                got.len(),
                want.len()
            ))
        }),
    }
}

/// Decode steps replayed from CUDA graphs against the same device
/// generator with `enforce_eager`, in `precision` (bf16 runs the
/// tensor-core split decode, whose grid the capture sizes for the longest
/// sequence): the same tokens, log-probs within the device tolerance,
/// every decode-only step replayed. Sampled, 2 prompts x 3 samples over 4
/// seats: steps of 3 rows pad to 4, and several buckets are captured.
fn graphs_vs_eager_case(case: &'static str, precision: Precision) -> Case {
    Case {
        name: format!("generate CUDA graphs vs enforce_eager {precision:?} fixture {case}"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let (pipe, prompts) = prompts(case)?;
            let eos = eos_ids(&fixture_dir(case));
            let params = SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 0,
            };
            let (n, max_new, seed) = (3, 20, 11);
            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let dev =
                Engine::with_precision(gpu, &pipe.model, precision).map_err(|e| e.to_string())?;
            let limits = RolloutLimits {
                schedule: ScheduleConfig {
                    max_num_seqs: 4,
                    max_num_batched_tokens: 64,
                },
                kv_budget: KvBudget::Unbounded,
                enforce_eager: false,
            };
            let mut graphs = Generator::new(&dev, eos.clone()).with_limits(limits);
            let got = graphs
                .generate(&prompts, n, &params, max_new, seed)
                .map_err(|e| e.to_string())?;
            let mut eager = Generator::new(&dev, eos).with_limits(limits.eager(true));
            let want = eager
                .generate(&prompts, n, &params, max_new, seed)
                .map_err(|e| e.to_string())?;
            let st = graphs.stats;
            if st.graph_replays == 0 || st.graph_replays != st.bucketed_steps {
                return Err(format!("not every decode-only step replayed: {st:?}"));
            }
            if eager.stats.bucketed_steps != 0 {
                return Err(format!("enforce_eager padded steps: {:?}", eager.stats));
            }
            let mut worst = 0.0f32;
            for (g, w) in got.iter().zip(&want) {
                if g.token_ids != w.token_ids {
                    return Err(format!("graphs {} vs eager {}", describe(g), describe(w)));
                }
                worst = worst.max(max_abs(&g.logprobs, &w.logprobs));
            }
            if got.len() != want.len() || worst.is_nan() || worst > GEN_LOGPROB_TOL {
                return Err(format!("log-probs differ by {worst:e}"));
            }
            Ok(format!(
                "{} samples identical; log-prob max abs {worst:.1e}; {} decode steps replayed from {} graphs",
                got.len(),
                st.graph_replays,
                st.graphs_captured
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = ["single_noresize", "two_images", "resize"]
        .into_iter()
        .map(greedy_case)
        .collect();
    v.push(sampled_case("two_images"));
    v.push(greedy_case_with(
        "resize",
        Some(RolloutLimits {
            schedule: ScheduleConfig {
                max_num_seqs: 2,
                max_num_batched_tokens: 24,
            },
            kv_budget: KvBudget::Blocks(12),
            enforce_eager: false,
        }),
    ));
    v.push(graphs_vs_eager_case("two_images", Precision::Fp32));
    v.push(graphs_vs_eager_case("two_images", Precision::Bf16));
    v
}
