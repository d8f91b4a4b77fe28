//! CPU training step of the small random model (benches/common): forward +
//! backward of a 512-token sequence (one image, the last 128 tokens the
//! response, loss = sum of response log-probs), with and without activation
//! recomputation; reports tokens/s and the peak heap allocated during the
//! step (a counting allocator). Run with `cargo bench --bench train_step`.

mod common;

use std::time::Instant;
use vppo_engine::alloc_stats::{peak_bytes, start_peak, CountingAllocator};
use vppo_engine::model::acts::Save;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::TrainSequence;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn main() {
    let model = common::small_model();
    let input = common::small_input();
    let t = input.ids.len();
    let batch = [TrainSequence {
        input,
        prompt_len: t - 128,
    }];
    let mut grads = Tensors::zeros(&model.layout);
    println!(
        "train-step bench: {:.0}M params, {} threads, {t} tokens (128 response tokens)",
        model.layout.numel() as f64 / 1e6,
        rayon::current_num_threads()
    );
    // Warm-up step: first-touch page faults of the gradient buffers and the
    // allocator's pools are not part of a training step.
    {
        let fwd = model.train_forward(&batch, Save::Inputs).unwrap();
        let n = fwd.logprobs.len();
        model
            .train_backward(&fwd, &vec![1.0; n], &vec![0.0; n], &mut grads)
            .unwrap();
    }
    for (label, save) in [
        ("all activations kept", Save::All),
        ("recompute per layer", Save::Inputs),
    ] {
        let base = start_peak();
        let start = Instant::now();
        let fwd = model.train_forward(&batch, save).unwrap();
        let n = fwd.logprobs.len();
        let fwd_secs = start.elapsed().as_secs_f64();
        model
            .train_backward(&fwd, &vec![1.0; n], &vec![0.0; n], &mut grads)
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        drop(fwd);
        let peak = peak_bytes() - base;
        println!(
            "{label:<22} fwd {fwd_secs:>6.2} s + bwd {:>6.2} s: {:>6.1} tokens/s  peak step memory {:>7.0} MiB (beyond weights + grads)",
            secs - fwd_secs,
            t as f64 / secs,
            peak as f64 / (1 << 20) as f64
        );
    }
}
