//! The model-level benchmark (`vppo-engine bench`): one training step of a
//! Qwen2.5-VL of published shapes with random weights, through the same
//! engine `train` uses. A micro-batch of `seqs` sequences (each a prompt
//! with one square image, then a response) packed into one forward, the
//! backward of a loss on every response token's log-prob (with or without
//! recompute), then AdamW; timed with the device synchronised. Prints
//! tokens/s, model FLOP utilisation and peak device memory, the figures
//! `scripts/bench_model_torch.py` prints for PyTorch on the same shapes.
//!
//! Model FLOPs follow shared/docs/perf.md (the PaLM convention): 3 x the
//! forward's matmul FLOPs (2 per weight per row it multiplies: every
//! packed token through the decoder, every patch through the vision
//! blocks, every image token through the merger's MLP, the scored rows
//! through the lm_head) plus 3 x the forward's attention FLOPs (4 x head
//! dim x heads per visible query-key pair: causal within each sequence,
//! all pairs within each vision window or, in full-attention blocks, each
//! image). Recomputation is not counted. MFU = that / step time / the
//! card's dense bf16 peak.

use crate::backend::desc::AdamWConfig;
use crate::model::acts::Save;
use crate::model::config::ModelConfig;
use crate::model::engine::Engine;
use crate::model::params::{ParamLayout, Tensors};
use crate::model::positions::VisionLayout;
use crate::model::{ModelError, Qwen25Vl, SequenceInput, TrainSequence};
use crate::ops::Backend;
use crate::train::optimizer::{AdamW, Policy, WeightPrecision};
use rayon::prelude::*;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench shape: {0}")]
    Shape(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// One micro-batch: `seqs` sequences of `seq_len` tokens, the last
/// `response_len` the response, each prompt holding one `image_side` x
/// `image_side` image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchShape {
    pub seqs: usize,
    pub seq_len: usize,
    pub response_len: usize,
    pub image_side: usize,
}

impl BenchShape {
    /// The issue's micro-batch: 16 x 1,024 tokens, half of them response,
    /// one 448 x 448 image (256 image tokens) per prompt.
    pub const ISSUE: Self = Self {
        seqs: 16,
        seq_len: 1024,
        response_len: 512,
        image_side: 448,
    };
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    pub shape: BenchShape,
    /// Timed steps (the median is reported) after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    pub recompute: bool,
    /// Run AdamW after the backward (off: forward + backward only, for a
    /// model whose optimizer state does not fit).
    pub optimizer: bool,
    /// Dense bf16 peak of the device in TFLOP/s (MFU's denominator).
    pub peak_tflops: Option<f64>,
    /// Storage of weights and activations (bf16: over fp32 masters, as
    /// `train` runs with `precision = "bf16"`).
    pub precision: crate::ops::Precision,
}

/// What a step cost.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub device: String,
    pub params: u64,
    pub tokens: usize,
    pub image_tokens: usize,
    pub patches: usize,
    pub response_tokens: usize,
    /// Median over the timed steps.
    pub step_s: f64,
    pub fwd_bwd_s: f64,
    pub optimizer_s: Option<f64>,
    pub model_flops: f64,
    pub peak_tflops: Option<f64>,
    /// Highest device memory in use during the timed steps (`None` where
    /// the backend cannot tell: the CPU).
    pub peak_memory_bytes: Option<u64>,
    /// Mean response log-prob of the last step (finite: the step ran on
    /// numbers, not NaNs).
    pub mean_logprob: f64,
}

