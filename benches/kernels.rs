//! CUDA kernel benchmarks: every kernel family of `kernels/` on one
//! production-like shape, timed with CUDA events, with the achieved TB/s
//! (memory-bound kernels) or TFLOP/s (attention) next to the card's roofline.
//!
//! Method: each kernel call runs once to warm up, then `iters` times (5 to
//! 50, as many as fit in `--budget-ms` of GPU time), each preceded by a
//! 256 MiB memset that evicts L2 (50 MB on H100) and keeps the GPU busy while
//! the host enqueues; the median of the per-call event times is reported.
//! Inputs are larger than L2 except where the real shape is smaller (noted).
//! Bytes are the compulsory traffic (every input read once, every output
//! written once), FLOPs the useful ones (attention: `4 L_q L_k H d` forward,
//! halved when causal, backward 2.5x the forward), so a kernel that reads
//! twice or recomputes shows up as a lower fraction of the roofline.
//!
//! The fp32 attention kernels (`flash_fwd_*`, `flash_bwd_*`) do f32
//! arithmetic on CUDA cores (bf16 storage), so their roofline is the fp32
//! non-tensor peak (H100 SXM: 67 TFLOP/s); the tensor-core kernels
//! (`flash_tc_fwd_*`, `flash_tc_bwd_*`: issue 14's six cases plus text
//! causal at 8k and 16k) are measured against the dense bf16 tensor peak
//! (989), as is torch's SDPA, which `scripts/bench_torch.py` times under the
//! same ids. `flash_wgmma_fwd_*` is the Hopper forward (TMA + wgmma, the
//! FlashAttention-3 structure; compute capability 9.0 only, the cases with
//! more than 64 queries per sequence, where `attention_fwd` takes it), paired
//! with the same SDPA timing. `paged_decode_tc` is the tensor-core
//! flash-decoding kernel.
//!
//! Usage:
//!
//! ```text
//! cargo bench --bench kernels -- [--out FILE] [--budget-ms MS] [--max-seconds S] [FILTER...]
//! ```
//!
//! FILTERs keep the benches whose id contains one of them (`flash rmsnorm`).
//! `--out` writes one JSON line per kernel (default `bench-kernels.jsonl`);
//! `scripts/bench_torch.py` writes the same schema for the PyTorch
//! equivalents and `scripts/bench_table.py` merges both into one table.
//! JSON fields: id, kernel, impl ("ours"), dtype, shape, ms (median),
//! ms_min, iters, bytes, flops, tbps, tflops, roofline, unit ("TB/s" or
//! "TFLOP/s"), pct_roofline, device, note.
//!
//! Without a CUDA device (or without embedded kernels) it prints a visible
//! SKIP line and exits 0.

use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::backend::cpu::paged_attn::{PagedSeq, PagedShape};
use vppo_engine::backend::cuda::{
    AdamWTensor, CudaBackend, FlashAttnShape, LogitChunk, PatchMask, LOGPROB_STATE_PER_ROW,
};
use vppo_engine::backend::desc::flatten_block_tables;
use vppo_engine::backend::desc::RopeFreqs;
use vppo_engine::processor::image::{normalize_lut, ImageProcessorConfig};
use vppo_engine::rollout::sampling::SamplingParams;

/// Elements of the random pool every f32 input is copied from (128 MiB).
const POOL: usize = 32 << 20;
/// Bytes of the L2-evicting memset before every timed call.
const FLUSH_BYTES: usize = 256 << 20;
const MIN_ITERS: usize = 5;
const MAX_ITERS: usize = 50;
const VOCAB: usize = 151_936;

/// Peak numbers of the card, from its name (None: unknown card).
#[derive(Debug, Clone, Copy)]
struct Roof {
    hbm_tbps: f64,
    fp32_tflops: f64,
    bf16_tc_tflops: f64,
}

fn roofline(name: &str) -> Option<Roof> {
    let n = name.to_ascii_uppercase();
    let r = |hbm_tbps, fp32_tflops, bf16_tc_tflops| {
        Some(Roof {
            hbm_tbps,
            fp32_tflops,
            bf16_tc_tflops,
        })
    };
    if n.contains("H200") {
        r(4.8, 67.0, 989.0)
    } else if n.contains("H100") && n.contains("PCIE") {
        r(2.0, 51.0, 756.0)
    } else if n.contains("H100") && n.contains("NVL") {
        r(3.9, 60.0, 835.0)
    } else if n.contains("H100") {
        r(3.35, 67.0, 989.0)
    } else if n.contains("A100") {
        r(if n.contains("80GB") { 2.04 } else { 1.56 }, 19.5, 312.0)
    } else {
        None
    }
}

/// What one call does, for the achieved rate.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Compulsory bytes moved (memory-bound kernel).
    Bytes(f64),
    /// Useful FLOPs on CUDA cores (fp32 arithmetic), plus the bytes.
    Flops(f64),
    /// Useful FLOPs on tensor cores (bf16 MMA): against the dense bf16 peak.
    TensorFlops(f64),
}

struct Spec<'a> {
    id: &'a str,
    dtype: &'a str,
    shape: String,
    work: Work,
    note: &'a str,
}

struct Bench {
    gpu: CudaBackend,
    stream: Arc<CudaStream>,
    device: String,
    roof: Option<Roof>,
    flush: CudaSlice<u8>,
    pool: CudaSlice<f32>,
    pool_at: usize,
    filters: Vec<String>,
    out: Option<std::fs::File>,
    budget_ms: f64,
    deadline: Instant,
    ran: usize,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Bench {
    fn wants(&self, id: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| id.contains(f.as_str()))
    }

    /// `n` f32 values uniform in [-4, 4), copied from the pool (each call
    /// starts at a different pool offset, so two inputs differ).
    fn rand_f32(&mut self, n: usize) -> Result<CudaSlice<f32>> {
        let mut dst = self.stream.alloc_zeros::<f32>(n.max(1))?;
        let mut done = 0;
        while done < n {
            let start = self.pool_at % POOL;
            let len = (n - done).min(POOL - start);
            self.stream.memcpy_dtod(
                &self.pool.slice(start..start + len),
                &mut dst.slice_mut(done..done + len),
            )?;
            done += len;
            self.pool_at = start + len + 7_919;
        }
        Ok(dst)
    }

