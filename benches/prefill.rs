//! CPU prefill throughput of the small random model (benches/common): one
//! 448x448 image (256 image tokens) plus text, 512 tokens in all.
//! Run with `cargo bench --bench prefill`.

mod common;

use std::time::Instant;

fn main() {
    let model = common::small_model();
    let input = common::small_input();
    println!(
        "prefill bench: {:.0}M params, {} threads, {} tokens (256 image tokens from 1024 patches)",
        model.layout.numel() as f64 / 1e6,
        rayon::current_num_threads(),
        input.ids.len()
    );
    let mut best = f64::INFINITY;
    for run in 0..3 {
        let t = Instant::now();
        let out = model.forward(&input).unwrap();
        let logits = model.logits(&out, &[input.ids.len() - 1]);
        let secs = t.elapsed().as_secs_f64();
        assert!(logits.iter().all(|v| v.is_finite()));
        println!(
            "run {run}: {secs:.2} s, {:.1} tokens/s",
            input.ids.len() as f64 / secs
        );
        best = best.min(secs);
    }
    println!(
        "best: {:.1} prefill tokens/s (vision tower + decoder + last-row lm_head)",
        input.ids.len() as f64 / best
    );
}