impl BenchReport {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.step_s
    }
    pub fn achieved_tflops(&self) -> f64 {
        self.model_flops / self.step_s / 1e12
    }
    pub fn mfu(&self) -> Option<f64> {
        self.peak_tflops.map(|p| self.achieved_tflops() / p)
    }

    /// The human summary line.
    pub fn summary(&self) -> String {
        let mfu = match self.mfu() {
            Some(m) => format!(
                "MFU {:.1}% of {:.0} TFLOP/s",
                100.0 * m,
                self.peak_tflops.unwrap_or(0.0)
            ),
            None => "MFU n/a (no --peak-tflops for this device)".into(),
        };
        let mem = match self.peak_memory_bytes {
            Some(b) => format!(
                "peak device memory {:.2} GiB",
                b as f64 / (1u64 << 30) as f64
            ),
            None => "peak device memory n/a (host)".into(),
        };
        format!(
            "ours: {:.0} tokens/s (step {:.3} s: forward + backward {:.3} s{}), {:.1} model TFLOP/step, {:.1} TFLOP/s, {mfu}, {mem}",
            self.tokens_per_s(),
            self.step_s,
            self.fwd_bwd_s,
            self.optimizer_s
                .map(|s| format!(", AdamW {s:.3} s"))
                .unwrap_or_default(),
            self.model_flops / 1e12,
            self.achieved_tflops()
        )
    }

    /// One JSON line, the keys `scripts/bench_model_torch.py` writes.
    pub fn json(&self, model: &str) -> serde_json::Value {
        serde_json::json!({
            "bench": "model_step",
            "impl": "vppo-engine",
            "model": model,
            "device": self.device,
            "params": self.params,
            "tokens": self.tokens,
            "image_tokens": self.image_tokens,
            "response_tokens": self.response_tokens,
            "step_s": self.step_s,
            "fwd_bwd_s": self.fwd_bwd_s,
            "optimizer_s": self.optimizer_s,
            "tokens_per_s": self.tokens_per_s(),
            "model_tflop": self.model_flops / 1e12,
            "tflops": self.achieved_tflops(),
            "mfu": self.mfu(),
            "peak_memory_gib": self.peak_memory_bytes.map(|b| b as f64 / (1u64 << 30) as f64),
        })
    }
}

/// What the bench needs to know of a backend beyond the ops.
pub trait BenchDevice: Backend {
    fn device_name(&self) -> String;
    /// Restarts the peak-memory measurement from what is in use now.
    fn reset_peak_memory(&self);
    /// Highest memory in use since [`Self::reset_peak_memory`].
    fn peak_memory(&self) -> Option<u64>;
}

impl BenchDevice for crate::ops::cpu::CpuBackend {
    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn reset_peak_memory(&self) {}
    fn peak_memory(&self) -> Option<u64> {
        None
    }
}

impl BenchDevice for crate::ops::cpu_bf16::CpuBf16Backend {
    fn device_name(&self) -> String {
        format!("cpu, bf16 twin ({} threads)", rayon::current_num_threads())
    }
    fn reset_peak_memory(&self) {}
    fn peak_memory(&self) -> Option<u64> {
        None
    }
}

impl BenchDevice for crate::backend::cuda::CudaBackend {
    fn device_name(&self) -> String {
        self.context()
            .name()
            .unwrap_or_else(|_| "CUDA device".into())
    }
    fn reset_peak_memory(&self) {
        let _ = pool_attribute(
            self.context(),
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            Some(0),
        );
    }
    fn peak_memory(&self) -> Option<u64> {
        pool_attribute(
            self.context(),
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            None,
        )
    }
}

/// Reads (or with `set`, writes) a 64-bit attribute of the device's default
/// memory pool, where the stream-ordered allocations of the CUDA backend
/// live. `None` when the context allocates otherwise or the driver refuses.
fn pool_attribute(
    ctx: &cudarc::driver::CudaContext,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Option<u64> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
        return None;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a
    // live context bound to this thread.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    let mut value: u64 = set.unwrap_or(0);
    let ptr = (&mut value as *mut u64).cast::<std::ffi::c_void>();
    // SAFETY: the pool handle was just returned by the driver; the
    // high-water attributes are cuuint64_t, which `value` is.
    let r = unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr),
            None => sys::cuMemPoolGetAttribute(pool, attr, ptr),
        }
    };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(value)
}