    fn rand_bf16(&mut self, n: usize) -> Result<CudaSlice<bf16>> {
        let src = self.rand_f32(n)?;
        let mut dst = self.stream.alloc_zeros::<bf16>(n.max(1))?;
        self.gpu.cast_f32_to_bf16(&src, n, &mut dst)?;
        Ok(dst)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    fn htod<T: DeviceRepr + Copy>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(v)?)
    }

    /// Times `f` (see the module doc), prints one line, writes one JSON line.
    fn time(&mut self, spec: Spec, f: &mut dyn FnMut(&CudaBackend) -> Result<()>) -> Result<()> {
        if !self.wants(spec.id) {
            return Ok(());
        }
        if Instant::now() > self.deadline {
            println!("SKIP  {:<30} --max-seconds reached", spec.id);
            self.skipped.push(spec.id.to_string());
            return Ok(());
        }
        let s = self.stream.clone();
        let ctx = self.gpu.context().clone();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        f(&self.gpu).with_context(|| format!("{}: warm-up", spec.id))?;
        s.synchronize()?;
        // One timed probe sizes the run.
        let (a, b) = (event()?, event()?);
        s.memset_zeros(&mut self.flush)?;
        a.record(&s)?;
        f(&self.gpu)?;
        b.record(&s)?;
        let probe = f64::from(a.elapsed_ms(&b)?).max(1e-3);
        let iters = ((self.budget_ms / probe) as usize).clamp(MIN_ITERS, MAX_ITERS);
        let events = (0..iters)
            .map(|_| Ok((event()?, event()?)))
            .collect::<Result<Vec<_>>>()?;
        for (a, b) in &events {
            s.memset_zeros(&mut self.flush)?;
            a.record(&s)?;
            f(&self.gpu)?;
            b.record(&s)?;
        }
        let mut ms = events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map(f64::from))
            .collect::<Result<Vec<_>, _>>()?;
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        let secs = median * 1e-3;
        let (bytes, flops) = match spec.work {
            Work::Bytes(b) => (Some(b), None),
            Work::Flops(f) | Work::TensorFlops(f) => (None, Some(f)),
        };
        let tbps = bytes.map(|b| b / secs / 1e12);
        let tflops = flops.map(|f| f / secs / 1e12);
        let (rate, unit, roof) = match spec.work {
            Work::Bytes(_) => (tbps.unwrap(), "TB/s", self.roof.map(|r| r.hbm_tbps)),
            Work::Flops(_) => (tflops.unwrap(), "TFLOP/s", self.roof.map(|r| r.fp32_tflops)),
            Work::TensorFlops(_) => (
                tflops.unwrap(),
                "TFLOP/s",
                self.roof.map(|r| r.bf16_tc_tflops),
            ),
        };
        let pct = roof.map(|r| 100.0 * rate / r);
        let roof_txt = match (roof, spec.work) {
            (Some(r), Work::Flops(_)) => format!(
                "{r:.0} fp32 ({:.0} bf16 TC)",
                self.roof.map_or(0.0, |r| r.bf16_tc_tflops)
            ),
            (Some(r), Work::TensorFlops(_)) => format!("{r:.0} bf16 TC"),
            (Some(r), _) => format!("{r:.2}"),
            (None, _) => "?".into(),
        };
        println!(
            "{:<30} {:<5} {:<44} {:>9.4} ms {:>8.2} {:<7} roof {:<18} {:>5} ({} iters)",
            spec.id,
            spec.dtype,
            spec.shape,
            median,
            rate,
            unit,
            roof_txt,
            pct.map_or("?".into(), |p| format!("{p:.0}%")),
            iters
        );
        let line = serde_json::json!({
            "id": format!("{}/{}", spec.id, spec.dtype),
            "kernel": spec.id,
            "impl": "ours",
            "dtype": spec.dtype,
            "shape": spec.shape,
            "ms": median,
            "ms_min": ms[0],
            "iters": iters,
            "bytes": bytes,
            "flops": flops,
            "tbps": tbps,
            "tflops": tflops,
            "roofline": roof,
            "unit": unit,
            "pct_roofline": pct,
            "device": self.device,
            "note": spec.note,
        });
        if let Some(out) = self.out.as_mut() {
            writeln!(out, "{line}")?;
        }
        self.ran += 1;
        Ok(())
    }
}

fn sz<T>() -> f64 {
    std::mem::size_of::<T>() as f64
}

// ---------------------------------------------------------------- elementwise

fn bench_copy(b: &mut Bench) -> Result<()> {
    if !b.wants("memcpy_dtod") {
        return Ok(());
    }
    let n = 256usize << 20;
    let src = b.rand_f32(n)?;
    let mut dst = b.zeros::<f32>(n)?;
    let stream = b.stream.clone();
    b.time(
        Spec {
            id: "memcpy_dtod",
            dtype: "f32",
            shape: format!("n={n}"),
            work: Work::Bytes(2.0 * n as f64 * 4.0),
            note: "baseline: device-to-device copy (cuMemcpyDtoDAsync)",
        },
        &mut |_| Ok(stream.memcpy_dtod(&src, &mut dst)?),
    )
}

fn bench_rmsnorm(b: &mut Bench) -> Result<()> {
    if !b.wants("rmsnorm") {
        return Ok(());
    }
    let (rows, dim) = (16_384usize, 3_584usize);
    let n = rows * dim;
    let shape = format!("rows={rows} dim={dim}");
    let x = b.rand_f32(n)?;
    let w = b.rand_f32(dim)?;
    let dy = b.rand_f32(n)?;
    let mut y = b.zeros::<f32>(n)?;
    let mut rstd = b.zeros::<f32>(rows)?;
    let mut dx = b.zeros::<f32>(n)?;
    let mut dw = b.zeros::<f32>(dim)?;
    b.time(
        Spec {
            id: "rmsnorm_fwd",
            dtype: "f32",
            shape: shape.clone(),
            work: Work::Bytes((2 * n + dim + rows) as f64 * 4.0),
            note: "also writes rstd",
        },
        &mut |g| Ok(g.rmsnorm_fwd(&x, &w, rows, dim, 1e-6, &mut y, &mut rstd)?),
    )?;
    b.time(
        Spec {
            id: "rmsnorm_bwd",
            dtype: "f32",
            shape,
            work: Work::Bytes((3 * n + 2 * dim + rows) as f64 * 4.0),
            note: "dx and dw (per-block partials + reduce; allocates the partials)",
        },
        &mut |g| Ok(g.rmsnorm_bwd(&dy, &x, &w, &rstd, rows, dim, &mut dx, &mut dw)?),
    )
}

