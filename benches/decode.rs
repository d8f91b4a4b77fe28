//! CPU decode throughput of the small random model (benches/common) with
//! the paged KV cache: one 256-token text prompt, n = 1, 8, 64 samples
//! decoding together (batch = n), 32 new tokens each, the VPPO rollout
//! sampling settings (temperature 1, top-p 0.99). Decode time excludes the
//! prefill (measured separately). Run with `cargo bench --bench decode`.

mod common;

use std::time::Instant;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::SequenceInput;
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::rollout::generate::Generator;
use vppo_engine::rollout::sampling::SamplingParams;

fn main() {
    let model = common::small_model();
    let prompt = SequenceInput {
        ids: (0..256).map(|i| (i * 31 % 150_000) as u32).collect(),
        ..Default::default()
    };
    let params = SamplingParams::default();
    let new_tokens = 32;
    println!(
        "decode bench: {:.0}M params, {} threads, 256-token prompt, {new_tokens} new tokens per sample",
        model.layout.numel() as f64 / 1e6,
        rayon::current_num_threads()
    );
    let engine = Engine::new(CpuBackend, &model).unwrap();
    for batch in [1usize, 8, 64] {
        // A 1-token generation is the prefill plus one sampling step.
        let t0 = Instant::now();
        Generator::new(&engine, vec![])
            .generate(std::slice::from_ref(&prompt), batch, &params, 1, 0)
            .unwrap();
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut generator = Generator::new(&engine, vec![]);
        let samples = generator
            .generate(std::slice::from_ref(&prompt), batch, &params, new_tokens, 0)
            .unwrap();
        let total = t1.elapsed().as_secs_f64();
        assert_eq!(generator.stats.prefills, 1);
        let decoded = generator.stats.decoded_tokens;
        assert_eq!(
            decoded,
            samples.iter().map(|s| s.token_ids.len() - 1).sum::<usize>()
        );
        let decode = total - prefill;
        println!(
            "batch {batch:>3}: prefill {prefill:>6.2} s, {:>3} decode steps {decode:>7.2} s: {:>7.1} tokens/s ({:>6.1} ms/step)",
            generator.stats.decode_steps,
            decoded as f64 / decode,
            decode * 1e3 / generator.stats.decode_steps as f64
        );
    }
}
