//! CPU op benchmarks: GEMM GFLOP/s (f32, all threads) at shapes the model
//! uses, and attention forward+backward throughput. Run with
//! `cargo bench --bench cpu_ops` (set RAYON_NUM_THREADS to pin the thread
//! count). Prints one table; the median of several timed runs after warm-up.

use std::time::Instant;
use vppo_engine::backend::cpu::flash_attn::{attention_bwd, attention_fwd, VarlenAttention};
use vppo_engine::backend::cpu::gemm::{matmul, Trans};

fn median_seconds(mut f: impl FnMut(), runs: usize) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

fn bench_gemm(label: &str, m: usize, k: usize, n: usize, ta: Trans, tb: Trans) {
    let a = filled(m * k, 1);
    let b = filled(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let secs = median_seconds(|| matmul(m, k, n, 1.0, &a, ta, &b, tb, 0.0, &mut c), 5);
    let gflops = 2.0 * (m * k * n) as f64 / secs / 1e9;
    println!(
        "{label:<44} {m:>6}x{k:>5}x{n:>6} {:>9.2} ms {gflops:>8.1} GFLOP/s",
        secs * 1e3
    );
}

fn bench_attention(
    seq: usize,
    seqs: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) {
    let cu: Vec<i32> = (0..=seqs).map(|s| (s * seq) as i32).collect();
    let t = seq * seqs;
    let cfg = VarlenAttention {
        cu_seqlens_q: &cu,
        cu_seqlens_k: &cu,
        q_heads,
        kv_heads,
        head_dim,
        causal,
        scale: 1.0 / (head_dim as f64).sqrt(),
    };
    let q = filled(t * q_heads * head_dim, 3);
    let k = filled(t * kv_heads * head_dim, 4);
    let v = filled(t * kv_heads * head_dim, 5);
    let mut o = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; t * q_heads];
    let fwd = median_seconds(
        || attention_fwd(&cfg, &q, &k, &v, &mut o, &mut lse).unwrap(),
        3,
    );
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let dout = filled(q.len(), 6);
    let bwd = median_seconds(
        || attention_bwd(&cfg, &q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv).unwrap(),
        3,
    );
    // Useful FLOPs: 4 * L^2 * d per head forward (QK^T and PV), halved when causal.
    let pairs = seqs as f64 * (seq * seq) as f64 * if causal { 0.5 } else { 1.0 };
    let fwd_flops = 4.0 * pairs * (head_dim * q_heads) as f64;
    println!(
        "attention {} L={seq} x{seqs} heads {q_heads}/{kv_heads} d={head_dim:<4} fwd {:>8.2} ms ({:>5.1} GFLOP/s)  bwd {:>8.2} ms ({:>5.1} GFLOP/s)",
        if causal { "causal" } else { "bidir " },
        fwd * 1e3,
        fwd_flops / fwd / 1e9,
        bwd * 1e3,
        2.5 * fwd_flops / bwd / 1e9
    );
}

fn main() {
    println!(
        "CPU op bench, {} rayon threads",
        rayon::current_num_threads()
    );
    bench_gemm("gemm square", 1024, 1024, 1024, Trans::No, Trans::No);
    bench_gemm(
        "linear fwd  x W^T  (T=512, 2048->2048)",
        512,
        2048,
        2048,
        Trans::No,
        Trans::Yes,
    );
    bench_gemm(
        "linear bwd  dy W   (dx)",
        512,
        2048,
        2048,
        Trans::No,
        Trans::No,
    );
    bench_gemm(
        "linear bwd  dy^T x (dW)",
        2048,
        512,
        2048,
        Trans::Yes,
        Trans::No,
    );
    bench_gemm(
        "vision qkv  (N=1024, 1280->3840)",
        1024,
        1280,
        3840,
        Trans::No,
        Trans::Yes,
    );
    bench_gemm(
        "decode      (T=8, 2048->11008)",
        8,
        2048,
        11008,
        Trans::No,
        Trans::Yes,
    );
    for (label, m, k, n) in [
        (
            "bench model: text mlp up   (T=512, 896->4864)",
            512,
            896,
            4864,
        ),
        (
            "bench model: text mlp down (T=512, 4864->896)",
            512,
            4864,
            896,
        ),
        (
            "bench model: vision mlp up (N=1024, 1280->3420)",
            1024,
            1280,
            3420,
        ),
        (
            "bench model: vision mlp down (N=1024, 3420->1280)",
            1024,
            3420,
            1280,
        ),
    ] {
        bench_gemm(label, m, k, n, Trans::No, Trans::Yes);
    }
    bench_attention(64, 16, 16, 16, 80, false);
    bench_attention(512, 2, 16, 2, 128, true);
}