fn bench_rope(b: &mut Bench) -> Result<()> {
    if !b.wants("rope") {
        return Ok(());
    }
    let (tokens, heads, d) = (16_384usize, 28usize, 128usize);
    let n = tokens * heads * d;
    let shape = format!("tokens={tokens} heads={heads} head_dim={d}");
    let freqs = b.gpu.rope_freqs(&RopeFreqs::text_1d(d, 1e6))?;
    let positions: Vec<i32> = (0..tokens as i32).collect();
    let pos = b.htod(&positions)?;
    let x = b.rand_f32(n)?;
    let mut y = b.zeros::<f32>(n)?;
    b.time(
        Spec {
            id: "rope_fwd",
            dtype: "f32",
            shape: shape.clone(),
            work: Work::Bytes(2.0 * n as f64 * 4.0 + tokens as f64 * 4.0),
            note: "text 1D; cos/sin from positions in-kernel",
        },
        &mut |g| Ok(g.rope(&freqs, &pos, tokens, heads, false, &x, &mut y)?),
    )?;
    drop((x, y));
    let x = b.rand_bf16(n)?;
    let mut y = b.zeros::<bf16>(n)?;
    b.time(
        Spec {
            id: "rope_fwd",
            dtype: "bf16",
            shape,
            work: Work::Bytes(2.0 * n as f64 * 2.0 + tokens as f64 * 4.0),
            note: "text 1D; cos/sin from positions in-kernel",
        },
        &mut |g| Ok(g.rope(&freqs, &pos, tokens, heads, false, &x, &mut y)?),
    )
}

/// SwiGLU and GELU forward/backward on one storage type.
fn bench_activations_of<T: vppo_engine::backend::cuda::Elem + ValidAsZeroBits>(
    b: &mut Bench,
    dtype: &str,
    rand: fn(&mut Bench, usize) -> Result<CudaSlice<T>>,
) -> Result<()> {
    let (tokens, inter) = (4_096usize, 18_944usize);
    let n = tokens * inter;
    let shape = format!("n={tokens}x{inter}");
    let e = sz::<T>();
    if b.wants("swiglu") {
        let gate = rand(b, n)?;
        let up = rand(b, n)?;
        let mut h = b.zeros::<T>(n)?;
        b.time(
            Spec {
                id: "swiglu_fwd",
                dtype,
                shape: shape.clone(),
                work: Work::Bytes(3.0 * n as f64 * e),
                note: "",
            },
            &mut |g| Ok(g.swiglu_fwd(&gate, &up, n, &mut h)?),
        )?;
        let dh = h;
        let mut dgate = b.zeros::<T>(n)?;
        let mut dup = b.zeros::<T>(n)?;
        b.time(
            Spec {
                id: "swiglu_bwd",
                dtype,
                shape: shape.clone(),
                work: Work::Bytes(5.0 * n as f64 * e),
                note: "",
            },
            &mut |g| Ok(g.swiglu_bwd(&dh, &gate, &up, n, &mut dgate, &mut dup)?),
        )?;
    }
    if b.wants("gelu") {
        let x = rand(b, n)?;
        let mut y = b.zeros::<T>(n)?;
        b.time(
            Spec {
                id: "gelu_fwd",
                dtype,
                shape: shape.clone(),
                work: Work::Bytes(2.0 * n as f64 * e),
                note: "exact erf",
            },
            &mut |g| Ok(g.gelu_fwd(&x, n, &mut y)?),
        )?;
        let dy = y;
        let mut dx = b.zeros::<T>(n)?;
        b.time(
            Spec {
                id: "gelu_bwd",
                dtype,
                shape,
                work: Work::Bytes(3.0 * n as f64 * e),
                note: "exact erf",
            },
            &mut |g| Ok(g.gelu_bwd(&dy, &x, n, &mut dx)?),
        )?;
    }
    Ok(())
}

fn bench_activations(b: &mut Bench) -> Result<()> {
    bench_activations_of::<f32>(b, "f32", Bench::rand_f32)?;
    bench_activations_of::<bf16>(b, "bf16", Bench::rand_bf16)
}

fn bench_embedding(b: &mut Bench) -> Result<()> {
    let (tokens, dim) = (16_384usize, 3_584usize);
    let shape = format!("tokens={tokens} vocab={VOCAB} dim={dim}");
    let mut rng = SmallRng::seed_from_u64(1);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    if b.wants("embedding_fwd") {
        let ids_d = b.htod(&ids)?;
        let table = b.zeros::<bf16>(VOCAB * dim)?;
        let mut out = b.zeros::<bf16>(tokens * dim)?;
        b.time(
            Spec {
                id: "embedding_fwd",
                dtype: "bf16",
                shape: shape.clone(),
                work: Work::Bytes(2.0 * (tokens * dim) as f64 * 2.0 + tokens as f64 * 4.0),
                note: "gather of random ids",
            },
            &mut |g| Ok(g.embedding_fwd(&ids_d, tokens, &table, VOCAB, dim, &mut out)?),
        )?;
    }
    if b.wants("embedding_bwd") {
        let dout = b.rand_f32(tokens * dim)?;
        let mut dtable = b.zeros::<f32>(VOCAB * dim)?;
        let mut uniq = ids.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let rows_touched = uniq.len();
        b.time(
            Spec {
                id: "embedding_bwd",
                dtype: "f32",
                shape,
                work: Work::Bytes(
                    (tokens * dim) as f64 * 4.0 + 2.0 * (rows_touched * dim) as f64 * 4.0,
                ),
                note: "deterministic scatter-add; includes the host grouping of ids and 3 uploads",
            },
            &mut |g| Ok(g.embedding_bwd(&ids, &dout, dim, &mut dtable)?),
        )?;
    }
    Ok(())
}