/// A deterministic value in [-1, 1) from a tensor index and a position.
fn hash_unit(tensor: u64, j: u64) -> f32 {
    let h = (j ^ (tensor << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    2.0 * (h as f32 / (1u64 << 24) as f32) - 1.0
}

/// Random weights of `config`'s shapes (RMSNorm weights 1, the rest
/// uniform in [-0.02, 0.02)), filled in parallel.
pub fn random_model(config: &ModelConfig) -> Qwen25Vl {
    let layout = ParamLayout::new(config);
    let weights: Vec<Vec<f32>> = layout
        .specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let is_norm =
                spec.shape.len() == 1 && (spec.name.contains("norm") || spec.name.contains("ln_q"));
            let mut t = vec![0.0f32; spec.numel()];
            t.par_chunks_mut(1 << 16)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (k, v) in chunk.iter_mut().enumerate() {
                        *v = if is_norm {
                            1.0
                        } else {
                            0.02 * hash_unit(i as u64, ((c << 16) + k) as u64)
                        };
                    }
                });
            t
        })
        .collect();
    Qwen25Vl {
        dir: "random".into(),
        config: config.clone(),
        layout,
        weights: Tensors(weights),
        names: crate::model::checkpoint::NameLayout::Hub,
    }
}

/// The micro-batch: per sequence a few text tokens, the image between
/// vision start and end, text up to the prompt length, then the response.
/// Token ids stay below every special id.
pub fn synthetic_batch(
    cfg: &ModelConfig,
    s: &BenchShape,
) -> Result<Vec<TrainSequence>, BenchError> {
    let vc = &cfg.vision;
    let unit = vc.patch_size * vc.spatial_merge_size;
    if s.image_side == 0 || s.image_side % unit != 0 {
        return Err(BenchError::Shape(format!(
            "--image-side {} must be a positive multiple of {unit} (patch {} x merge {})",
            s.image_side, vc.patch_size, vc.spatial_merge_size
        )));
    }
    let grid = s.image_side / vc.patch_size;
    let patches = grid * grid;
    let image_tokens = patches / vc.merge_unit();
    let prompt_len = s.seq_len.saturating_sub(s.response_len);
    let lead = 4;
    if s.seqs == 0 || s.response_len == 0 || prompt_len < lead + image_tokens + 3 {
        return Err(BenchError::Shape(format!(
            "{} sequences of {} tokens with {} response tokens leave a {prompt_len}-token prompt: \
             it must hold the {image_tokens} image tokens plus {} (vision markers and text), \
             and there must be at least one sequence and one response token",
            s.seqs,
            s.seq_len,
            s.response_len,
            lead + 3
        )));
    }
    let t = &cfg.tokens;
    let ceiling = [
        t.image_token_id,
        t.video_token_id,
        t.vision_start_token_id,
        t.vision_end_token_id,
    ]
    .into_iter()
    .min()
    .unwrap_or(u32::MAX)
    .min(cfg.text.vocab_size as u32)
    .max(1);
    let pd = vc.patch_dim();
    Ok((0..s.seqs)
        .map(|seq| {
            let text = |i: usize| ((i * 7919 + seq * 104_729) as u64 % ceiling as u64) as u32;
            let mut ids: Vec<u32> = (0..lead).map(text).collect();
            ids.push(t.vision_start_token_id);
            ids.extend(std::iter::repeat_n(t.image_token_id, image_tokens));
            ids.push(t.vision_end_token_id);
            let n = ids.len();
            ids.extend((n..s.seq_len).map(text));
            let pixel_values = (0..patches * pd)
                .map(|j| hash_unit(seq as u64 + 1, j as u64))
                .collect();
            TrainSequence {
                input: SequenceInput {
                    ids,
                    pixel_values,
                    grids: vec![[1, grid, grid]],
                    ..Default::default()
                },
                prompt_len,
            }
        })
        .collect())
}

