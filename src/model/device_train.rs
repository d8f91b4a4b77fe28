//! Training on a CUDA device: the twin of [`super::Qwen25Vl::train_forward`]
//! plus [`super::Qwen25Vl::train_backward`], one sequence at a time.
//!
//! [`DeviceModel::train_forward`] runs the vision tower, the decoder and the
//! chunked loss head, keeping only each block's and layer's INPUT (the
//! CPU's `Save::Inputs`), and returns the response tokens' log-probs and
//! entropies. The caller turns them into per-token gradients (the GRPO/VPPO
//! objective is a weighting, as on the CPU) and calls
//! [`DeviceModel::train_backward`], which walks the graph back, recomputing
//! each block's activations from its saved input, and ACCUMULATES every
//! parameter gradient into device buffers that live until
//! [`DeviceModel::take_grads`]. fp32 throughout, like the device forward.
//!
//! Memory: one [`TrainArena`] sized per [`ForwardShape`] and reused while
//! later sequences fit; the per-layer loop allocates nothing.

use super::config::ModelConfig;
use super::device::{logit_chunk_rows, DeviceModel, DeviceWeights, ForwardShape, HostPlan};
use super::params::{ParamId, Tensors};
use super::qwen::{ModelError, TrainSequence};
use crate::backend::cpu::attention::VarlenAttention;
use crate::backend::cuda::{
    clip_coefficient, rmsnorm_bwd_scratch_len, AdamWTensor, CudaBackend, CudaError, FlashAttnShape,
    GemmShape, LogitChunk, RopeFreqsDevice, Trans, LOGPROB_STATE_PER_ROW,
};
use crate::train::optimizer::{AdamW, StepReport, WeightPrecision};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Gradients on the device plus the training arena and the sequence whose
/// forward awaits its backward.
pub struct TrainState {
    grads: Vec<CudaSlice<f32>>,
    /// AdamW's first and second moments, once the optimizer runs here.
    moments: Option<Moments>,
    arena: Option<TrainArena>,
    pending: Option<Pending>,
    /// Training arena (re)allocations so far (tests check reuse).
    pub arena_allocations: usize,
}

/// AdamW's first and second moments of every parameter tensor.
type Moments = (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>);