fn bench_cast(b: &mut Bench) -> Result<()> {
    if !b.wants("cast") {
        return Ok(());
    }
    let n = 128usize << 20;
    let x = b.rand_f32(n)?;
    let mut y = b.zeros::<bf16>(n)?;
    b.time(
        Spec {
            id: "cast_f32_to_bf16",
            dtype: "f32",
            shape: format!("n={n}"),
            work: Work::Bytes(n as f64 * 6.0),
            note: "",
        },
        &mut |g| Ok(g.cast_f32_to_bf16(&x, n, &mut y)?),
    )?;
    let mut z = x;
    b.time(
        Spec {
            id: "cast_bf16_to_f32",
            dtype: "bf16",
            shape: format!("n={n}"),
            work: Work::Bytes(n as f64 * 6.0),
            note: "",
        },
        &mut |g| Ok(g.cast_bf16_to_f32(&y, n, &mut z)?),
    )
}

// ----------------------------------------------------------------- loss heads

fn bench_softmax_kl(b: &mut Bench) -> Result<()> {
    if b.wants("softmax_kl") {
        let rows = 512usize;
        let n = rows * VOCAB;
        let zp = b.rand_f32(n)?;
        let zq = b.rand_f32(n)?;
        let (mut kl, mut lp, mut lq) = (b.zeros(rows)?, b.zeros(rows)?, b.zeros(rows)?);
        b.time(
            Spec {
                id: "softmax_kl_fwd",
                dtype: "f32",
                shape: format!("rows={rows} vocab={VOCAB}"),
                work: Work::Bytes(2.0 * n as f64 * 4.0),
                note: "KL(p||q) over the full vocabulary, saves both lse",
            },
            &mut |g| Ok(g.softmax_kl_fwd(&zp, &zq, rows, VOCAB, &mut kl, &mut lp, &mut lq)?),
        )?;
    }
    if b.wants("dependency_k3") {
        let n = 64usize << 20;
        let a = b.rand_f32(n)?;
        let c = b.rand_f32(n)?;
        let mut s = b.zeros::<f32>(n)?;
        b.time(
            Spec {
                id: "dependency_k3",
                dtype: "f32",
                shape: format!("n={n}"),
                work: Work::Bytes(3.0 * n as f64 * 4.0),
                note: "",
            },
            &mut |g| Ok(g.dependency_k3(&a, &c, n, &mut s)?),
        )?;
    }
    Ok(())
}

fn bench_topk_select(b: &mut Bench) -> Result<()> {
    if !b.wants("topk_select") {
        return Ok(());
    }
    let (rows, len) = (4_096usize, 4_096usize);
    let n = rows * len;
    let scores = b.rand_f32(n)?;
    let cu: Vec<i32> = (0..=rows).map(|r| (r * len) as i32).collect();
    let cu_d = b.htod(&cu)?;
    let mut mask = b.zeros::<f32>(n)?;
    b.time(
        Spec {
            id: "topk_select_mask",
            dtype: "f32",
            shape: format!("rows={rows} len={len} ratio=0.4"),
            work: Work::Bytes(2.0 * n as f64 * 4.0),
            note: "varlen (cu_seqlens), equal lengths here; 0/1 mask out",
        },
        &mut |g| Ok(g.topk_select_mask(&scores, &cu_d, rows, 0.4, &mut mask)?),
    )
}

fn bench_logprob(b: &mut Bench) -> Result<()> {
    if !b.wants("logprob") {
        return Ok(());
    }
    let (rows, chunk) = (2_048usize, 16_384usize);
    let shape = format!("rows={rows} vocab={VOCAB} chunk={chunk}");
    let mut rng = SmallRng::seed_from_u64(2);
    let targets: Vec<u32> = (0..rows)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let targets = b.htod(&targets)?;
    // One chunk buffer reused for every vocabulary chunk (in training each
    // chunk is a fresh lm_head GEMM output); it is larger than L2.
    let logits = b.rand_f32(rows * chunk)?;
    let mut dlogits = b.zeros::<f32>(rows * chunk)?;
    let mut state = b.zeros::<f32>(rows * LOGPROB_STATE_PER_ROW)?;
    let (mut logp, mut ent, mut lse) = (b.zeros(rows)?, b.zeros(rows)?, b.zeros(rows)?);
    let dlogp = b.rand_f32(rows)?;
    let dent = b.rand_f32(rows)?;
    let chunks: Vec<LogitChunk> = (0..VOCAB)
        .step_by(chunk)
        .map(|off| LogitChunk {
            rows,
            chunk_len: chunk.min(VOCAB - off),
            ld: chunk,
            vocab_offset: off,
        })
        .collect();
    b.time(
        Spec {
            id: "logprob_fwd_chunked",
            dtype: "f32",
            shape: shape.clone(),
            work: Work::Bytes((rows * VOCAB) as f64 * 4.0),
            note: "log-prob + entropy, online over vocab chunks (10 launches + finish)",
        },
        &mut |g| {
            for (i, c) in chunks.iter().enumerate() {
                g.logprob_chunk(c, &logits, &targets, i == 0, &mut state)?;
            }
            Ok(g.logprob_finish(&state, rows, &mut logp, &mut ent, &mut lse)?)
        },
    )?;
    b.time(
        Spec {
            id: "logprob_bwd_chunked",
            dtype: "f32",
            shape,
            work: Work::Bytes(2.0 * (rows * VOCAB) as f64 * 4.0),
            note: "dlogits chunk by chunk (10 launches)",
        },
        &mut |g| {
            for c in &chunks {
                g.logprob_bwd_chunk(
                    c,
                    &logits,
                    &targets,
                    &lse,
                    &ent,
                    &dlogp,
                    &dent,
                    &mut dlogits,
                )?;
            }
            Ok(())
        },
    )
}

