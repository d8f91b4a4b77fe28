//! CPU training step of the small random model (benches/common): forward +
//! backward of a 512-token sequence (one image, the last 128 tokens the
//! response, loss = sum of response log-probs), with and without activation
//! recomputation; reports tokens/s and the peak heap allocated during the
//! step (a counting allocator). Run with `cargo bench --bench train_step`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::vision::Save;
use vppo_engine::model::TrainSequence;

/// The system allocator, counting live bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as System.alloc.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as System.dealloc.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
    // Warm-up: first-touch page faults of the weights and allocator pools.
    drop(model.train_forward(&batch, Save::Nothing).unwrap());
    for (label, save) in [
        ("all activations kept", Save::All),
        ("recompute per layer", Save::Inputs),
    ] {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let start = Instant::now();
        let fwd = model.train_forward(&batch, save).unwrap();
        let n = fwd.logprobs.len();
        let fwd_secs = start.elapsed().as_secs_f64();
        model
            .train_backward(&fwd, &vec![1.0; n], &vec![0.0; n], &mut grads)
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        drop(fwd);
        let peak = PEAK.load(Ordering::Relaxed) - base;
        println!(
            "{label:<22} fwd {fwd_secs:>6.2} s + bwd {:>6.2} s: {:>6.1} tokens/s  peak step memory {:>7.0} MiB (beyond weights + grads)",
            secs - fwd_secs,
            t as f64 / secs,
            peak as f64 / (1 << 20) as f64
        );
    }
}