/// What the backward of the last forward needs from the host.
struct Pending {
    plan: HostPlan,
    ids: Vec<u32>,
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>, CudaError> {
    Ok(s.alloc_zeros::<T>(n.max(1))?)
}

/// Device buffers of one training forward + backward, named by role.
pub struct TrainArena {
    cap: ForwardShape,
    // Inputs and index arrays.
    pixels: CudaSlice<f32>,
    patch_order: CudaSlice<i32>,
    vpos: CudaSlice<i32>,
    cu_window: CudaSlice<i32>,
    cu_full: CudaSlice<i32>,
    cu_text: CudaSlice<i32>,
    merged_index: CudaSlice<i32>,
    image_rows: CudaSlice<i32>,
    tpos: CudaSlice<i32>,
    resp_rows: CudaSlice<i32>,
    ids: CudaSlice<u32>,
    chunk_targets: CudaSlice<u32>,
    // The residual stream, its gradient, and the saved inputs.
    x: CudaSlice<f32>,
    dx: CudaSlice<f32>,
    block_inputs: Vec<CudaSlice<f32>>,
    layer_inputs: Vec<CudaSlice<f32>>,
    merger_in: CudaSlice<f32>,
    final_in: CudaSlice<f32>,
    final_rstd: CudaSlice<f32>,
    hidden: CudaSlice<f32>,
    d_hidden: CudaSlice<f32>,
    // One block's (or layer's) activations, recomputed in the backward.
    acts: BlockBufs,
    // Merger activations (kept from the forward).
    m_rstd: CudaSlice<f32>,
    m_h: CudaSlice<f32>,
    fc1: CudaSlice<f32>,
    gelu: CudaSlice<f32>,
    merged: CudaSlice<f32>,
    vision_out: CudaSlice<f32>,
    d_merged: CudaSlice<f32>,
    d_gelu: CudaSlice<f32>,
    d_fc1: CudaSlice<f32>,
    d_vision: CudaSlice<f32>,
    zero_rows: CudaSlice<f32>,
    // Loss head.
    rows_h: CudaSlice<f32>,
    d_rows: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    dlogits: CudaSlice<f32>,
    lp_state: CudaSlice<f32>,
    chunk_logp: CudaSlice<f32>,
    chunk_entropy: CudaSlice<f32>,
    chunk_lse: CudaSlice<f32>,
    chunk_dlogp: CudaSlice<f32>,
    chunk_dentropy: CudaSlice<f32>,
    logp: CudaSlice<f32>,
    entropy: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    /// All ones: bias gradients are `ones^T @ dy`.
    ones: CudaSlice<f32>,
    /// RMSNorm backward's per-block weight-gradient partials.
    norm_partial: CudaSlice<f32>,
}

/// A block's forward activations and the gradients of its backward.
struct BlockBufs {
    rstd1: CudaSlice<f32>,
    h1: CudaSlice<f32>,
    raw: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    rstd2: CudaSlice<f32>,
    h2: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    d_h: CudaSlice<f32>,
    d_norm: CudaSlice<f32>,
    d_attn: CudaSlice<f32>,
    dq: CudaSlice<f32>,
    dk: CudaSlice<f32>,
    dv: CudaSlice<f32>,
    d_raw: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    d_act: CudaSlice<f32>,
    d_gate: CudaSlice<f32>,
    d_up: CudaSlice<f32>,
}

impl TrainArena {
    fn alloc(
        s: &Arc<CudaStream>,
        cfg: &ModelConfig,
        cap: &ForwardShape,
    ) -> Result<Self, CudaError> {
        let (vc, tc) = (&cfg.vision, &cfg.text);
        let (n, t, m, r) = (cap.patches, cap.tokens, cap.image_tokens, cap.response);
        let (vh, vi) = (vc.hidden_size, vc.intermediate_size);
        let (h, hd, inter) = (tc.hidden_size, tc.head_dim, tc.intermediate_size);
        let (qw, kw) = (tc.num_heads * hd, tc.num_kv_heads * hd);
        let mw = vh * vc.merge_unit();
        let out = vc.out_hidden_size;
        let vocab = tc.vocab_size;
        let chunk = logit_chunk_rows(r, vocab);
        let wide = (n * vh).max(t * h);
        let qn = (n * vh).max(t * qw);
        let kn = (n * vh).max(t * kw);
        let rows = n.max(t);
        let mlp = (n * vi).max(t * inter);
        let heads = (n * vc.num_heads).max(t * tc.num_heads);
        let f = |len: usize| zeros::<f32>(s, len);
        let acts = BlockBufs {
            rstd1: f(rows)?,
            h1: f(wide)?,
            raw: f(qn)?,
            q: f(qn)?,
            k: f(kn)?,
            v: f(kn)?,
            attn: f(qn)?,
            lse: f(heads)?,
            proj: f(wide)?,
            x_mid: f(wide)?,
            rstd2: f(rows)?,
            h2: f(wide)?,
            gate: f(mlp)?,
            up: f(mlp)?,
            act: f(mlp)?,
            d_h: f(wide)?,
            d_norm: f(wide)?,
            d_attn: f(qn)?,
            dq: f(qn)?,
            dk: f(kn)?,
            dv: f(kn)?,
            d_raw: f(qn)?,
            delta: f(heads)?,
            d_act: f(mlp)?,
            d_gate: f(mlp)?,
            d_up: f(mlp)?,
        };
        let i = |len: usize| zeros::<i32>(s, len);
        let ones_len = rows.max(r).max(m).max(1);
        Ok(Self {
            cap: *cap,
            pixels: f(n * vc.patch_dim())?,
            patch_order: i(n)?,
            vpos: i(2 * n)?,
            cu_window: i(cap.windows + 1)?,
            cu_full: i(cap.frames + 1)?,
            cu_text: i(cap.seqs + 1)?,
            merged_index: i(m)?,
            image_rows: i(m)?,
            tpos: i(3 * t)?,
            resp_rows: i(r)?,
            ids: zeros::<u32>(s, t)?,
            chunk_targets: zeros::<u32>(s, chunk)?,
            x: f(wide)?,
            dx: f(wide)?,
            block_inputs: (0..vc.depth).map(|_| f(n * vh)).collect::<Result<_, _>>()?,
            layer_inputs: (0..tc.num_layers)
                .map(|_| f(t * h))
                .collect::<Result<_, _>>()?,
            merger_in: f(n * vh)?,
            final_in: f(t * h)?,
            final_rstd: f(t)?,
            hidden: f(t * h)?,
            d_hidden: f(t * h)?,
            acts,
            m_rstd: f(n)?,
            m_h: f(n * vh)?,
            fc1: f(m * mw)?,
            gelu: f(m * mw)?,
            merged: f(m * out)?,
            vision_out: f(m * out)?,
            d_merged: f(m * out)?,
            d_gelu: f(m * mw)?,
            d_fc1: f(m * mw)?,
            d_vision: f(m * h)?,
            zero_rows: f(m * h)?,
            rows_h: f(r * h)?,
            d_rows: f(r * h)?,
            logits: f(chunk * vocab)?,
            dlogits: f(chunk * vocab)?,
            lp_state: f(chunk * LOGPROB_STATE_PER_ROW)?,
            chunk_logp: f(chunk)?,
            chunk_entropy: f(chunk)?,
            chunk_lse: f(chunk)?,
            chunk_dlogp: f(chunk)?,
            chunk_dentropy: f(chunk)?,
            logp: f(r)?,
            entropy: f(r)?,
            lse: f(r)?,
            ones: s.clone_htod(&vec![1.0f32; ones_len])?,
            norm_partial: f(rmsnorm_bwd_scratch_len(rows, vh.max(h)))?,
        })
    }

    fn fits(&self, need: &ForwardShape) -> bool {
        let c = &self.cap;
        need.seqs <= c.seqs
            && need.tokens <= c.tokens
            && need.patches <= c.patches
            && need.windows <= c.windows
            && need.frames <= c.frames
            && need.image_tokens <= c.image_tokens
            && need.response <= c.response
    }
}

fn max_shape(a: &ForwardShape, b: &ForwardShape) -> ForwardShape {
    ForwardShape {
        seqs: a.seqs.max(b.seqs),
        tokens: a.tokens.max(b.tokens),
        patches: a.patches.max(b.patches),
        windows: a.windows.max(b.windows),
        frames: a.frames.max(b.frames),
        image_tokens: a.image_tokens.max(b.image_tokens),
        response: a.response.max(b.response),
    }
}

/// Log-probs and entropies of a sequence's response tokens.
#[derive(Debug, Clone)]
pub struct DeviceTrainForward {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

impl DeviceModel {
    /// Forward of one training sequence (see the module doc); its backward
    /// must come next ([`Self::train_backward`]).
    pub fn train_forward(&mut self, seq: &TrainSequence) -> Result<DeviceTrainForward, ModelError> {
        let plan = HostPlan::new(&self.core.cfg, &seq.input, Some(seq.prompt_len))?;
        if self.train.is_none() {
            let s = self.core.gpu.stream().clone();
            let grads = self
                .core
                .w
                .iter()
                .map(|w| zeros::<f32>(&s, w.len()))
                .collect::<Result<Vec<_>, _>>()?;
            self.train = Some(TrainState {
                grads,
                moments: None,
                arena: None,
                pending: None,
                arena_allocations: 0,
            });
        }
        let st = self.train.as_mut().expect("created above");
        let fits = st.arena.as_ref().is_some_and(|a| a.fits(&plan.shape));
        if !fits {
            let cap = st
                .arena
                .as_ref()
                .map_or(plan.shape, |a| max_shape(&a.cap, &plan.shape));
            st.arena = None;
            st.arena = Some(TrainArena::alloc(
                self.core.gpu.stream(),
                &self.core.cfg,
                &cap,
            )?);
            st.arena_allocations += 1;
        }
        let a = st.arena.as_mut().expect("allocated above");
        let out = TrainRun { run: &self.core }.forward(
            a,
            &seq.input.ids,
            &seq.input.pixel_values,
            &plan,
        )?;
        st.pending = Some(Pending {
            plan,
            ids: seq.input.ids.clone(),
        });
        Ok(out)
    }