fn bench_sampling(b: &mut Bench) -> Result<()> {
    if !b.wants("sample") {
        return Ok(());
    }
    let rows = 256usize;
    // Peaked rows like a language model's: uniform [-4, 4) plus 20 tokens
    // at 10..14 (scripts/bench_torch.py draws the same recipe).
    let mut rng = SmallRng::seed_from_u64(3);
    let mut host: Vec<f32> = (0..rows * VOCAB)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    for r in 0..rows {
        for _ in 0..20 {
            host[r * VOCAB + rng.random_range(0..VOCAB)] = rng.random_range(10.0..14.0);
        }
    }
    let logits = b.htod(&host)?;
    drop(host);
    let u: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0..1.0)).collect();
    let u = b.htod(&u)?;
    let mut token = b.zeros::<i32>(rows)?;
    let mut logprob = b.zeros::<f32>(rows)?;
    let bytes = (rows * VOCAB) as f64 * 4.0;
    for (id, params) in [
        (
            "sample_plain",
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
            },
        ),
        (
            "sample_top_p",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 0,
            },
        ),
        (
            "sample_top_k",
            SamplingParams {
                temperature: 0.7,
                top_p: 1.0,
                top_k: 50,
            },
        ),
    ] {
        let shape = format!(
            "rows={rows} vocab={VOCAB} T={} top_p={} top_k={}",
            params.temperature, params.top_p, params.top_k
        );
        b.time(
            Spec {
                id,
                dtype: "f32",
                shape,
                work: Work::Bytes(bytes),
                note: "token + its log-prob; radix select, no sort",
            },
            &mut |g| Ok(g.sample(&logits, rows, VOCAB, &params, &u, &mut token, &mut logprob)?),
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------ optimizer

fn bench_adamw(b: &mut Bench) -> Result<()> {
    if !b.wants("adamw") && !b.wants("grad_norm") {
        return Ok(());
    }
    // 8 big matrices and 8 norm vectors: 64M parameters.
    let lens: Vec<usize> = (0..16)
        .map(|i| if i % 2 == 0 { 8 << 20 } else { 3_584 })
        .collect();
    let total: usize = lens.iter().sum();
    let shape = format!("tensors=16 params={total}");
    let mut params = Vec::new();
    let mut grads = Vec::new();
    let mut m = Vec::new();
    let mut v = Vec::new();
    let mut model = Vec::new();
    for &n in &lens {
        params.push(b.rand_f32(n)?);
        grads.push(b.rand_f32(n)?);
        m.push(b.zeros::<f32>(n)?);
        v.push(b.zeros::<f32>(n)?);
        model.push(b.zeros::<bf16>(n)?);
    }
    let cfg = AdamWConfig::default();
    let mut step = 0u64;
    b.time(
        Spec {
            id: "adamw_multi",
            dtype: "f32",
            shape: shape.clone(),
            work: Work::Bytes(total as f64 * (7.0 * 4.0 + 2.0)),
            note: "fp32 master p,g,m,v in; p,m,v + bf16 model copy out; one launch",
        },
        &mut |g| {
            step += 1;
            let mut tensors: Vec<AdamWTensor> = params
                .iter_mut()
                .zip(&grads)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .zip(model.iter_mut())
                .map(|(((p, gr), (m, v)), w)| AdamWTensor {
                    param: p,
                    grad: gr,
                    exp_avg: m,
                    exp_avg_sq: v,
                    model: Some(w),
                })
                .collect();
            Ok(g.adamw_step(&cfg, step, 1.0, &mut tensors)?)
        },
    )?;
    let grad_refs: Vec<&CudaSlice<f32>> = grads.iter().collect();
    b.time(
        Spec {
            id: "grad_norm",
            dtype: "f32",
            shape,
            work: Work::Bytes(total as f64 * 4.0),
            note: "global L2 norm, f64 partials, fixed order; includes the 8-byte read-back",
        },
        &mut |g| {
            g.global_grad_norm(&grad_refs)?;
            Ok(())
        },
    )
}

// --------------------------------------------------------------------- vision

fn bench_patch_embed(b: &mut Bench) -> Result<()> {
    if !b.wants("patch_embed") {
        return Ok(());
    }
    let (w, h) = (3_584usize, 3_584usize);
    let cfg = ImageProcessorConfig::default();
    let patches = (w / cfg.patch_size) * (h / cfg.patch_size);
    let features = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    let mut rng = SmallRng::seed_from_u64(4);
    let img: Vec<u8> = (0..w * h * 3).map(|_| rng.random()).collect();
    let img = b.htod(&img)?;
    let lut = b.gpu.patch_lut(&normalize_lut(&cfg))?;
    let mut out = b.zeros::<bf16>(patches * features)?;
    let mut masked = b.zeros::<bf16>(patches * features)?;
    b.time(
        Spec {
            id: "patch_embed_masked",
            dtype: "bf16",
            shape: format!("image={w}x{h} patches={patches} features={features} p=0.5"),
            work: Work::Bytes((w * h * 3) as f64 + 2.0 * (patches * features) as f64 * 2.0),
            note: "uint8 HWC -> normalised patch rows + patch-blackened copy in one pass",
        },
        &mut |g| {
            Ok(g.patch_embed(
                &cfg.geometry(),
                &lut,
                &img.slice(..),
                w,
                h,
                &mut out.slice_mut(..),
                Some(PatchMask {
                    out: &mut masked.slice_mut(..),
                    seed: 7,
                    p: 0.5,
                }),
            )?)
        },
    )
}

// ------------------------------------------------------------------ attention

struct AttnCase {
    name: &'static str,
    /// Also time the fp32 CUDA-core kernels (the tensor-core ones always run).
    simt: bool,
    seqs: usize,
    len: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
}

impl AttnCase {
    fn shape(&self) -> FlashAttnShape {
        let total = self.seqs * self.len;
        FlashAttnShape {
            seqs: self.seqs,
            total_q: total,
            total_k: total,
            max_seqlen_q: self.len,
            max_seqlen_k: self.len,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    fn shape_txt(&self) -> String {
        format!(
            "seqs={} len={} hq={} hkv={} d={}{}",
            self.seqs,
            self.len,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            if self.causal { " causal" } else { "" }
        )
    }

    /// Forward FLOPs: 4 per visible (query, key) pair and head dimension;
    /// causal counts the visible pairs, about half.
    fn fwd_flops(&self) -> f64 {
        let pairs = if self.causal {
            self.len * (self.len + 1) / 2
        } else {
            self.len * self.len
        };
        4.0 * (self.seqs * pairs) as f64 * (self.q_heads * self.head_dim) as f64
    }
}

impl AttnCase {
    /// Elements of q-like `[T, q_heads, D]` and k-like `[T, kv_heads, D]`
    /// tensors, and rows `[T, q_heads]` of lse and delta.
    fn sizes(&self) -> (usize, usize, usize) {
        let total = self.seqs * self.len;
        (
            total * self.q_heads * self.head_dim,
            total * self.kv_heads * self.head_dim,
            total * self.q_heads,
        )
    }

    /// The forward's buffers: `cu_seqlens` of the equal-length sequences,
    /// random q, k, v, zeroed o and lse.
    fn fwd_bufs(&self, b: &mut Bench) -> Result<AttnBufs> {
        let (nq, nk, rows) = self.sizes();
        let cu: Vec<i32> = (0..=self.seqs).map(|s| (s * self.len) as i32).collect();
        Ok(AttnBufs {
            cu: b.htod(&cu)?,
            q: b.rand_bf16(nq)?,
            k: b.rand_bf16(nk)?,
            v: b.rand_bf16(nk)?,
            o: b.zeros::<bf16>(nq)?,
            lse: b.zeros::<f32>(rows)?,
        })
    }
}

struct AttnBufs {
    cu: CudaSlice<i32>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
}

/// `flash_attn_fwd::<bf16>`, `flash_attn_tc_fwd` and `flash_attn_wgmma_fwd`
/// (one signature).
type FwdFn = fn(
    &CudaBackend,
    &FlashAttnShape,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<i32>,
    &CudaSlice<i32>,
    &mut CudaSlice<bf16>,
    &mut CudaSlice<f32>,
) -> Result<(), vppo_engine::backend::cuda::CudaError>;

impl AttnBufs {
    /// Runs the forward `f` on the buffers (o and lse overwritten).
    fn fwd(&mut self, g: &CudaBackend, shape: &FlashAttnShape, f: FwdFn) -> Result<()> {
        let cu = &self.cu;
        Ok(f(
            g,
            shape,
            &self.q,
            &self.k,
            &self.v,
            cu,
            cu,
            &mut self.o,
            &mut self.lse,
        )?)
    }
}

/// `flash_attn_tc_bwd` and `flash_attn_wgmma_bwd` (one signature).
type TcBwdFn = fn(
    &CudaBackend,
    &FlashAttnShape,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    &CudaSlice<f32>,
    &CudaSlice<bf16>,
    &CudaSlice<i32>,
    &CudaSlice<i32>,
    &mut CudaSlice<f32>,
    &mut CudaSlice<f32>,
    &mut CudaSlice<bf16>,
    &mut CudaSlice<bf16>,
    &mut CudaSlice<bf16>,
) -> Result<(), vppo_engine::backend::cuda::CudaError>;

/// Times `bwd` (the tc or the wgmma backward) from the forward's `a` (o and
/// lse already computed): random dout, zeroed delta, dq_acc, dq, dk, dv.
fn time_tc_bwd(
    b: &mut Bench,
    c: &AttnCase,
    spec: Spec,
    bwd: TcBwdFn,
    shape: &FlashAttnShape,
    a: &AttnBufs,
) -> Result<()> {
    let (nq, nk, rows) = c.sizes();
    let dout = b.rand_bf16(nq)?;
    let mut delta = b.zeros::<f32>(rows)?;
    let mut dq_acc = b.zeros::<f32>(nq)?;
    let mut dq = b.zeros::<bf16>(nq)?;
    let mut dk = b.zeros::<bf16>(nk)?;
    let mut dv = b.zeros::<bf16>(nk)?;
    b.time(spec, &mut |g| {
        Ok(bwd(
            g,
            shape,
            &a.q,
            &a.k,
            &a.v,
            &a.o,
            &a.lse,
            &dout,
            &a.cu,
            &a.cu,
            &mut delta,
            &mut dq_acc,
            &mut dq,
            &mut dk,
            &mut dv,
        )?)
    })
}

fn bench_flash_attn(b: &mut Bench, c: &AttnCase) -> Result<()> {
    let fwd_id = format!("flash_fwd_{}", c.name);
    let bwd_id = format!("flash_bwd_{}", c.name);
    if !c.simt || (!b.wants(&fwd_id) && !b.wants(&bwd_id)) {
        return Ok(());
    }
    let (shape, shape_txt) = (c.shape(), c.shape_txt());
    let fwd_flops = c.fwd_flops();
    let (nq, nk, rows) = c.sizes();
    let mut a = c.fwd_bufs(b)?;
    let note = "packed varlen (cu_seqlens, equal lengths), bf16 storage, f32 SIMT arithmetic";
    b.time(
        Spec {
            id: &fwd_id,
            dtype: "bf16",
            shape: shape_txt.clone(),
            work: Work::Flops(fwd_flops),
            note,
        },
        &mut |g| a.fwd(g, &shape, CudaBackend::flash_attn_fwd::<bf16>),
    )?;
    if !b.wants(&bwd_id) {
        return Ok(());
    }
    // The backward needs the real forward's o and lse.
    a.fwd(&b.gpu, &shape, CudaBackend::flash_attn_fwd::<bf16>)?;
    let dout = b.rand_bf16(nq)?;
    let mut delta = b.zeros::<f32>(rows)?;
    let mut dq = b.zeros::<bf16>(nq)?;
    let mut dk = b.zeros::<bf16>(nk)?;
    let mut dv = b.zeros::<bf16>(nk)?;
    b.time(
        Spec {
            id: &bwd_id,
            dtype: "bf16",
            shape: shape_txt,
            work: Work::Flops(2.5 * fwd_flops),
            note: "delta + dq kernel + dk/dv kernel (deterministic, recomputes P twice); 2.5x fwd FLOPs counted",
        },
        &mut |g| {
            Ok(g.flash_attn_bwd(
                &shape, &a.q, &a.k, &a.v, &a.o, &a.lse, &dout, &a.cu, &a.cu, &mut delta, &mut dq,
                &mut dk, &mut dv,
            )?)
        },
    )
}

/// The tensor-core kernels (`flash_attn_tc`) on the case: ids
/// `flash_tc_fwd_*`, `flash_tc_bwd_*` (the torch bench times SDPA under
/// the same ids, so the table pairs them).
fn bench_flash_attn_tc(b: &mut Bench, c: &AttnCase) -> Result<()> {
    let fwd_id = format!("flash_tc_fwd_{}", c.name);
    let bwd_id = format!("flash_tc_bwd_{}", c.name);
    if !b.wants(&fwd_id) && !b.wants(&bwd_id) {
        return Ok(());
    }
    let (shape, shape_txt) = (c.shape(), c.shape_txt());
    let fwd_flops = c.fwd_flops();
    let mut a = c.fwd_bufs(b)?;
    let tile = vppo_engine::backend::cuda::tc_fwd_tile(&shape);
    let fwd_note = format!(
        "tensor cores (mma.sync bf16, f32 accumulate), {}-row x {}-key tiles",
        tile.rows(),
        tile.key_tile
    );
    b.time(
        Spec {
            id: &fwd_id,
            dtype: "bf16",
            shape: shape_txt.clone(),
            work: Work::TensorFlops(fwd_flops),
            note: &fwd_note,
        },
        &mut |g| a.fwd(g, &shape, CudaBackend::flash_attn_tc_fwd),
    )?;
    if !b.wants(&bwd_id) {
        return Ok(());
    }
    a.fwd(&b.gpu, &shape, CudaBackend::flash_attn_tc_fwd)?;
    time_tc_bwd(
        b,
        c,
        Spec {
            id: &bwd_id,
            dtype: "bf16",
            shape: shape_txt,
            work: Work::TensorFlops(2.5 * fwd_flops),
            note: "delta + one tensor-core kernel per key tile (dq by f32 atomics) + dq convert; 2.5x fwd FLOPs counted",
        },
        CudaBackend::flash_attn_tc_bwd,
        &shape,
        &a,
    )
}

/// The Hopper forward (`flash_attn_wgmma`) on the case: id
/// `flash_wgmma_fwd_*` (the torch bench times SDPA under it too). Only
/// where `attention_fwd` would take it: compute capability 9.0 and more than
/// `WGMMA_MIN_SEQLEN_Q` queries per sequence.
fn bench_flash_attn_wgmma(b: &mut Bench, c: &AttnCase) -> Result<()> {
    let fwd_id = format!("flash_wgmma_fwd_{}", c.name);
    let bwd_id = format!("flash_wgmma_bwd_{}", c.name);
    if !(b.wants(&fwd_id) || b.wants(&bwd_id))
        || c.len <= vppo_engine::backend::cuda::WGMMA_MIN_SEQLEN_Q
    {
        return Ok(());
    }
    let cc = b.gpu.context().compute_capability()?;
    if cc != (9, 0) {
        println!(
            "SKIP  {fwd_id}: device is sm_{}{}, the wgmma kernel runs on 9.0 only",
            cc.0, cc.1
        );
        return Ok(());
    }
    let (shape, shape_txt) = (c.shape(), c.shape_txt());
    let mut a = c.fwd_bufs(b)?;
    b.time(
        Spec {
            id: &fwd_id,
            dtype: "bf16",
            shape: shape_txt,
            work: Work::TensorFlops(c.fwd_flops()),
            note: "TMA + wgmma (FA3 structure: producer warpgroup, 2 consumer warpgroups), 128-row x 128-key tiles, 2-stage K/V ring",
        },
        &mut |g| a.fwd(g, &shape, CudaBackend::flash_attn_wgmma_fwd),
    )?;
    if !b.wants(&bwd_id) {
        return Ok(());
    }
    // The backward (id flash_wgmma_bwd_*, SDPA's backward paired under it).
    a.fwd(&b.gpu, &shape, CudaBackend::flash_attn_wgmma_fwd)?;
    time_tc_bwd(
        b,
        c,
        Spec {
            id: &bwd_id,
            dtype: "bf16",
            shape: c.shape_txt(),
            work: Work::TensorFlops(2.5 * c.fwd_flops()),
            note: "delta + TMA/wgmma kernel per 128 keys (2 consumer warpgroups, 64-row Q/dO ring, dq by f32 vector red) + dq convert; 2.5x fwd FLOPs counted",
        },
        CudaBackend::flash_attn_wgmma_bwd,
        &shape,
        &a,
    )
}

fn bench_flash_attn_cases(b: &mut Bench) -> Result<()> {
    for c in [
        // Qwen2.5-VL vision tower, full-attention blocks: 4 images of 896x896
        // (4096 patches each), 16 heads of 80.
        AttnCase {
            name: "vision_full",
            simt: true,
            seqs: 4,
            len: 4_096,
            q_heads: 16,
            kv_heads: 16,
            head_dim: 80,
            causal: false,
        },
        // Windowed blocks: 112x112-pixel windows of 64 patches.
        AttnCase {
            name: "vision_window",
            simt: true,
            seqs: 256,
            len: 64,
            q_heads: 16,
            kv_heads: 16,
            head_dim: 80,
            causal: false,
        },
        // Qwen2.5-VL-7B decoder: 28 query heads, 4 kv heads of 128.
        AttnCase {
            name: "text_causal",
            simt: true,
            seqs: 2,
            len: 4_096,
            q_heads: 28,
            kv_heads: 4,
            head_dim: 128,
            causal: true,
        },
        // Long responses (issue 14): one sequence of 8k and of 16k tokens,
        // tensor cores only (the fp32 kernels would spend the budget).
        AttnCase {
            name: "text_causal_8k",
            simt: false,
            seqs: 1,
            len: 8_192,
            q_heads: 28,
            kv_heads: 4,
            head_dim: 128,
            causal: true,
        },
        AttnCase {
            name: "text_causal_16k",
            simt: false,
            seqs: 1,
            len: 16_384,
            q_heads: 28,
            kv_heads: 4,
            head_dim: 128,
            causal: true,
        },
    ] {
        if let Err(e) = bench_flash_attn(b, &c) {
            println!("FAIL  flash {:<24} {e:#}", c.name);
            b.failed.push(format!("flash_{}", c.name));
        }
        if let Err(e) = bench_flash_attn_tc(b, &c) {
            println!("FAIL  flash_tc {:<21} {e:#}", c.name);
            b.failed.push(format!("flash_tc_{}", c.name));
        }
        if let Err(e) = bench_flash_attn_wgmma(b, &c) {
            println!("FAIL  flash_wgmma {:<18} {e:#}", c.name);
            b.failed.push(format!("flash_wgmma_{}", c.name));
        }
    }
    Ok(())
}

fn bench_paged_attn(b: &mut Bench) -> Result<()> {
    if !b.wants("paged_decode") && !b.wants("paged_decode_tc") {
        return Ok(());
    }
    let (batch, ctx_len, hq, hkv, d, bs) = (64usize, 4_096usize, 28usize, 4usize, 128usize, 16);
    let shape = PagedShape {
        block_size: bs,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let per_seq = ctx_len / bs;
    let blocks = batch * per_seq;
    // Blocks handed out in a shuffled order, as a paged cache ends up.
    let mut order: Vec<usize> = (0..blocks).collect();
    let mut rng = SmallRng::seed_from_u64(5);
    for i in (1..blocks).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let seqs: Vec<PagedSeq> = order
        .chunks(per_seq)
        .map(|t| PagedSeq {
            block_table: t,
            len: ctx_len,
        })
        .collect();
    let (tables, lens, stride) = flatten_block_tables(&seqs);
    let tables = b.htod(&tables)?;
    let lens = b.htod(&lens)?;
    let cache = blocks * bs * hkv * d;
    let kc = b.rand_bf16(cache)?;
    let vc = b.rand_bf16(cache)?;
    let q = b.rand_bf16(batch * hq * d)?;
    let mut o = b.zeros::<bf16>(batch * hq * d)?;
    b.time(
        Spec {
            id: "paged_decode",
            dtype: "bf16",
            shape: format!("batch={batch} ctx={ctx_len} hq={hq} hkv={hkv} d={d} block={bs}"),
            work: Work::Bytes(2.0 * cache as f64 * 2.0 + 2.0 * (batch * hq * d) as f64 * 2.0),
            note: "one query token per sequence, shuffled block tables",
        },
        &mut |g| {
            Ok(g.paged_decode_attention(
                &shape, batch, &q, &kc, &vc, &tables, stride, &lens, &mut o,
            )?)
        },
    )?;
    // Tensor cores, flash-decoding (`paged_attn_tc`): same inputs.
    let plan = vppo_engine::backend::cuda::paged_tc_plan(batch, hkv, ctx_len);
    let mut scratch = b.zeros::<f32>(vppo_engine::backend::cuda::paged_tc_scratch_len(
        &shape, batch, &plan,
    ))?;
    let note = format!(
        "tensor cores, {} splits of {} tokens + combine, shuffled block tables",
        plan.splits, plan.split_tokens
    );
    b.time(
        Spec {
            id: "paged_decode_tc",
            dtype: "bf16",
            shape: format!("batch={batch} ctx={ctx_len} hq={hq} hkv={hkv} d={d} block={bs}"),
            work: Work::Bytes(2.0 * cache as f64 * 2.0 + 2.0 * (batch * hq * d) as f64 * 2.0),
            note: &note,
        },
        &mut |g| {
            Ok(g.paged_decode_attention_tc(
                &shape,
                batch,
                ctx_len,
                &q,
                &kc,
                &vc,
                &tables,
                stride,
                &lens,
                &mut scratch,
                &mut o,
            )?)
        },
    )
}

// ----------------------------------------------------------------------- main

struct Args {
    out: String,
    budget_ms: f64,
    max_seconds: f64,
    filters: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: "bench-kernels.jsonl".into(),
        budget_ms: 400.0,
        max_seconds: 180.0,
        filters: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().ok_or_else(|| anyhow!("{what} needs a value"));
        match a.as_str() {
            "--out" => args.out = value("--out")?,
            "--budget-ms" => args.budget_ms = value("--budget-ms")?.parse()?,
            "--max-seconds" => args.max_seconds = value("--max-seconds")?.parse()?,
            // cargo bench passes --bench; ignore other flags.
            s if s.starts_with('-') => {}
            s => args.filters.push(s.to_string()),
        }
    }
    Ok(args)
}

type Family = fn(&mut Bench) -> Result<()>;

const FAMILIES: &[(&str, Family)] = &[
    ("memcpy", bench_copy),
    ("rmsnorm", bench_rmsnorm),
    ("rope", bench_rope),
    ("activations", bench_activations),
    ("embedding", bench_embedding),
    ("cast", bench_cast),
    ("kl", bench_softmax_kl),
    ("topk", bench_topk_select),
    ("logprob", bench_logprob),
    ("sampling", bench_sampling),
    ("adamw", bench_adamw),
    ("patch_embed", bench_patch_embed),
    ("attention", bench_flash_attn_cases),
    ("paged", bench_paged_attn),
];

fn main() -> Result<()> {
    let args = parse_args()?;
    let start = Instant::now();
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!(
                "bench kernels: SKIPPING all {} kernel bench families: {e}",
                FAMILIES.len()
            );
            return Ok(());
        }
    };
    let stream = gpu.stream().clone();
    let device = gpu.context().name()?;
    let roof = roofline(&device);
    let mut rng = SmallRng::seed_from_u64(0xbe5c);
    let host: Vec<f32> = (0..POOL).map(|_| rng.random_range(-4.0..4.0)).collect();
    let pool = stream.clone_htod(&host)?;
    drop(host);
    let flush = stream.alloc_zeros::<u8>(FLUSH_BYTES)?;
    let out = std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out))?;
    println!(
        "bench kernels on {device}: roofline {}; median of {MIN_ITERS}..{MAX_ITERS} calls, L2 evicted before each; JSON -> {}",
        roof.map_or("unknown (no % column)".into(), |r| format!(
            "{:.2} TB/s HBM, {:.0} TFLOP/s fp32, {:.0} TFLOP/s bf16 tensor",
            r.hbm_tbps, r.fp32_tflops, r.bf16_tc_tflops
        )),
        args.out
    );
    let mut b = Bench {
        gpu,
        stream,
        device,
        roof,
        flush,
        pool,
        pool_at: 0,
        filters: args.filters,
        out: Some(out),
        budget_ms: args.budget_ms,
        deadline: start + std::time::Duration::from_secs_f64(args.max_seconds),
        ran: 0,
        failed: Vec::new(),
        skipped: Vec::new(),
    };
    for (name, family) in FAMILIES {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| family(&mut b)));
        let err = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("{e:#}"),
            Err(p) => format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
        };
        println!("FAIL  {name:<30} {err}");
        b.failed.push(name.to_string());
        // A failed launch can leave the context unusable; later families
        // report their own errors.
    }
    b.stream.synchronize().ok();
    println!(
        "bench kernels: {} timed, {} failed{}, {} skipped (deadline); {:.0} s",
        b.ran,
        b.failed.len(),
        if b.failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.failed.join(", "))
        },
        b.skipped.len(),
        start.elapsed().as_secs_f64()
    );
    if !b.failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