/// Model FLOPs of one training step (forward + backward) of `batch`, as
/// the module documentation defines them.
pub fn model_flops(cfg: &ModelConfig, batch: &[TrainSequence]) -> f64 {
    let layout = ParamLayout::new(cfg);
    let vc = &cfg.vision;
    let tokens: usize = batch.iter().map(|s| s.input.ids.len()).sum();
    let scored: usize = batch.iter().map(|s| s.input.ids.len() - s.prompt_len).sum();
    let grids: Vec<[usize; 3]> = batch
        .iter()
        .flat_map(|s| s.input.grids.iter().copied())
        .collect();
    let patches: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
    let image_tokens = patches / vc.merge_unit();
    let head = layout.text.lm_head.unwrap_or(layout.text.embed).0;
    let mut matmul = 0.0;
    for (i, spec) in layout.specs.iter().enumerate() {
        let rows = if i == head {
            scored
        } else if spec.shape.len() < 2 || spec.name == "model.embed_tokens.weight" {
            0 // norms, biases, the embedding lookup
        } else if spec.name.starts_with("visual.merger.") {
            image_tokens
        } else if spec.name.starts_with("visual.") {
            patches
        } else {
            tokens
        };
        matmul += 2.0 * spec.numel() as f64 * rows as f64;
    }
    // Attention: 4 x d x heads per visible (query, key) pair.
    let tc = &cfg.text;
    let causal_pairs: f64 = batch
        .iter()
        .map(|s| {
            let l = s.input.ids.len() as f64;
            l * (l + 1.0) / 2.0
        })
        .sum();
    let text_attn = 4.0 * (tc.head_dim * tc.num_heads * tc.num_layers) as f64 * causal_pairs;
    let span_pairs =
        |cu: &[i32]| -> f64 { cu.windows(2).map(|w| ((w[1] - w[0]) as f64).powi(2)).sum() };
    let layout_v = VisionLayout::new(&grids, vc.spatial_merge_size, vc.window_merged());
    let (window, full) = (
        span_pairs(&layout_v.cu_window),
        span_pairs(&layout_v.cu_full),
    );
    let full_blocks = (0..vc.depth)
        .filter(|i| vc.fullatt_block_indexes.contains(i))
        .count();
    let vision_attn = 4.0
        * (vc.head_dim() * vc.num_heads) as f64
        * (full_blocks as f64 * full + (vc.depth - full_blocks) as f64 * window);
    3.0 * (matmul + text_attn + vision_attn)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the bench on `be` with `model`'s weights, calling `on_step` with
/// each step's (forward + backward, AdamW) seconds.
pub fn run<B: BenchDevice>(
    be: B,
    model: Qwen25Vl,
    opts: &BenchOptions,
    mut on_step: impl FnMut(usize, f64, Option<f64>),
) -> Result<BenchReport, BenchError> {
    let batch = synthetic_batch(&model.config, &opts.shape)?;
    let flops = model_flops(&model.config, &batch);
    let params = model.layout.numel() as u64;
    let device = be.device_name();
    let engine = Engine::with_precision(be, &model, opts.precision)?;
    let mut opt = opts.optimizer.then(|| {
        AdamW::new(
            &model.weights,
            AdamWConfig::default(),
            Some(1.0),
            match opts.precision {
                crate::ops::Precision::Bf16 => WeightPrecision::Bf16Model,
                crate::ops::Precision::Fp32 => WeightPrecision::Fp32,
            },
        )
    });
    // The host copy is not needed once the weights are on the backend.
    let mut host = Tensors(Vec::new());
    drop(model);
    let mut policy = Policy::new(engine);
    let save = if opts.recompute {
        Save::Inputs
    } else {
        Save::All
    };
    let (mut steps, mut fwd_bwd, mut adamw) = (Vec::new(), Vec::new(), Vec::new());
    let mut mean_logprob = f64::NAN;
    for step in 0..opts.warmup + opts.steps {
        if step == opts.warmup {
            policy.engine.be.synchronize().map_err(ModelError::from)?;
            policy.engine.be.reset_peak_memory();
        }
        let start = Instant::now();
        let lp = policy.engine.train_forward(&batch, save)?;
        let n = lp.logprobs.len();
        // Loss = -mean response log-prob: every scored row gets a gradient.
        let d_logprob = vec![-1.0 / n as f32; n];
        policy.engine.train_backward(&d_logprob, &vec![0.0; n])?;
        policy.engine.be.synchronize().map_err(ModelError::from)?;
        let t_fb = start.elapsed().as_secs_f64();
        let t_opt = match opt.as_mut() {
            Some(opt) => {
                let t0 = Instant::now();
                policy.optimizer_step(opt, &mut host)?;
                policy.engine.be.synchronize().map_err(ModelError::from)?;
                Some(t0.elapsed().as_secs_f64())
            }
            None => {
                policy.engine.zero_grads()?;
                None
            }
        };
        mean_logprob = lp.logprobs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        on_step(step, t_fb, t_opt);
        if step >= opts.warmup {
            steps.push(t_fb + t_opt.unwrap_or(0.0));
            fwd_bwd.push(t_fb);
            adamw.extend(t_opt);
        }
    }
    let peak_memory_bytes = policy.engine.be.peak_memory();
    let tokens = batch.iter().map(|s| s.input.ids.len()).sum();
    let patches: usize = batch
        .iter()
        .flat_map(|s| &s.input.grids)
        .map(|g| g.iter().product::<usize>())
        .sum();
    Ok(BenchReport {
        device,
        params,
        tokens,
        image_tokens: patches / policy.engine.config.vision.merge_unit(),
        patches,
        response_tokens: batch.iter().map(|s| s.input.ids.len() - s.prompt_len).sum(),
        step_s: median(steps),
        fwd_bwd_s: median(fwd_bwd),
        optimizer_s: (!adamw.is_empty()).then(|| median(adamw)),
        model_flops: flops,
        peak_tflops: opts.peak_tflops,
        peak_memory_bytes,
        mean_logprob,
    })
}

/// The dense bf16 tensor-core peak of a card by its driver name
/// (shared/docs/perf.md's table), in TFLOP/s.
pub fn known_peak_tflops(device: &str) -> Option<f64> {
    let d = device.to_ascii_uppercase();
    if d.contains("H100") || d.contains("H200") {
        Some(989.0)
    } else if d.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::CpuBackend;
    use std::path::Path;

    fn tiny() -> ModelConfig {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
        ModelConfig::load(&dir).expect("fixture config")
    }

    const TINY: BenchShape = BenchShape {
        seqs: 2,
        seq_len: 24,
        response_len: 8,
        image_side: 56,
    };

    #[test]
    fn the_batch_has_the_asked_shape_and_no_special_text_ids() {
        let cfg = tiny();
        let batch = synthetic_batch(&cfg, &TINY).unwrap();
        assert_eq!(batch.len(), 2);
        for s in &batch {
            assert_eq!((s.input.ids.len(), s.prompt_len), (24, 16));
            assert_eq!(s.input.grids, vec![[1, 4, 4]]);
            let images = s.input.ids.iter().filter(|&&i| i == 372).count();
            assert_eq!(images, 4, "56 px = 4 x 4 patches = 4 merged tokens");
            assert_eq!(s.input.pixel_values.len(), 16 * 1176);
            // Text (prompt and response) stays below the specials (369..).
            assert!(s.input.ids[16..].iter().all(|&i| i < 369));
        }
        assert_ne!(batch[0].input.ids, batch[1].input.ids);
        let err = synthetic_batch(
            &cfg,
            &BenchShape {
                image_side: 50,
                ..TINY
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("multiple of 28"), "{err}");
        let err = synthetic_batch(
            &cfg,
            &BenchShape {
                response_len: 20,
                ..TINY
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("4-token prompt"), "{err}");
    }

    /// Model FLOPs by hand for the tiny config and batch: matmul weights
    /// (decoder 2 x 36,864 over 48 tokens, head 24,576 over 16 scored rows,
    /// vision blocks 4 x 8,704 and patch embed 37,632 over 32 patches,
    /// merger 24,576 over 8 image tokens), causal pairs 2 x 300, one
    /// 16-patch window (and image) per image.
    #[test]
    fn model_flops_match_a_hand_count() {
        let cfg = tiny();
        let batch = synthetic_batch(&cfg, &TINY).unwrap();
        let matmul = 2.0
            * (73_728.0 * 48.0 + 24_576.0 * 16.0 + (34_816.0 + 37_632.0) * 32.0 + 24_576.0 * 8.0);
        // Text: 4 x 16 x 4 heads x 2 layers x 600; vision: 4 x 16 x 2 heads
        // x 4 blocks x (2 images x 16^2), windows and full spans alike.
        let attn = 4.0 * 64.0 * 2.0 * 600.0 + 4.0 * 32.0 * 4.0 * 512.0;
        assert_eq!(model_flops(&cfg, &batch), 3.0 * (matmul + attn));
    }

    /// The whole path at a tiny shape on the CPU: random weights, forward,
    /// backward, AdamW (which moves the weights), the report.
    #[test]
    fn a_tiny_step_runs_on_the_cpu() {
        tiny_step(CpuBackend, crate::ops::Precision::Fp32);
        // bf16 precision on the CPU twin, as `train` runs it.
        tiny_step(
            crate::ops::cpu_bf16::CpuBf16Backend,
            crate::ops::Precision::Bf16,
        );
    }

    fn tiny_step<B: BenchDevice>(be: B, precision: crate::ops::Precision) {
        let cfg = tiny();
        let model = random_model(&cfg);
        let first = model.weights.0[model.layout.text.layers[0].q_w.0][0];
        assert!(first != 0.0 && first.abs() < 0.02);
        let opts = BenchOptions {
            shape: TINY,
            steps: 2,
            warmup: 1,
            recompute: true,
            optimizer: true,
            peak_tflops: Some(1.0),
            precision,
        };
        let mut seen = Vec::new();
        let report = run(be, model, &opts, |step, _, opt| {
            seen.push((step, opt.is_some()))
        })
        .unwrap();
        assert_eq!(seen, vec![(0, true), (1, true), (2, true)]);
        assert_eq!(
            (report.tokens, report.image_tokens, report.patches),
            (48, 8, 32)
        );
        assert_eq!(report.response_tokens, 16);
        assert!(report.step_s > 0.0 && report.optimizer_s.is_some());
        assert!(report.mean_logprob.is_finite() && report.mean_logprob < 0.0);
        assert!(report.mfu().is_some_and(|m| m > 0.0));
        assert_eq!(
            report.peak_memory_bytes, None,
            "the CPU does not report one"
        );
        let json = report.json("tiny");
        assert_eq!(json["tokens"], 48);
        assert_eq!(json["impl"], "vppo-engine");
        assert!(report.summary().contains("tokens/s"));
    }

    #[test]
    fn known_cards_have_their_peak() {
        assert_eq!(known_peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(known_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(known_peak_tflops("cpu (2 threads)"), None);
    }

    /// The published 3B and 7B at the issue's micro-batch: the same model
    /// FLOPs and token ids as scripts/bench_model_torch.py computes from the
    /// config by formula (an independent implementation of perf.md's count;
    /// its figures pasted here).
    #[test]
    fn published_shapes_agree_with_the_torch_scripts_count() {
        for (name, torch_flops) in [
            ("qwen2.5-vl-3b", 359_930_674_544_640.0),
            ("qwen2.5-vl-7b", 743_014_309_822_464.0),
        ] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("configs/models")
                .join(name);
            let cfg = ModelConfig::load(&dir).unwrap();
            let batch = synthetic_batch(&cfg, &BenchShape::ISSUE).unwrap();
            assert_eq!(
                &batch[0].input.ids[..6],
                &[0, 7919, 15838, 23757, 151_652, 151_655]
            );
            assert_eq!(&batch[1].input.ids[1021..], &[820, 8739, 16658]);
            let ours = model_flops(&cfg, &batch);
            assert!(
                (ours / torch_flops - 1.0).abs() < 1e-12,
                "{name}: {ours} vs {torch_flops}"
            );
        }
    }
}