    /// Backward of the last [`Self::train_forward`] from the gradient of
    /// the loss w.r.t. each response token's log-prob and entropy;
    /// accumulates into the device gradients.
    pub fn train_backward(
        &mut self,
        d_logprob: &[f32],
        d_entropy: &[f32],
    ) -> Result<(), ModelError> {
        let st = self.train.as_mut().ok_or(ModelError::NoPendingForward)?;
        let pending = st.pending.take().ok_or(ModelError::NoPendingForward)?;
        let n = pending.plan.response_rows.len();
        for found in [d_logprob.len(), d_entropy.len()] {
            if found != n {
                return Err(ModelError::GradLength { expected: n, found });
            }
        }
        let a = st.arena.as_mut().expect("a forward allocated the arena");
        TrainRun { run: &self.core }.backward(a, &mut st.grads, &pending, d_logprob, d_entropy)
    }

    /// Adds the accumulated device gradients into `into` and zeroes them.
    pub fn take_grads(&mut self, into: &mut Tensors) -> Result<(), ModelError> {
        let Some(st) = self.train.as_mut() else {
            return Ok(());
        };
        let s = self.core.gpu.stream().clone();
        for (dst, g) in into.0.iter_mut().zip(st.grads.iter_mut()) {
            let host = s.clone_dtoh(g)?;
            for (d, v) in dst.iter_mut().zip(host) {
                *d += v;
            }
            s.memset_zeros(g)?;
        }
        s.synchronize()?;
        Ok(())
    }

    /// Replaces the device weights with `weights` (after a host optimizer
    /// step), keeping the allocations.
    pub fn upload_weights(&mut self, weights: &Tensors) -> Result<(), ModelError> {
        let s = self.core.gpu.stream().clone();
        for (dst, src) in self.core.w.iter_mut().zip(&weights.0) {
            s.memcpy_htod(src, dst)?;
        }
        Ok(())
    }

    /// One AdamW step on the device from the accumulated gradients (then
    /// zeroed): global grad-norm clipping and the multi-tensor kernel, the
    /// twin of [`AdamW::step`] with fp32 weights. The moments move to the
    /// device on the first call (from `opt`, so a resumed run continues
    /// its state); `opt.step` counts here, its host moments and the host
    /// weights go stale until [`Self::sync_to_host`].
    pub fn optimizer_step(&mut self, opt: &mut AdamW) -> Result<StepReport, ModelError> {
        if opt.precision() != WeightPrecision::Fp32 {
            return Err(ModelError::DeviceOptimizer);
        }
        let gpu = self.core.gpu.clone();
        let s = gpu.stream().clone();
        let st = self.train.as_mut().ok_or(ModelError::NoPendingForward)?;
        if st.moments.is_none() {
            let up = |t: &Tensors| {
                t.0.iter()
                    .map(|v| s.clone_htod(v))
                    .collect::<Result<Vec<_>, _>>()
            };
            st.moments = Some((up(&opt.exp_avg)?, up(&opt.exp_avg_sq)?));
        }
        let grad_refs: Vec<&CudaSlice<f32>> = st.grads.iter().collect();
        let grad_norm = gpu.global_grad_norm(&grad_refs)?;
        let report = if grad_norm.is_finite() {
            opt.step += 1;
            let scale = clip_coefficient(grad_norm, opt.max_grad_norm.unwrap_or(f64::INFINITY));
            let (m, v) = st.moments.as_mut().expect("uploaded above");
            let mut tensors: Vec<AdamWTensor> = self
                .core
                .w
                .iter_mut()
                .zip(&st.grads)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .map(|((param, grad), (exp_avg, exp_avg_sq))| AdamWTensor {
                    param,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    model: None,
                })
                .collect();
            gpu.adamw_step(&opt.cfg, opt.step, scale, &mut tensors)?;
            StepReport {
                grad_norm,
                skipped: false,
            }
        } else {
            StepReport {
                grad_norm,
                skipped: true,
            }
        };
        for g in st.grads.iter_mut() {
            s.memset_zeros(g)?;
        }
        Ok(report)
    }

    /// Copies the device weights into `weights` and, when the optimizer
    /// ran here, its moments into `opt` (before a checkpoint, and at the end).
    pub fn sync_to_host(
        &mut self,
        weights: &mut Tensors,
        opt: &mut AdamW,
    ) -> Result<(), ModelError> {
        let s = self.core.gpu.stream().clone();
        for (host, dev) in weights.0.iter_mut().zip(&self.core.w) {
            s.memcpy_dtoh(dev, host.as_mut_slice())?;
        }
        if let Some((m, v)) = self.train.as_ref().and_then(|t| t.moments.as_ref()) {
            for (host, dev) in opt.exp_avg.0.iter_mut().zip(m) {
                s.memcpy_dtoh(dev, host.as_mut_slice())?;
            }
            for (host, dev) in opt.exp_avg_sq.0.iter_mut().zip(v) {
                s.memcpy_dtoh(dev, host.as_mut_slice())?;
            }
        }
        s.synchronize()?;
        Ok(())
    }
}

/// The training graph over a borrowed [`Run`].
struct TrainRun<'r> {
    run: &'r DeviceWeights,
}

/// Which tower a block belongs to: decides its norms, projections, biases,
/// positions and attention.
#[derive(Clone, Copy)]
enum Block {
    Vision(usize),
    Text(usize),
}

impl TrainRun<'_> {
    fn gpu(&self) -> &CudaBackend {
        &self.run.gpu
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.run.gpu.stream().clone()
    }

    fn copy(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        self.stream()
            .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))?;
        Ok(())
    }

    /// Backward of `y[rows, n] = x[rows, k] @ W[r0..r0+n, :]^T (+ b)`:
    /// `dW += dy^T x`, `db += ones^T dy`, and `dx = dy W` (overwritten, or
    /// accumulated with `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        grads: &mut [CudaSlice<f32>],
        ones: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (rows, k, n): (usize, usize, usize),
        (weight, bias, r0): (ParamId, Option<ParamId>, usize),
        dx: Option<(&mut CudaSlice<f32>, bool)>,
    ) -> Result<(), CudaError> {
        let gpu = self.gpu();
        let dy_v = dy.slice(0..rows * n);
        let w_rows = r0 * k..(r0 + n) * k;
        if let Some((dx, accumulate)) = dx {
            let shape = GemmShape {
                m: rows,
                k: n,
                n: k,
                trans_a: Trans::No,
                trans_b: Trans::No,
            };
            let beta = if accumulate { 1.0 } else { 0.0 };
            gpu.gemm(
                &shape,
                1.0,
                &dy_v,
                &self.run.w(weight).slice(w_rows.clone()),
                beta,
                &mut dx.slice_mut(0..rows * k),
                None,
            )?;
        }
        let dw_shape = GemmShape {
            m: n,
            k: rows,
            n: k,
            trans_a: Trans::Yes,
            trans_b: Trans::No,
        };
        gpu.gemm(
            &dw_shape,
            1.0,
            &dy_v,
            &x.slice(0..rows * k),
            1.0,
            &mut grads[weight.0].slice_mut(w_rows),
            None,
        )?;
        if let Some(b) = bias {
            let db_shape = GemmShape {
                m: 1,
                k: rows,
                n,
                trans_a: Trans::No,
                trans_b: Trans::No,
            };
            gpu.gemm(
                &db_shape,
                1.0,
                &ones.slice(0..rows),
                &dy_v,
                1.0,
                &mut grads[b.0].slice_mut(r0..r0 + n),
                None,
            )?;
        }
        Ok(())
    }

    fn attn_shape(
        &self,
        cu: &[i32],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<FlashAttnShape, CudaError> {
        FlashAttnShape::of(&VarlenAttention {
            cu_seqlens_q: cu,
            cu_seqlens_k: cu,
            q_heads: heads,
            kv_heads,
            head_dim,
            causal,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// The attention shape of `block` for the sequence of `plan`.
    fn block_attn(&self, block: Block, plan: &HostPlan) -> Result<FlashAttnShape, CudaError> {
        let (vc, tc) = (&self.run.cfg.vision, &self.run.cfg.text);
        match block {
            Block::Vision(i) => {
                let layout = &plan
                    .vision
                    .as_ref()
                    .expect("vision blocks need images")
                    .layout;
                let cu = if vc.fullatt_block_indexes.contains(&i) {
                    &layout.cu_full
                } else {
                    &layout.cu_window
                };
                self.attn_shape(cu, vc.num_heads, vc.num_heads, vc.head_dim(), false)
            }
            Block::Text(_) => self.attn_shape(
                &plan.cu_text,
                tc.num_heads,
                tc.num_kv_heads,
                tc.head_dim,
                true,
            ),
        }
    }

    /// Forward of one training sequence: leaves the saved inputs, the merger
    /// activations and the head's per-row statistics in `a`.
    fn forward(
        &self,
        a: &mut TrainArena,
        ids: &[u32],
        pixels: &[f32],
        plan: &HostPlan,
    ) -> Result<DeviceTrainForward, ModelError> {
        let s = self.stream();
        let (vc, tc) = (&self.run.cfg.vision, &self.run.cfg.text);
        let p = &self.run.layout;
        let t = plan.shape.tokens;
        let h = tc.hidden_size;
        if let Some(vp) = &plan.vision {
            let n = plan.shape.patches;
            let (vh, pd) = (vc.hidden_size, vc.patch_dim());
            s.memcpy_htod(pixels, &mut a.pixels)?;
            s.memcpy_htod(&vp.patch_order, &mut a.patch_order)?;
            s.memcpy_htod(&vp.positions, &mut a.vpos)?;
            s.memcpy_htod(&vp.layout.cu_window, &mut a.cu_window)?;
            s.memcpy_htod(&vp.layout.cu_full, &mut a.cu_full)?;
            s.memcpy_htod(&vp.window_index, &mut a.merged_index)?;
            s.memcpy_htod(&plan.image_rows, &mut a.image_rows)?;
            let v = &p.vision;
            self.run.linear(
                &a.pixels,
                n,
                pd,
                vh,
                v.patch_embed,
                None,
                0,
                &mut a.acts.proj,
            )?;
            self.gpu().gather_rows(
                &a.acts.proj.slice(..),
                &a.patch_order.slice(..),
                n,
                vh,
                &mut a.x.slice_mut(..),
            )?;
            for i in 0..v.blocks.len() {
                self.copy(&a.x, &mut a.block_inputs[i], n * vh)?;
                self.block_fwd(a, Block::Vision(i), plan)?;
            }
            self.copy(&a.x, &mut a.merger_in, n * vh)?;
            self.merger_fwd(a, n)?;
        }
        s.memcpy_htod(ids, &mut a.ids)?;
        s.memcpy_htod(&plan.text_positions, &mut a.tpos)?;
        s.memcpy_htod(&plan.cu_text, &mut a.cu_text)?;
        self.gpu().embedding_fwd(
            &a.ids,
            t,
            self.run.w(p.text.embed),
            tc.vocab_size,
            h,
            &mut a.x,
        )?;
        let images = plan.image_rows.len();
        if images > 0 {
            self.gpu().scatter_rows(
                &a.vision_out.slice(..),
                &a.image_rows.slice(..),
                images,
                h,
                &mut a.x.slice_mut(..),
            )?;
        }
        for l in 0..p.text.layers.len() {
            self.copy(&a.x, &mut a.layer_inputs[l], t * h)?;
            self.block_fwd(a, Block::Text(l), plan)?;
        }
        self.copy(&a.x, &mut a.final_in, t * h)?;
        let eps = tc.rms_norm_eps as f32;
        self.gpu().rmsnorm_fwd(
            &a.final_in,
            self.run.w(p.text.norm),
            t,
            h,
            eps,
            &mut a.hidden,
            &mut a.final_rstd,
        )?;
        self.head_fwd(a, plan)
    }

    /// Twin of `merger_fwd` + the un-permutation: `a.merger_in` ->
    /// `a.vision_out`, keeping `m_rstd`, `m_h`, `fc1` and `gelu`.
    fn merger_fwd(&self, a: &mut TrainArena, n: usize) -> Result<(), CudaError> {
        let vc = &self.run.cfg.vision;
        let mp = &self.run.layout.vision.merger;
        let vh = vc.hidden_size;
        let m = n / vc.merge_unit();
        let mw = vh * vc.merge_unit();
        let out = vc.out_hidden_size;
        let eps = vc.rms_norm_eps as f32;
        self.gpu().rmsnorm_fwd(
            &a.merger_in,
            self.run.w(mp.ln_q),
            n,
            vh,
            eps,
            &mut a.m_h,
            &mut a.m_rstd,
        )?;
        self.run
            .linear(&a.m_h, m, mw, mw, mp.fc1_w, Some(mp.fc1_b), 0, &mut a.fc1)?;
        self.gpu().gelu_fwd(&a.fc1, m * mw, &mut a.gelu)?;
        self.run.linear(
            &a.gelu,
            m,
            mw,
            out,
            mp.fc2_w,
            Some(mp.fc2_b),
            0,
            &mut a.merged,
        )?;
        self.gpu().scatter_rows(
            &a.merged.slice(..),
            &a.merged_index.slice(..),
            m,
            out,
            &mut a.vision_out.slice_mut(..),
        )
    }

    /// One vision block or decoder layer on `a.x` (updated in place),
    /// keeping its activations in `a.acts`. Twin of `vision_block_fwd` /
    /// `text_layer_fwd`.
    fn block_fwd(
        &self,
        a: &mut TrainArena,
        block: Block,
        plan: &HostPlan,
    ) -> Result<(), CudaError> {
        let r = self.run;
        let g = self.gpu();
        let shape = self.block_attn(block, plan)?;
        let b = &mut a.acts;
        match block {
            Block::Vision(i) => {
                let vc = &r.cfg.vision;
                let bp = &r.layout.vision.blocks[i];
                let n = plan.shape.patches;
                let (vh, vi, heads) = (vc.hidden_size, vc.intermediate_size, vc.num_heads);
                let eps = vc.rms_norm_eps as f32;
                let cu = if vc.fullatt_block_indexes.contains(&i) {
                    &a.cu_full
                } else {
                    &a.cu_window
                };
                g.rmsnorm_fwd(&a.x, r.w(bp.norm1), n, vh, eps, &mut b.h1, &mut b.rstd1)?;
                r.linear(&b.h1, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), 0, &mut b.raw)?;
                g.rope(&r.vision_rope, &a.vpos, n, heads, false, &b.raw, &mut b.q)?;
                r.linear(&b.h1, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), vh, &mut b.raw)?;
                g.rope(&r.vision_rope, &a.vpos, n, heads, false, &b.raw, &mut b.k)?;
                r.linear(&b.h1, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), 2 * vh, &mut b.v)?;
                g.flash_attn_fwd(&shape, &b.q, &b.k, &b.v, cu, cu, &mut b.attn, &mut b.lse)?;
                r.linear(
                    &b.attn,
                    n,
                    vh,
                    vh,
                    bp.proj_w,
                    Some(bp.proj_b),
                    0,
                    &mut b.proj,
                )?;
                r.add(&mut a.x, &b.proj, n * vh)?;
                self.copy(&a.x, &mut b.x_mid, n * vh)?;
                g.rmsnorm_fwd(&a.x, r.w(bp.norm2), n, vh, eps, &mut b.h2, &mut b.rstd2)?;
                r.linear(&b.h2, n, vh, vi, bp.gate_w, Some(bp.gate_b), 0, &mut b.gate)?;
                r.linear(&b.h2, n, vh, vi, bp.up_w, Some(bp.up_b), 0, &mut b.up)?;
                g.swiglu_fwd(&b.gate, &b.up, n * vi, &mut b.act)?;
                r.linear(
                    &b.act,
                    n,
                    vi,
                    vh,
                    bp.down_w,
                    Some(bp.down_b),
                    0,
                    &mut b.proj,
                )?;
                r.add(&mut a.x, &b.proj, n * vh)?;
            }
            Block::Text(l) => {
                let tc = &r.cfg.text;
                let lp = &r.layout.text.layers[l];
                let t = plan.shape.tokens;
                let (h, inter, hd) = (tc.hidden_size, tc.intermediate_size, tc.head_dim);
                let (nh, nkv) = (tc.num_heads, tc.num_kv_heads);
                let (qw, kw) = (nh * hd, nkv * hd);
                let eps = tc.rms_norm_eps as f32;
                g.rmsnorm_fwd(&a.x, r.w(lp.input_norm), t, h, eps, &mut b.h1, &mut b.rstd1)?;
                r.linear(&b.h1, t, h, qw, lp.q_w, Some(lp.q_b), 0, &mut b.raw)?;
                g.rope(&r.text_rope, &a.tpos, t, nh, false, &b.raw, &mut b.q)?;
                r.linear(&b.h1, t, h, kw, lp.k_w, Some(lp.k_b), 0, &mut b.raw)?;
                g.rope(&r.text_rope, &a.tpos, t, nkv, false, &b.raw, &mut b.k)?;
                r.linear(&b.h1, t, h, kw, lp.v_w, Some(lp.v_b), 0, &mut b.v)?;
                let cu = &a.cu_text;
                g.flash_attn_fwd(&shape, &b.q, &b.k, &b.v, cu, cu, &mut b.attn, &mut b.lse)?;
                r.linear(&b.attn, t, qw, h, lp.o_w, None, 0, &mut b.proj)?;
                r.add(&mut a.x, &b.proj, t * h)?;
                self.copy(&a.x, &mut b.x_mid, t * h)?;
                g.rmsnorm_fwd(&a.x, r.w(lp.post_norm), t, h, eps, &mut b.h2, &mut b.rstd2)?;
                r.linear(&b.h2, t, h, inter, lp.gate_w, None, 0, &mut b.gate)?;
                r.linear(&b.h2, t, h, inter, lp.up_w, None, 0, &mut b.up)?;
                g.swiglu_fwd(&b.gate, &b.up, t * inter, &mut b.act)?;
                r.linear(&b.act, t, inter, h, lp.down_w, None, 0, &mut b.proj)?;
                r.add(&mut a.x, &b.proj, t * h)?;
            }
        }
        Ok(())
    }

    /// Backward of [`Self::block_fwd`] (its activations in `a.acts`, its
    /// input in `input`): `a.dx` holds the gradient w.r.t. the block's
    /// output on entry and w.r.t. its input on return.
    fn block_bwd(
        &self,
        a: &mut TrainArena,
        grads: &mut [CudaSlice<f32>],
        block: Block,
        plan: &HostPlan,
    ) -> Result<(), CudaError> {
        let r = self.run;
        let g = self.gpu();
        let shape = self.block_attn(block, plan)?;
        // Per tower: rows, widths, norms, the MLP and attention projections
        // (weight, bias, first weight row) and the rope plan.
        struct Wiring<'w> {
            rows: usize,
            hid: usize,
            inter: usize,
            q_heads: usize,
            kv_heads: usize,
            q_width: usize,
            kv_width: usize,
            norm1: ParamId,
            norm2: ParamId,
            q: (ParamId, Option<ParamId>, usize),
            k: (ParamId, Option<ParamId>, usize),
            v: (ParamId, Option<ParamId>, usize),
            o: (ParamId, Option<ParamId>, usize),
            gate: (ParamId, Option<ParamId>, usize),
            up: (ParamId, Option<ParamId>, usize),
            down: (ParamId, Option<ParamId>, usize),
            rope: &'w RopeFreqsDevice,
        }
        let (wiring, input, pos, cu) = match block {
            Block::Vision(i) => {
                let vc = &r.cfg.vision;
                let bp = &r.layout.vision.blocks[i];
                let vh = vc.hidden_size;
                let cu = if vc.fullatt_block_indexes.contains(&i) {
                    &a.cu_full
                } else {
                    &a.cu_window
                };
                (
                    Wiring {
                        rows: plan.shape.patches,
                        hid: vh,
                        inter: vc.intermediate_size,
                        q_heads: vc.num_heads,
                        kv_heads: vc.num_heads,
                        q_width: vh,
                        kv_width: vh,
                        norm1: bp.norm1,
                        norm2: bp.norm2,
                        q: (bp.qkv_w, Some(bp.qkv_b), 0),
                        k: (bp.qkv_w, Some(bp.qkv_b), vh),
                        v: (bp.qkv_w, Some(bp.qkv_b), 2 * vh),
                        o: (bp.proj_w, Some(bp.proj_b), 0),
                        gate: (bp.gate_w, Some(bp.gate_b), 0),
                        up: (bp.up_w, Some(bp.up_b), 0),
                        down: (bp.down_w, Some(bp.down_b), 0),
                        rope: &r.vision_rope,
                    },
                    &a.block_inputs[i],
                    &a.vpos,
                    cu,
                )
            }
            Block::Text(l) => {
                let tc = &r.cfg.text;
                let lp = &r.layout.text.layers[l];
                (
                    Wiring {
                        rows: plan.shape.tokens,
                        hid: tc.hidden_size,
                        inter: tc.intermediate_size,
                        q_heads: tc.num_heads,
                        kv_heads: tc.num_kv_heads,
                        q_width: tc.num_heads * tc.head_dim,
                        kv_width: tc.num_kv_heads * tc.head_dim,
                        norm1: lp.input_norm,
                        norm2: lp.post_norm,
                        q: (lp.q_w, Some(lp.q_b), 0),
                        k: (lp.k_w, Some(lp.k_b), 0),
                        v: (lp.v_w, Some(lp.v_b), 0),
                        o: (lp.o_w, None, 0),
                        gate: (lp.gate_w, None, 0),
                        up: (lp.up_w, None, 0),
                        down: (lp.down_w, None, 0),
                        rope: &r.text_rope,
                    },
                    &a.layer_inputs[l],
                    &a.tpos,
                    &a.cu_text,
                )
            }
        };
        let w = wiring;
        let (n, hid, inter) = (w.rows, w.hid, w.inter);
        let b = &mut a.acts;
        let ones = &a.ones;
        let dx = &mut a.dx;
        // MLP branch: out = x_mid + down(silu(gate(h2)) * up(h2)).
        self.linear_bwd(
            grads,
            ones,
            dx,
            &b.act,
            (n, inter, hid),
            w.down,
            Some((&mut b.d_act, false)),
        )?;
        g.swiglu_bwd(
            &b.d_act,
            &b.gate,
            &b.up,
            n * inter,
            &mut b.d_gate,
            &mut b.d_up,
        )?;
        self.linear_bwd(
            grads,
            ones,
            &b.d_gate,
            &b.h2,
            (n, hid, inter),
            w.gate,
            Some((&mut b.d_h, false)),
        )?;
        self.linear_bwd(
            grads,
            ones,
            &b.d_up,
            &b.h2,
            (n, hid, inter),
            w.up,
            Some((&mut b.d_h, true)),
        )?;
        g.rmsnorm_bwd_with(
            &b.d_h,
            &b.x_mid,
            r.w(w.norm2),
            &b.rstd2,
            n,
            hid,
            &mut b.d_norm,
            &mut grads[w.norm2.0],
            &mut a.norm_partial,
        )?;
        r.add(dx, &b.d_norm, n * hid)?;
        // Attention branch: x_mid = x_in + o(attn(rope(q(h1)), rope(k(h1)), v(h1))).
        self.linear_bwd(
            grads,
            ones,
            dx,
            &b.attn,
            (n, w.q_width, hid),
            w.o,
            Some((&mut b.d_attn, false)),
        )?;
        g.flash_attn_bwd(
            &shape,
            &b.q,
            &b.k,
            &b.v,
            &b.attn,
            &b.lse,
            &b.d_attn,
            cu,
            cu,
            &mut b.delta,
            &mut b.dq,
            &mut b.dk,
            &mut b.dv,
        )?;
        g.rope(w.rope, pos, n, w.q_heads, true, &b.dq, &mut b.d_raw)?;
        self.linear_bwd(
            grads,
            ones,
            &b.d_raw,
            &b.h1,
            (n, hid, w.q_width),
            w.q,
            Some((&mut b.d_h, false)),
        )?;
        g.rope(w.rope, pos, n, w.kv_heads, true, &b.dk, &mut b.d_raw)?;
        self.linear_bwd(
            grads,
            ones,
            &b.d_raw,
            &b.h1,
            (n, hid, w.kv_width),
            w.k,
            Some((&mut b.d_h, true)),
        )?;
        self.linear_bwd(
            grads,
            ones,
            &b.dv,
            &b.h1,
            (n, hid, w.kv_width),
            w.v,
            Some((&mut b.d_h, true)),
        )?;
        g.rmsnorm_bwd_with(
            &b.d_h,
            input,
            r.w(w.norm1),
            &b.rstd1,
            n,
            hid,
            &mut b.d_norm,
            &mut grads[w.norm1.0],
            &mut a.norm_partial,
        )?;
        r.add(dx, &b.d_norm, n * hid)?;
        Ok(())
    }

    /// The loss head's forward: per response row, log-prob, entropy and
    /// the log-sum-exp the backward needs, chunk by chunk over rows.
    fn head_fwd(
        &self,
        a: &mut TrainArena,
        plan: &HostPlan,
    ) -> Result<DeviceTrainForward, ModelError> {
        let s = self.stream();
        let tc = &self.run.cfg.text;
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let r = plan.response_rows.len();
        s.memcpy_htod(&plan.response_rows, &mut a.resp_rows)?;
        self.gpu().gather_rows(
            &a.hidden.slice(..),
            &a.resp_rows.slice(..),
            r,
            h,
            &mut a.rows_h.slice_mut(..),
        )?;
        let chunk = logit_chunk_rows(r, vocab);
        for c0 in (0..r).step_by(chunk) {
            let rows = chunk.min(r - c0);
            self.chunk_logits(a, plan, c0, rows)?;
            let lc = LogitChunk {
                rows,
                chunk_len: vocab,
                ld: vocab,
                vocab_offset: 0,
            };
            self.gpu()
                .logprob_chunk(&lc, &a.logits, &a.chunk_targets, true, &mut a.lp_state)?;
            self.gpu().logprob_finish(
                &a.lp_state,
                rows,
                &mut a.chunk_logp,
                &mut a.chunk_entropy,
                &mut a.chunk_lse,
            )?;
            for (src, dst) in [
                (&a.chunk_logp, &mut a.logp),
                (&a.chunk_entropy, &mut a.entropy),
                (&a.chunk_lse, &mut a.lse),
            ] {
                s.memcpy_dtod(&src.slice(0..rows), &mut dst.slice_mut(c0..c0 + rows))?;
            }
        }
        let logprobs = s.clone_dtoh(&a.logp.slice(0..r))?;
        let entropy = s.clone_dtoh(&a.entropy.slice(0..r))?;
        s.synchronize()?;
        Ok(DeviceTrainForward { logprobs, entropy })
    }

    /// Logits of response rows `c0 .. c0 + rows` into `a.logits`, their
    /// targets into `a.chunk_targets`.
    fn chunk_logits(
        &self,
        a: &mut TrainArena,
        plan: &HostPlan,
        c0: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        let tc = &self.run.cfg.text;
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let head = self
            .run
            .layout
            .text
            .lm_head
            .unwrap_or(self.run.layout.text.embed);
        self.stream()
            .memcpy_htod(&plan.targets[c0..c0 + rows], &mut a.chunk_targets)?;
        self.gpu().gemm(
            &GemmShape::linear(rows, h, vocab),
            1.0,
            &a.rows_h.slice(c0 * h..(c0 + rows) * h),
            self.run.w(head),
            0.0,
            &mut a.logits.slice_mut(0..rows * vocab),
            None,
        )
    }

    fn backward(
        &self,
        a: &mut TrainArena,
        grads: &mut [CudaSlice<f32>],
        pending: &Pending,
        d_logprob: &[f32],
        d_entropy: &[f32],
    ) -> Result<(), ModelError> {
        let s = self.stream();
        let tc = &self.run.cfg.text;
        let p = &self.run.layout;
        let plan = &pending.plan;
        let (t, h, vocab) = (plan.shape.tokens, tc.hidden_size, tc.vocab_size);
        let head = p.text.lm_head.unwrap_or(p.text.embed);
        // Loss head, chunk by chunk: recompute the logits, take their
        // gradient, push it through the head.
        let r = plan.response_rows.len();
        let chunk = logit_chunk_rows(r, vocab);
        for c0 in (0..r).step_by(chunk) {
            let rows = chunk.min(r - c0);
            self.chunk_logits(a, plan, c0, rows)?;
            s.memcpy_htod(&d_logprob[c0..c0 + rows], &mut a.chunk_dlogp)?;
            s.memcpy_htod(&d_entropy[c0..c0 + rows], &mut a.chunk_dentropy)?;
            for (src, dst) in [
                (&a.lse, &mut a.chunk_lse),
                (&a.entropy, &mut a.chunk_entropy),
            ] {
                s.memcpy_dtod(&src.slice(c0..c0 + rows), &mut dst.slice_mut(0..rows))?;
            }
            let lc = LogitChunk {
                rows,
                chunk_len: vocab,
                ld: vocab,
                vocab_offset: 0,
            };
            self.gpu().logprob_bwd_chunk(
                &lc,
                &a.logits,
                &a.chunk_targets,
                &a.chunk_lse,
                &a.chunk_entropy,
                &a.chunk_dlogp,
                &a.chunk_dentropy,
                &mut a.dlogits,
            )?;
            let dl = a.dlogits.slice(0..rows * vocab);
            let to_rows = GemmShape {
                m: rows,
                k: vocab,
                n: h,
                trans_a: Trans::No,
                trans_b: Trans::No,
            };
            self.gpu().gemm(
                &to_rows,
                1.0,
                &dl,
                self.run.w(head),
                0.0,
                &mut a.d_rows.slice_mut(c0 * h..(c0 + rows) * h),
                None,
            )?;
            let to_head = GemmShape {
                m: vocab,
                k: rows,
                n: h,
                trans_a: Trans::Yes,
                trans_b: Trans::No,
            };
            self.gpu().gemm(
                &to_head,
                1.0,
                &dl,
                &a.rows_h.slice(c0 * h..(c0 + rows) * h),
                1.0,
                &mut grads[head.0].slice_mut(..),
                None,
            )?;
        }
        s.memset_zeros(&mut a.d_hidden)?;
        self.gpu().scatter_rows(
            &a.d_rows.slice(..),
            &a.resp_rows.slice(..),
            r,
            h,
            &mut a.d_hidden.slice_mut(..),
        )?;
        self.gpu().rmsnorm_bwd_with(
            &a.d_hidden,
            &a.final_in,
            self.run.w(p.text.norm),
            &a.final_rstd,
            t,
            h,
            &mut a.dx,
            &mut grads[p.text.norm.0],
            &mut a.norm_partial,
        )?;
        for l in (0..p.text.layers.len()).rev() {
            self.copy(&a.layer_inputs[l], &mut a.x, t * h)?;
            self.block_fwd(a, Block::Text(l), plan)?;
            self.block_bwd(a, grads, Block::Text(l), plan)?;
        }
        // Image rows were replaced by vision features: their gradient goes to
        // the vision tower, the embedding rows of image tokens get none.
        let images = plan.image_rows.len();
        if images > 0 {
            self.gpu().gather_rows(
                &a.dx.slice(..),
                &a.image_rows.slice(..),
                images,
                h,
                &mut a.d_vision.slice_mut(..),
            )?;
            self.gpu().scatter_rows(
                &a.zero_rows.slice(..),
                &a.image_rows.slice(..),
                images,
                h,
                &mut a.dx.slice_mut(..),
            )?;
        }
        self.gpu()
            .embedding_bwd(&pending.ids, &a.dx, h, &mut grads[p.text.embed.0])?;
        if images > 0 {
            self.vision_bwd(a, grads, plan)?;
        }
        Ok(())
    }

    /// Twin of `vision_bwd` from `a.d_vision` (processor order).
    fn vision_bwd(
        &self,
        a: &mut TrainArena,
        grads: &mut [CudaSlice<f32>],
        plan: &HostPlan,
    ) -> Result<(), ModelError> {
        let vc = &self.run.cfg.vision;
        let v = &self.run.layout.vision;
        let mp = &v.merger;
        let n = plan.shape.patches;
        let (vh, pd, out) = (vc.hidden_size, vc.patch_dim(), vc.out_hidden_size);
        let m = n / vc.merge_unit();
        let mw = vh * vc.merge_unit();
        // Inverse of the un-permutation: back into windowed order.
        self.gpu().gather_rows(
            &a.d_vision.slice(..),
            &a.merged_index.slice(..),
            m,
            out,
            &mut a.d_merged.slice_mut(..),
        )?;
        self.linear_bwd(
            grads,
            &a.ones,
            &a.d_merged,
            &a.gelu,
            (m, mw, out),
            (mp.fc2_w, Some(mp.fc2_b), 0),
            Some((&mut a.d_gelu, false)),
        )?;
        self.gpu()
            .gelu_bwd(&a.d_gelu, &a.fc1, m * mw, &mut a.d_fc1)?;
        self.linear_bwd(
            grads,
            &a.ones,
            &a.d_fc1,
            &a.m_h,
            (m, mw, mw),
            (mp.fc1_w, Some(mp.fc1_b), 0),
            Some((&mut a.acts.d_h, false)),
        )?;
        self.gpu().rmsnorm_bwd_with(
            &a.acts.d_h,
            &a.merger_in,
            self.run.w(mp.ln_q),
            &a.m_rstd,
            n,
            vh,
            &mut a.dx,
            &mut grads[mp.ln_q.0],
            &mut a.norm_partial,
        )?;
        for i in (0..v.blocks.len()).rev() {
            self.copy(&a.block_inputs[i], &mut a.x, n * vh)?;
            self.block_fwd(a, Block::Vision(i), plan)?;
            self.block_bwd(a, grads, Block::Vision(i), plan)?;
        }
        // Undo the window permutation of patches, then the patch embedding
        // (no bias, no input gradient).
        self.gpu().scatter_rows(
            &a.dx.slice(..),
            &a.patch_order.slice(..),
            n,
            vh,
            &mut a.acts.d_norm.slice_mut(..),
        )?;
        self.linear_bwd(
            grads,
            &a.ones,
            &a.acts.d_norm,
            &a.pixels,
            (n, pd, vh),
            (v.patch_embed, None, 0),
            None,
        )?;
        Ok(())
    }
}
