//! Qwen2.5-VL forward on a CUDA device: the graph of [`super::Qwen25Vl::forward`]
//! (vision tower with window attention and 2D RoPE, patch merger, embedding
//! and image scatter, decoder with M-RoPE and causal GQA attention, final
//! norm) and the lm_head log-probs of `score`, built from the launchers of
//! `backend::cuda` (our kernels) and cuBLASLt GEMMs. fp32 throughout (the
//! GEMMs without TF32), so it matches the CPU path closely.
//!
//! Host side: positions, the window layout and every index array come from
//! the CPU code (`positions.rs`) and are uploaded. Device memory: weights
//! are uploaded once ([`DeviceModel::new`]); activations live in an
//! [`Arena`] allocated once per [`ArenaPlan`] (the element count of every
//! buffer role for one input shape) and reused while later inputs fit,
//! so no allocation happens per layer or per block.

use super::config::ModelConfig;
use super::params::{ParamId, ParamLayout};
use super::positions::{mrope_positions, MropePositions, VisionLayout};
use super::qwen::{ModelError, Qwen25Vl, SequenceInput};
use crate::backend::cpu::attention::VarlenAttention;
use crate::backend::cpu::paged_attention::PagedShape;
use crate::backend::cpu::rope::RopeFreqs;
use crate::backend::cuda::{
    CudaBackend, CudaError, FlashAttnShape, GemmShape, LogitChunk, PatchMask, RopeFreqsDevice,
    LOGPROB_STATE_PER_ROW,
};
use crate::processor::image::ImageProcessorConfig;
use crate::rl::perturb::image_mask_seed;
use crate::rollout::sampling::SamplingParams;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError};
use std::sync::Arc;

/// Logit elements (rows x vocab) computed per lm_head chunk: bounds the
/// logits buffer (256 MiB of f32).
pub const LOGIT_CHUNK_ELEMS: usize = 1 << 26;

/// The sizes that decide an arena: one sequence's tokens, patches, windows...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardShape {
    /// Packed sequences.
    pub seqs: usize,
    /// Tokens of all of them.
    pub tokens: usize,
    /// Vision patches of all its images.
    pub patches: usize,
    /// Non-empty attention windows (+1 offsets each) and image frames.
    pub windows: usize,
    pub frames: usize,
    /// Image tokens (= merged patches).
    pub image_tokens: usize,
    /// Rows scored by the lm_head.
    pub response: usize,
}

/// Declares the buffer roles once: the plan (element counts) and the arena
/// (device buffers) share the field names.
macro_rules! arena_buffers {
    (f32: [$($f:ident),* $(,)?], i32: [$($i:ident),* $(,)?], u32: [$($u:ident),* $(,)?] $(,)?) => {
        /// Elements of every arena buffer for one [`ForwardShape`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct ArenaPlan {
            $(pub $f: usize,)*
            $(pub $i: usize,)*
            $(pub $u: usize,)*
        }

        impl ArenaPlan {
            /// Whether an arena allocated for `cap` can run this plan.
            pub fn fits_in(&self, cap: &ArenaPlan) -> bool {
                true $(&& self.$f <= cap.$f)* $(&& self.$i <= cap.$i)* $(&& self.$u <= cap.$u)*
            }

            /// The element-wise maximum (an arena that runs both).
            pub fn max(&self, o: &ArenaPlan) -> ArenaPlan {
                ArenaPlan {
                    $($f: self.$f.max(o.$f),)*
                    $($i: self.$i.max(o.$i),)*
                    $($u: self.$u.max(o.$u),)*
                }
            }

            /// Device bytes of the whole arena.
            pub fn bytes(&self) -> usize {
                4 * (0 $(+ self.$f)* $(+ self.$i)* $(+ self.$u)*)
            }
        }

        /// Device activation buffers, one per role, sized by `plan`.
        pub struct Arena {
            pub plan: ArenaPlan,
            $(pub $f: CudaSlice<f32>,)*
            $(pub $i: CudaSlice<i32>,)*
            $(pub $u: CudaSlice<u32>,)*
        }

        impl Arena {
            /// One allocation per role (at least one element each).
            pub fn alloc(stream: &Arc<CudaStream>, plan: &ArenaPlan) -> Result<Self, DriverError> {
                Ok(Self {
                    plan: *plan,
                    $($f: stream.alloc_zeros::<f32>(plan.$f.max(1))?,)*
                    $($i: stream.alloc_zeros::<i32>(plan.$i.max(1))?,)*
                    $($u: stream.alloc_zeros::<u32>(plan.$u.max(1))?,)*
                })
            }
        }
    };
}

arena_buffers!(
    f32: [
        pixels, x, h, q, k, v, raw, attn, proj, gate, up, act, lse, rstd, vision_out, logits,
        lp_state, logp, entropy, lse_out,
    ],
    i32: [patch_order, vpos, cu_window, cu_full, cu_text, merged_index, image_rows, resp_rows, tpos],
    u32: [ids, targets],
);

impl ArenaPlan {
    /// Buffer sizes of a forward of `shape` under `cfg`: each role is sized
    /// for the largest of its uses (vision blocks, merger, decoder, head).
    pub fn new(cfg: &ModelConfig, s: &ForwardShape) -> Self {
        let (vc, tc) = (&cfg.vision, &cfg.text);
        let (n, t) = (s.patches, s.tokens);
        let (vh, vi) = (vc.hidden_size, vc.intermediate_size);
        let merged = s.image_tokens;
        let merged_width = vh * vc.merge_unit();
        let (h, hd) = (tc.hidden_size, tc.head_dim);
        let (qw, kw) = (tc.num_heads * hd, tc.num_kv_heads * hd);
        let logit_rows = logit_chunk_rows(s.response, tc.vocab_size);
        ArenaPlan {
            pixels: n * vc.patch_dim(),
            x: (n * vh).max(t * h),
            h: (n * vh).max(t * h),
            q: (n * vh).max(t * qw),
            k: (n * vh).max(t * kw),
            v: (n * vh).max(t * kw),
            raw: (n * vh).max(t * qw.max(kw)),
            attn: (n * vh).max(t * qw),
            // Linear outputs: block projections, the merger's output, the
            // gathered response rows.
            proj: (n * vh)
                .max(merged * vc.out_hidden_size)
                .max(t * h)
                .max(s.response * h),
            // The merger's fc1 output and its GELU reuse gate and up.
            gate: (n * vi)
                .max(merged * merged_width)
                .max(t * tc.intermediate_size),
            up: (n * vi)
                .max(merged * merged_width)
                .max(t * tc.intermediate_size),
            act: (n * vi).max(t * tc.intermediate_size),
            lse: (n * vc.num_heads).max(t * tc.num_heads),
            rstd: n.max(t),
            vision_out: merged * vc.out_hidden_size,
            logits: logit_rows * tc.vocab_size,
            lp_state: logit_rows * LOGPROB_STATE_PER_ROW,
            logp: logit_rows,
            entropy: logit_rows,
            lse_out: logit_rows,
            patch_order: n,
            vpos: 2 * n,
            cu_window: s.windows + 1,
            cu_full: s.frames + 1,
            cu_text: s.seqs + 1,
            merged_index: merged,
            image_rows: merged,
            resp_rows: s.response,
            tpos: 3 * t,
            ids: t,
            targets: logit_rows,
        }
    }
}

/// Response rows per lm_head chunk (at least 1, at most `rows`).
pub fn logit_chunk_rows(rows: usize, vocab: usize) -> usize {
    (LOGIT_CHUNK_ELEMS / vocab.max(1)).clamp(1, rows.max(1))
}

/// Everything the host computes for one forward of one or more packed
/// sequences: positions, the vision window layout and the index arrays
/// the device reads.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub shape: ForwardShape,
    /// Each sequence's M-RoPE positions.
    pub positions: Vec<MropePositions>,
    /// `[3, T]`: the t, h, w streams back to back (sequences concatenated
    /// within each stream).
    pub text_positions: Vec<i32>,
    /// Token offsets of the packed sequences: `[0, T_1, T_1 + T_2, ...]`.
    pub cu_text: Vec<i32>,
    pub image_rows: Vec<i32>,
    /// Present when a sequence has images.
    pub vision: Option<VisionPlan>,
    /// Hidden rows predicting each response token, and those tokens.
    pub response_rows: Vec<i32>,
    pub targets: Vec<u32>,
    /// Scored tokens of each sequence.
    pub response_lens: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct VisionPlan {
    pub layout: VisionLayout,
    /// Processor-order patch index of each windowed position.
    pub patch_order: Vec<i32>,
    /// `[2, N]`: row then column of each patch, in windowed order.
    pub positions: Vec<i32>,
    /// Windowed position -> merged token (processor order).
    pub window_index: Vec<i32>,
}

fn to_i32s(v: impl IntoIterator<Item = usize>) -> Vec<i32> {
    v.into_iter().map(|x| x as i32).collect()
}

impl HostPlan {
    /// The plan of `input`, scoring the tokens from `prompt_len` on (none
    /// when `prompt_len` is `None`).
    pub fn new(
        cfg: &ModelConfig,
        input: &SequenceInput,
        prompt_len: Option<usize>,
    ) -> Result<Self, ModelError> {
        Self::packed(cfg, &[input], &[prompt_len])
    }

    /// The plan of `inputs` packed into one forward (all images through the
    /// vision tower together, each sequence its own positions and causal
    /// span, as `Qwen25Vl::forward_packed`), scoring sequence `i` from
    /// `prompt_lens[i]` on.
    pub fn packed(
        cfg: &ModelConfig,
        inputs: &[&SequenceInput],
        prompt_lens: &[Option<usize>],
    ) -> Result<Self, ModelError> {
        assert_eq!(
            inputs.len(),
            prompt_lens.len(),
            "one prompt length per input"
        );
        let vc = &cfg.vision;
        let pd = vc.patch_dim();
        let image_id = cfg.tokens.image_token_id;
        let mut positions = Vec::with_capacity(inputs.len());
        let (mut ids_len, mut patches) = (0usize, 0usize);
        let mut cu_text = vec![0i32];
        let mut image_rows = Vec::new();
        let mut grids = Vec::new();
        let (mut response_rows, mut targets, mut response_lens) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut streams: [Vec<i32>; 3] = Default::default();
        for (seq, (input, &prompt_len)) in inputs.iter().zip(prompt_lens).enumerate() {
            if input.pixel_values.len() % pd != 0 {
                return Err(ModelError::PixelShape {
                    len: input.pixel_values.len(),
                    patch_dim: pd,
                });
            }
            let t = input.ids.len();
            let pos = mrope_positions(&input.ids, image_id, &input.grids, vc.spatial_merge_size)?;
            for (stream, part) in streams.iter_mut().zip([&pos.t, &pos.h, &pos.w]) {
                stream.extend_from_slice(part);
            }
            positions.push(pos);
            let rows: Vec<usize> = (0..t).filter(|&i| input.ids[i] == image_id).collect();
            let n = input.pixel_values.len() / pd;
            let grid_patches: usize = input
                .grids
                .iter()
                .map(|g| g.iter().product::<usize>())
                .sum();
            let features = n / vc.merge_unit().max(1);
            // The CPU tower asserts the first; here both are input errors.
            if grid_patches != n || features != rows.len() {
                return Err(ModelError::ImageTokens {
                    tokens: rows.len(),
                    features,
                });
            }
            image_rows.extend(to_i32s(rows.iter().map(|r| ids_len + r)));
            grids.extend_from_slice(&input.grids);
            match prompt_len {
                Some(p) if p > 0 && p < t => {
                    response_rows.extend(to_i32s((p - 1..t - 1).map(|r| ids_len + r)));
                    targets.extend_from_slice(&input.ids[p..]);
                    response_lens.push(t - p);
                }
                Some(p) => {
                    return Err(ModelError::NoResponse {
                        seq,
                        prompt_len: p,
                        len: t,
                    })
                }
                None => response_lens.push(0),
            }
            ids_len += t;
            patches += n;
            cu_text.push(ids_len as i32);
        }
        let unit = vc.merge_unit();
        let vision = (!grids.is_empty()).then(|| {
            let layout = VisionLayout::new(&grids, vc.spatial_merge_size, vc.window_merged());
            let order = layout.patch_order(unit);
            let mut pos: Vec<i32> = order.iter().map(|&i| layout.rows[i]).collect();
            pos.extend(order.iter().map(|&i| layout.cols[i]));
            VisionPlan {
                patch_order: to_i32s(order.iter().copied()),
                positions: pos,
                window_index: to_i32s(layout.window_index.iter().copied()),
                layout,
            }
        });
        let shape = ForwardShape {
            seqs: inputs.len(),
            tokens: ids_len,
            patches,
            windows: vision.as_ref().map_or(0, |v| v.layout.cu_window.len() - 1),
            frames: vision.as_ref().map_or(0, |v| v.layout.cu_full.len() - 1),
            image_tokens: image_rows.len(),
            response: response_rows.len(),
        };
        Ok(Self {
            shape,
            positions,
            text_positions: streams.concat(),
            cu_text,
            image_rows,
            vision,
            response_rows,
            targets,
            response_lens,
        })
    }
}

/// What a device forward brings back to the host.
pub struct DeviceForward {
    pub positions: MropePositions,
    /// Final-norm hidden states `[T, hidden]`, when asked for.
    pub hidden: Option<Vec<f32>>,
    /// `[R, vocab]` logits of the scored rows.
    pub logits: Vec<f32>,
    /// `log p(token)` and the entropy at each scored row.
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// The model's weights on one device, plus its activation arena.
pub struct DeviceModel {
    pub(crate) core: DeviceWeights,
    arena: Option<Arena>,
    /// The patch-embed kernel's image processor, once set.
    images: Option<DeviceImages>,
    /// Gradients and the training arena, once training starts.
    pub(crate) train: Option<super::device_train::TrainState>,
    /// Arena (re)allocations so far (tests check reuse).
    pub arena_allocations: usize,
}

impl DeviceModel {
    /// Uploads every weight of `model` (fp32) to `gpu`, once.
    pub fn new(gpu: Arc<CudaBackend>, model: &Qwen25Vl) -> Result<Self, ModelError> {
        let s = gpu.stream().clone();
        let weights = model
            .weights
            .0
            .iter()
            .map(|w| s.clone_htod(w))
            .collect::<Result<Vec<_>, _>>()?;
        let (vc, tc) = (&model.config.vision, &model.config.text);
        let vision_rope = gpu.rope_freqs(&RopeFreqs::vision_2d(vc.head_dim(), vc.rope_theta))?;
        let text_rope = gpu.rope_freqs(&RopeFreqs::mrope(
            tc.mrope_section,
            tc.head_dim,
            tc.rope_theta,
        ))?;
        // Fail now, not mid-forward, when cuBLAS cannot be loaded.
        gpu.blas()?;
        Ok(Self {
            core: DeviceWeights {
                gpu,
                cfg: model.config.clone(),
                layout: model.layout.clone(),
                w: weights,
                vision_rope,
                text_rope,
            },
            arena: None,
            images: None,
            arena_allocations: 0,
            train: None,
        })
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.core.gpu
    }

    /// The arena's current plan (capacity), if any.
    pub fn arena_plan(&self) -> Option<&ArenaPlan> {
        self.arena.as_ref().map(|a| &a.plan)
    }

    /// Forward of one sequence; with `prompt_len`, the logits, log-probs
    /// and entropies of the tokens after the prompt (as `score` computes
    /// them); with `want_hidden`, the final hidden states too.
    pub fn forward(
        &mut self,
        input: &SequenceInput,
        prompt_len: Option<usize>,
        want_hidden: bool,
    ) -> Result<DeviceForward, ModelError> {
        self.forward_with(&[input], &[prompt_len], Pixels::Rows, want_hidden, true)
    }

    /// The response log-probs and entropies of `inputs` (each scored from
    /// its `prompt_lens` entry on) from ONE packed forward, sequences
    /// concatenated; with `want_logits`, their logits too.
    pub fn packed_logprobs(
        &mut self,
        inputs: &[&SequenceInput],
        prompt_lens: &[usize],
        want_logits: bool,
    ) -> Result<DeviceForward, ModelError> {
        let lens: Vec<Option<usize>> = prompt_lens.iter().map(|&p| Some(p)).collect();
        self.forward_with(inputs, &lens, Pixels::Rows, false, want_logits)
    }

    /// VPPO's fused dual pass: `input` and its patch-blackened twin (each
    /// patch with probability `p`, image `i` drawn from
    /// `rl::perturb::image_mask_seed(seed, i)`, as `perturb_images` on the
    /// host) through the vision tower and the decoder as ONE packed batch.
    /// The pixels of both come from the patch-embed kernel reading the
    /// resized image bytes; the mask is drawn inside it. Returns the
    /// original's then the twin's response rows (and logits with
    /// `want_logits`). Needs [`Self::set_image_processor`] and an input
    /// built from images (its `resized` bytes).
    pub fn dual_logprobs(
        &mut self,
        input: &SequenceInput,
        prompt_len: usize,
        seed: u64,
        p: f64,
        want_logits: bool,
    ) -> Result<DeviceForward, ModelError> {
        let images = self.images.take().ok_or(ModelError::NoImageProcessor)?;
        if input.resized.len() != input.grids.len() {
            self.images = Some(images);
            return Err(ModelError::NoResizedImages);
        }
        let pixels = Pixels::Dual {
            images: &images,
            seed,
            p,
        };
        let out = self.forward_with(
            &[input, input],
            &[Some(prompt_len), Some(prompt_len)],
            pixels,
            false,
            want_logits,
        );
        self.images = Some(images);
        out
    }

    /// [`Self::set_image_processor`] unless one is set.
    pub fn ensure_image_processor(&mut self, cfg: &ImageProcessorConfig) -> Result<(), ModelError> {
        match &self.images {
            Some(images) if images.cfg == *cfg => Ok(()),
            _ => self.set_image_processor(cfg),
        }
    }

    /// The image processor whose normalisation the patch-embed kernel
    /// applies (uploads its 768-entry table once).
    pub fn set_image_processor(&mut self, cfg: &ImageProcessorConfig) -> Result<(), ModelError> {
        let lut = self.core.gpu.patch_lut(cfg)?;
        self.images = Some(DeviceImages {
            cfg: cfg.clone(),
            lut,
        });
        Ok(())
    }

    fn forward_with(
        &mut self,
        inputs: &[&SequenceInput],
        prompt_lens: &[Option<usize>],
        pixels: Pixels<'_>,
        want_hidden: bool,
        want_logits: bool,
    ) -> Result<DeviceForward, ModelError> {
        let plan = HostPlan::packed(&self.core.cfg, inputs, prompt_lens)?;
        let need = ArenaPlan::new(&self.core.cfg, &plan.shape);
        self.ensure_arena(&need)?;
        let (run, arena) = self.run();
        run.forward(arena, inputs, &plan, pixels, want_hidden, want_logits)
    }

    /// Grows the arena (one allocation) unless it already covers `need`.
    pub fn ensure_arena(&mut self, need: &ArenaPlan) -> Result<(), ModelError> {
        let fits = self.arena.as_ref().is_some_and(|a| need.fits_in(&a.plan));
        if !fits {
            let cap = self.arena.as_ref().map_or(*need, |a| a.plan.max(need));
            // Free the old arena before allocating the larger one.
            self.arena = None;
            self.arena = Some(Arena::alloc(self.core.gpu.stream(), &cap)?);
            self.arena_allocations += 1;
        }
        Ok(())
    }

    /// The borrowed run state and the arena (allocated by `ensure_arena`).
    fn run(&mut self) -> (&DeviceWeights, &mut Arena) {
        let arena = self
            .arena
            .as_mut()
            .expect("arena allocated by ensure_arena");
        (&self.core, arena)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.core.cfg
    }

    /// Rollout prefill of one prompt: the full forward (vision tower
    /// included) writing every layer's roped K and V rows into `kv` at the
    /// token slots `slots` (one per prompt token); then `rows` copies of the
    /// last position's logits are sampled (see [`Self::sample_head`]).
    /// Returns the M-RoPE delta for decoding, the tokens and log-probs.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_sample(
        &mut self,
        kv: &mut DeviceKvCache,
        input: &SequenceInput,
        slots: &[i32],
        rows: usize,
        uniforms: &[f32],
        params: &SamplingParams,
        banned: &[u32],
    ) -> Result<(i64, Vec<u32>, Vec<f32>), ModelError> {
        let plan = HostPlan::new(&self.core.cfg, input, None)?;
        let t = plan.shape.tokens;
        assert_eq!(slots.len(), t, "one cache slot per prompt token");
        if t == 0 {
            return Err(ModelError::NoResponse {
                seq: 0,
                prompt_len: 0,
                len: 0,
            });
        }
        let need = ArenaPlan::new(&self.core.cfg, &plan.shape).max(&ArenaPlan::new(
            &self.core.cfg,
            &ForwardShape {
                tokens: 1,
                response: rows,
                ..Default::default()
            },
        ));
        self.ensure_arena(&need)?;
        kv.check_slots(slots)?;
        let (run, a) = self.run();
        run.gpu.stream().memcpy_htod(slots, &mut kv.slots)?;
        run.upload_and_decode(a, &[input], &plan, Pixels::Rows, Some(kv))?;
        let idx = vec![(t - 1) as i32; rows];
        let (tok, lp) = run.sample_head(a, kv, &idx, uniforms, params, banned)?;
        Ok((plan.positions[0].rope_delta, tok, lp))
    }

    /// One batched decode step: token `ids[b]` of sequence b at M-RoPE
    /// position `positions[b]` (all three streams), its K/V written at
    /// `slots[b]`, attending to `lens[b]` cached tokens (itself included)
    /// through the block tables `tables` (`[B, stride]`, from
    /// [`crate::backend::cuda::flatten_block_tables`]). Samples each row with `uniforms[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_sample(
        &mut self,
        kv: &mut DeviceKvCache,
        ids: &[u32],
        positions: &[i32],
        slots: &[i32],
        tables: &[i32],
        stride: usize,
        lens: &[i32],
        uniforms: &[f32],
        params: &SamplingParams,
        banned: &[u32],
    ) -> Result<(Vec<u32>, Vec<f32>), ModelError> {
        let b = ids.len();
        assert!(positions.len() == b && slots.len() == b && lens.len() == b);
        assert_eq!(tables.len(), b * stride);
        if b == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let need = ArenaPlan::new(
            &self.core.cfg,
            &ForwardShape {
                tokens: b,
                response: b,
                ..Default::default()
            },
        );
        self.ensure_arena(&need)?;
        kv.check_slots(slots)?;
        kv.check_tables(tables, b, stride)?;
        let (run, a) = self.run();
        let s = run.gpu.stream().clone();
        let tpos: Vec<i32> = positions.iter().cycle().take(3 * b).copied().collect();
        s.memcpy_htod(ids, &mut a.ids)?;
        s.memcpy_htod(&tpos, &mut a.tpos)?;
        s.memcpy_htod(slots, &mut kv.slots)?;
        s.memcpy_htod(tables, &mut kv.tables)?;
        s.memcpy_htod(lens, &mut kv.lens)?;
        let tc = &run.cfg.text;
        run.gpu.embedding_fwd(
            &a.ids,
            b,
            run.w(run.layout.text.embed),
            tc.vocab_size,
            tc.hidden_size,
            &mut a.x,
        )?;
        run.layers(a, b, Attn::Paged { stride }, Some(kv))?;
        let idx: Vec<i32> = (0..b as i32).collect();
        run.sample_head(a, kv, &idx, uniforms, params, banned)
    }
}

/// The image processor as the patch-embed kernel needs it.
pub(crate) struct DeviceImages {
    cfg: ImageProcessorConfig,
    lut: CudaSlice<f32>,
}

/// Where a forward's `pixel_values` rows come from.
#[derive(Clone, Copy)]
pub(crate) enum Pixels<'i> {
    /// Each input's f32 rows, uploaded.
    Rows,
    /// The fused dual pass ([`DeviceModel::dual_logprobs`]).
    Dual {
        images: &'i DeviceImages,
        seed: u64,
        p: f64,
    },
}

/// The weights on one device and what every forward reads with them (the
/// backend, config, layout and rope tables): the graph code's `self`.
pub(crate) struct DeviceWeights {
    pub(crate) gpu: Arc<CudaBackend>,
    pub(crate) cfg: ModelConfig,
    pub(crate) layout: ParamLayout,
    pub(crate) w: Vec<CudaSlice<f32>>,
    pub(crate) vision_rope: RopeFreqsDevice,
    pub(crate) text_rope: RopeFreqsDevice,
}

impl DeviceWeights {
    pub(crate) fn w(&self, id: ParamId) -> &CudaSlice<f32> {
        &self.w[id.0]
    }

    /// `out[rows, n] = x[rows, k] @ W^T (+ b)` with W (and b) possibly a row
    /// range of a fused weight: rows `r0 .. r0 + n` of `[*, k]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear<X: DevicePtr<f32>>(
        &self,
        x: &X,
        rows: usize,
        k: usize,
        n: usize,
        weight: ParamId,
        bias: Option<ParamId>,
        r0: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let wv = self.w(weight).slice(r0 * k..(r0 + n) * k);
        let bv = bias.map(|b| self.w(b).slice(r0..r0 + n));
        self.gpu.gemm(
            &GemmShape::linear(rows, k, n),
            1.0,
            x,
            &wv,
            0.0,
            &mut out.slice_mut(0..rows * n),
            bv.as_ref(),
        )
    }

    pub(crate) fn add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        self.gpu
            .add_inplace(&mut x.slice_mut(0..n), &y.slice(0..n), n)
    }

    fn forward(
        &self,
        a: &mut Arena,
        inputs: &[&SequenceInput],
        plan: &HostPlan,
        pixels: Pixels<'_>,
        want_hidden: bool,
        want_logits: bool,
    ) -> Result<DeviceForward, ModelError> {
        let s = self.gpu.stream().clone();
        let (t, h) = (plan.shape.tokens, self.cfg.text.hidden_size);
        self.upload_and_decode(a, inputs, plan, pixels, None)?;
        let hidden = if want_hidden {
            Some(s.clone_dtoh(&a.h.slice(0..t * h))?)
        } else {
            None
        };
        let (logits, logprobs, entropy) = self.head(a, plan, want_logits)?;
        s.synchronize()?;
        Ok(DeviceForward {
            positions: plan.positions[0].clone(),
            hidden,
            logits,
            logprobs,
            entropy,
        })
    }

    /// Index uploads (into the arena, no allocation), the vision tower,
    /// the embedding and the decoder over the packed `inputs`: leaves the
    /// final hidden states in `a.h`; with `kv`, each layer's K/V rows go
    /// to `kv.slots`.
    fn upload_and_decode(
        &self,
        a: &mut Arena,
        inputs: &[&SequenceInput],
        plan: &HostPlan,
        pixels: Pixels<'_>,
        kv: Option<&mut DeviceKvCache>,
    ) -> Result<(), ModelError> {
        let s = self.gpu.stream().clone();
        let sh = &plan.shape;
        if let Some(vp) = &plan.vision {
            match pixels {
                Pixels::Rows => {
                    let mut at = 0;
                    for input in inputs {
                        let n = input.pixel_values.len();
                        s.memcpy_htod(&input.pixel_values, &mut a.pixels.slice_mut(at..at + n))?;
                        at += n;
                    }
                }
                Pixels::Dual { images, seed, p } => {
                    self.embed_dual(a, inputs, images, seed, p)?;
                }
            }
            s.memcpy_htod(&vp.patch_order, &mut a.patch_order)?;
            s.memcpy_htod(&vp.positions, &mut a.vpos)?;
            s.memcpy_htod(&vp.layout.cu_window, &mut a.cu_window)?;
            s.memcpy_htod(&vp.layout.cu_full, &mut a.cu_full)?;
            s.memcpy_htod(&vp.window_index, &mut a.merged_index)?;
            s.memcpy_htod(&plan.image_rows, &mut a.image_rows)?;
            self.vision(a, vp, sh.patches)?;
        }
        let mut at = 0;
        for input in inputs {
            let n = input.ids.len();
            s.memcpy_htod(&input.ids, &mut a.ids.slice_mut(at..at + n))?;
            at += n;
        }
        s.memcpy_htod(&plan.text_positions, &mut a.tpos)?;
        s.memcpy_htod(&plan.cu_text, &mut a.cu_text)?;
        self.decoder(a, plan, kv)
    }

    /// The fused dual pass's pixels: `inputs` is `[x, x]`; the images of
    /// `x` are patch-embedded on the device from their resized bytes, the
    /// original rows into the first half of `a.pixels` and the
    /// patch-blackened twin (image `i` masked with
    /// `image_mask_seed(seed, i)`) into the second, in one kernel pass per
    /// image: the mask never exists on the host.
    fn embed_dual(
        &self,
        a: &mut Arena,
        inputs: &[&SequenceInput],
        images: &DeviceImages,
        seed: u64,
        p: f64,
    ) -> Result<(), ModelError> {
        let x = inputs[0];
        let pd = self.cfg.vision.patch_dim();
        let half = x.pixel_values.len();
        let s = self.gpu.stream().clone();
        let mut at = 0;
        for (i, (img, g)) in x.resized.iter().zip(&x.grids).enumerate() {
            let rows = g.iter().product::<usize>() * pd;
            let bytes = s.clone_htod(&img.data)?;
            let (mut first, mut second) = a.pixels.split_at_mut(half);
            self.gpu.patch_embed(
                &images.cfg,
                &images.lut,
                &bytes.slice(..),
                img.width,
                img.height,
                &mut first.slice_mut(at..at + rows),
                Some(PatchMask {
                    out: &mut second.slice_mut(at..at + rows),
                    seed: image_mask_seed(seed, i),
                    p,
                }),
            )?;
            at += rows;
        }
        Ok(())
    }

    /// Twin of `vision::vision_fwd`: leaves `[merged, out_hidden]` in
    /// `a.vision_out`, in processor (scatter) order.
    fn vision(&self, a: &mut Arena, vp: &VisionPlan, n: usize) -> Result<(), ModelError> {
        let vc = &self.cfg.vision;
        let p = &self.layout.vision;
        let (vh, vi, pd) = (vc.hidden_size, vc.intermediate_size, vc.patch_dim());
        let eps = vc.rms_norm_eps as f32;
        let heads = vc.num_heads;
        // Patch embed (Conv3d == matmul), then the window permutation.
        self.linear(&a.pixels, n, pd, vh, p.patch_embed, None, 0, &mut a.proj)?;
        self.gpu.gather_rows(
            &a.proj.slice(..),
            &a.patch_order.slice(..),
            n,
            vh,
            &mut a.x.slice_mut(..),
        )?;
        let attn_shape = |cu: &[i32]| {
            FlashAttnShape::of(&VarlenAttention {
                cu_seqlens_q: cu,
                cu_seqlens_k: cu,
                q_heads: heads,
                kv_heads: heads,
                head_dim: vc.head_dim(),
                causal: false,
                scale: 1.0 / (vc.head_dim() as f64).sqrt(),
            })
        };
        let window_shape = attn_shape(&vp.layout.cu_window)?;
        let full_shape = attn_shape(&vp.layout.cu_full)?;
        for (i, bp) in p.blocks.iter().enumerate() {
            let full = vc.fullatt_block_indexes.contains(&i);
            let shape = if full { &full_shape } else { &window_shape };
            self.gpu
                .rmsnorm_fwd(&a.x, self.w(bp.norm1), n, vh, eps, &mut a.h, &mut a.rstd)?;
            // Fused qkv rows: q | k | v.
            self.linear(&a.h, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), 0, &mut a.raw)?;
            self.gpu.rope(
                &self.vision_rope,
                &a.vpos,
                n,
                heads,
                false,
                &a.raw,
                &mut a.q,
            )?;
            self.linear(&a.h, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), vh, &mut a.raw)?;
            self.gpu.rope(
                &self.vision_rope,
                &a.vpos,
                n,
                heads,
                false,
                &a.raw,
                &mut a.k,
            )?;
            self.linear(&a.h, n, vh, vh, bp.qkv_w, Some(bp.qkv_b), 2 * vh, &mut a.v)?;
            let cu = if full { &a.cu_full } else { &a.cu_window };
            self.gpu
                .flash_attn_fwd(shape, &a.q, &a.k, &a.v, cu, cu, &mut a.attn, &mut a.lse)?;
            self.linear(
                &a.attn,
                n,
                vh,
                vh,
                bp.proj_w,
                Some(bp.proj_b),
                0,
                &mut a.proj,
            )?;
            self.add(&mut a.x, &a.proj, n * vh)?;
            self.gpu
                .rmsnorm_fwd(&a.x, self.w(bp.norm2), n, vh, eps, &mut a.h, &mut a.rstd)?;
            self.linear(&a.h, n, vh, vi, bp.gate_w, Some(bp.gate_b), 0, &mut a.gate)?;
            self.linear(&a.h, n, vh, vi, bp.up_w, Some(bp.up_b), 0, &mut a.up)?;
            self.gpu.swiglu_fwd(&a.gate, &a.up, n * vi, &mut a.act)?;
            self.linear(
                &a.act,
                n,
                vi,
                vh,
                bp.down_w,
                Some(bp.down_b),
                0,
                &mut a.proj,
            )?;
            self.add(&mut a.x, &a.proj, n * vh)?;
        }
        // Merger: ln_q per patch, [N, vh] read as [N / unit, unit * vh].
        let mp = &p.merger;
        let m = n / vc.merge_unit();
        let mw = vh * vc.merge_unit();
        let out = vc.out_hidden_size;
        self.gpu
            .rmsnorm_fwd(&a.x, self.w(mp.ln_q), n, vh, eps, &mut a.h, &mut a.rstd)?;
        self.linear(&a.h, m, mw, mw, mp.fc1_w, Some(mp.fc1_b), 0, &mut a.gate)?;
        self.gpu.gelu_fwd(&a.gate, m * mw, &mut a.up)?;
        self.linear(&a.up, m, mw, out, mp.fc2_w, Some(mp.fc2_b), 0, &mut a.proj)?;
        // Undo the window permutation: out[window_index[i]] = merged[i].
        self.gpu.scatter_rows(
            &a.proj.slice(..),
            &a.merged_index.slice(..),
            m,
            out,
            &mut a.vision_out.slice_mut(..),
        )?;
        Ok(())
    }

    /// Twin of embedding + image scatter + `text::decoder_fwd`: leaves the
    /// final-norm hidden states `[T, hidden]` in `a.h`.
    fn decoder(
        &self,
        a: &mut Arena,
        plan: &HostPlan,
        kv: Option<&mut DeviceKvCache>,
    ) -> Result<(), ModelError> {
        let tc = &self.cfg.text;
        let t = plan.shape.tokens;
        let h = tc.hidden_size;
        let hd = tc.head_dim;
        self.gpu.embedding_fwd(
            &a.ids,
            t,
            self.w(self.layout.text.embed),
            tc.vocab_size,
            h,
            &mut a.x,
        )?;
        let images = plan.image_rows.len();
        if images > 0 {
            self.gpu.scatter_rows(
                &a.vision_out.slice(..),
                &a.image_rows.slice(..),
                images,
                h,
                &mut a.x.slice_mut(..),
            )?;
        }
        let cu = &plan.cu_text;
        let shape = FlashAttnShape::of(&VarlenAttention {
            cu_seqlens_q: cu,
            cu_seqlens_k: cu,
            q_heads: tc.num_heads,
            kv_heads: tc.num_kv_heads,
            head_dim: hd,
            causal: true,
            scale: 1.0 / (hd as f64).sqrt(),
        })?;
        self.layers(a, t, Attn::Flash(&shape), kv)
    }

    /// The decoder layers and the final norm over `t` rows of `a.x` (whose
    /// M-RoPE positions are in `a.tpos`), into `a.h`. With `kv`, each
    /// layer's roped K and V rows are scattered to the cache slots
    /// `kv.slots`; paged attention reads them back from there.
    fn layers(
        &self,
        a: &mut Arena,
        t: usize,
        attn: Attn<'_>,
        mut kv: Option<&mut DeviceKvCache>,
    ) -> Result<(), ModelError> {
        let tc = &self.cfg.text;
        let p = &self.layout.text;
        let (h, inter, hd) = (tc.hidden_size, tc.intermediate_size, tc.head_dim);
        let (nh, nkv) = (tc.num_heads, tc.num_kv_heads);
        let (qw, kw) = (nh * hd, nkv * hd);
        let eps = tc.rms_norm_eps as f32;
        for (l, lp) in p.layers.iter().enumerate() {
            self.gpu.rmsnorm_fwd(
                &a.x,
                self.w(lp.input_norm),
                t,
                h,
                eps,
                &mut a.h,
                &mut a.rstd,
            )?;
            self.linear(&a.h, t, h, qw, lp.q_w, Some(lp.q_b), 0, &mut a.raw)?;
            self.gpu
                .rope(&self.text_rope, &a.tpos, t, nh, false, &a.raw, &mut a.q)?;
            self.linear(&a.h, t, h, kw, lp.k_w, Some(lp.k_b), 0, &mut a.raw)?;
            self.gpu
                .rope(&self.text_rope, &a.tpos, t, nkv, false, &a.raw, &mut a.k)?;
            self.linear(&a.h, t, h, kw, lp.v_w, Some(lp.v_b), 0, &mut a.v)?;
            if let Some(kv) = kv.as_deref_mut() {
                for (src, dst) in [(&a.k, &mut kv.k[l]), (&a.v, &mut kv.v[l])] {
                    self.gpu.scatter_rows(
                        &src.slice(..),
                        &kv.slots.slice(..),
                        t,
                        kw,
                        &mut dst.slice_mut(..),
                    )?;
                }
            }
            match attn {
                Attn::Flash(shape) => self.gpu.flash_attn_fwd(
                    shape,
                    &a.q,
                    &a.k,
                    &a.v,
                    &a.cu_text,
                    &a.cu_text,
                    &mut a.attn,
                    &mut a.lse,
                )?,
                Attn::Paged { stride } => {
                    let kv = kv.as_deref().expect("paged attention reads a KV cache");
                    self.gpu.paged_decode_attention(
                        &kv.shape(tc),
                        t,
                        &a.q,
                        &kv.k[l],
                        &kv.v[l],
                        &kv.tables,
                        stride,
                        &kv.lens,
                        &mut a.attn,
                    )?
                }
            }
            self.linear(&a.attn, t, qw, h, lp.o_w, None, 0, &mut a.proj)?;
            self.add(&mut a.x, &a.proj, t * h)?;
            self.gpu
                .rmsnorm_fwd(&a.x, self.w(lp.post_norm), t, h, eps, &mut a.h, &mut a.rstd)?;
            self.linear(&a.h, t, h, inter, lp.gate_w, None, 0, &mut a.gate)?;
            self.linear(&a.h, t, h, inter, lp.up_w, None, 0, &mut a.up)?;
            self.gpu.swiglu_fwd(&a.gate, &a.up, t * inter, &mut a.act)?;
            self.linear(&a.act, t, inter, h, lp.down_w, None, 0, &mut a.proj)?;
            self.add(&mut a.x, &a.proj, t * h)?;
        }
        self.gpu
            .rmsnorm_fwd(&a.x, self.w(p.norm), t, h, eps, &mut a.h, &mut a.rstd)?;
        Ok(())
    }

    /// lm_head on the rows `idx` of `a.h`, then sampling on the device, chunk
    /// by chunk (twin of `rollout::generate::sample_allowed` with the draw
    /// given): the banned ids are set to -inf in a copy of the logits, the
    /// sampling kernel picks with `uniforms[r]`, and the log-prob of the
    /// picked token comes from the log-prob kernel on the unmasked logits
    /// (the full distribution, as scoring gives it).
    fn sample_head(
        &self,
        a: &mut Arena,
        kv: &mut DeviceKvCache,
        idx: &[i32],
        uniforms: &[f32],
        params: &SamplingParams,
        banned: &[u32],
    ) -> Result<(Vec<u32>, Vec<f32>), ModelError> {
        let tc = &self.cfg.text;
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let r = idx.len();
        assert_eq!(uniforms.len(), r, "one uniform per sampled row");
        let s = self.gpu.stream().clone();
        let head = self.layout.text.lm_head.unwrap_or(self.layout.text.embed);
        let chunk = logit_chunk_rows(r, vocab);
        kv.ensure_sampling(&s, chunk, vocab, banned.len())?;
        let (mut tokens, mut logp) = (Vec::with_capacity(r), Vec::with_capacity(r));
        for c0 in (0..r).step_by(chunk) {
            let rows = chunk.min(r - c0);
            s.memcpy_htod(&idx[c0..c0 + rows], &mut a.resp_rows)?;
            self.gpu.gather_rows(
                &a.h.slice(..),
                &a.resp_rows.slice(..),
                rows,
                h,
                &mut a.proj.slice_mut(..),
            )?;
            self.gpu.gemm(
                &GemmShape::linear(rows, h, vocab),
                1.0,
                &a.proj.slice(0..rows * h),
                self.w(head),
                0.0,
                &mut a.logits.slice_mut(0..rows * vocab),
                None,
            )?;
            s.memcpy_dtod(
                &a.logits.slice(0..rows * vocab),
                &mut kv.sample_logits.slice_mut(0..rows * vocab),
            )?;
            let ban = ban_indices(rows, vocab, banned);
            if !ban.is_empty() {
                s.memcpy_htod(&ban, &mut kv.ban_idx)?;
                self.gpu.scatter_rows(
                    &kv.ban_val.slice(..),
                    &kv.ban_idx.slice(..),
                    ban.len(),
                    1,
                    &mut kv.sample_logits.slice_mut(..),
                )?;
            }
            s.memcpy_htod(&uniforms[c0..c0 + rows], &mut kv.uniforms)?;
            self.gpu.sample(
                &kv.sample_logits,
                rows,
                vocab,
                params,
                &kv.uniforms,
                &mut kv.tokens,
                &mut kv.sample_lp,
            )?;
            let picked: Vec<u32> = s
                .clone_dtoh(&kv.tokens.slice(0..rows))?
                .into_iter()
                .map(|t| t as u32)
                .collect();
            s.memcpy_htod(&picked, &mut a.targets)?;
            let lc = LogitChunk {
                rows,
                chunk_len: vocab,
                ld: vocab,
                vocab_offset: 0,
            };
            self.gpu
                .logprob_chunk(&lc, &a.logits, &a.targets, true, &mut a.lp_state)?;
            self.gpu.logprob_finish(
                &a.lp_state,
                rows,
                &mut a.logp,
                &mut a.entropy,
                &mut a.lse_out,
            )?;
            logp.extend(s.clone_dtoh(&a.logp.slice(0..rows))?);
            tokens.extend(picked);
        }
        Ok((tokens, logp))
    }

    /// lm_head on the scored rows, chunk by chunk: logits, then the
    /// log-prob / entropy kernels (twin of `lm_head_rows` +
    /// `cpu::logprob::token_logprob_fwd`).
    #[allow(clippy::type_complexity)]
    fn head(
        &self,
        a: &mut Arena,
        plan: &HostPlan,
        want_logits: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), ModelError> {
        let tc = &self.cfg.text;
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let r = plan.response_rows.len();
        if r == 0 {
            return Ok((Vec::new(), Vec::new(), Vec::new()));
        }
        let s = self.gpu.stream().clone();
        let head = self.layout.text.lm_head.unwrap_or(self.layout.text.embed);
        s.memcpy_htod(&plan.response_rows, &mut a.resp_rows)?;
        self.gpu.gather_rows(
            &a.h.slice(..),
            &a.resp_rows.slice(..),
            r,
            h,
            &mut a.proj.slice_mut(..),
        )?;
        let chunk = logit_chunk_rows(r, vocab);
        let (mut logits, mut logp, mut ent) = (
            Vec::with_capacity(if want_logits { r * vocab } else { 0 }),
            Vec::with_capacity(r),
            Vec::with_capacity(r),
        );
        for c0 in (0..r).step_by(chunk) {
            let rows = chunk.min(r - c0);
            s.memcpy_htod(&plan.targets[c0..c0 + rows], &mut a.targets)?;
            self.gpu.gemm(
                &GemmShape::linear(rows, h, vocab),
                1.0,
                &a.proj.slice(c0 * h..(c0 + rows) * h),
                self.w(head),
                0.0,
                &mut a.logits.slice_mut(0..rows * vocab),
                None,
            )?;
            let lc = LogitChunk {
                rows,
                chunk_len: vocab,
                ld: vocab,
                vocab_offset: 0,
            };
            self.gpu
                .logprob_chunk(&lc, &a.logits, &a.targets, true, &mut a.lp_state)?;
            self.gpu.logprob_finish(
                &a.lp_state,
                rows,
                &mut a.logp,
                &mut a.entropy,
                &mut a.lse_out,
            )?;
            if want_logits {
                logits.extend(s.clone_dtoh(&a.logits.slice(0..rows * vocab))?);
            }
            logp.extend(s.clone_dtoh(&a.logp.slice(0..rows))?);
            ent.extend(s.clone_dtoh(&a.entropy.slice(0..rows))?);
        }
        Ok((logits, logp, ent))
    }
}

/// How the decoder layers attend.
#[derive(Clone, Copy)]
enum Attn<'a> {
    /// Causal flash attention over the `T` rows themselves (prefill, score).
    Flash(&'a FlashAttnShape),
    /// One query per row against the paged KV cache (decode).
    Paged { stride: usize },
}

/// Flat indices `row * vocab + id` of the banned ids of `rows` logit rows
/// (ids outside the vocabulary are skipped, as the CPU does).
pub fn ban_indices(rows: usize, vocab: usize, banned: &[u32]) -> Vec<i32> {
    let ids: Vec<usize> = banned
        .iter()
        .map(|&b| b as usize)
        .filter(|&b| b < vocab)
        .collect();
    (0..rows)
        .flat_map(|r| ids.iter().map(move |&b| (r * vocab + b) as i32))
        .collect()
}

/// The rollout's paged KV cache on the device, laid out as
/// `kernels/paged_attn.cu` reads it: per layer `[blocks, block_size,
/// kv_heads, head_dim]` for K and for V (slot `s` = block `s / block_size`,
/// row `s % block_size`), plus the index buffers of one prefill or decode
/// step and the sampling scratch. Everything is allocated once per
/// generate call ([`Self::new`]); the block bookkeeping (tables, forks,
/// free list) stays on the host in `rollout::kv_cache::PagedKvCache`.
pub struct DeviceKvCache {
    pub block_size: usize,
    pub blocks: usize,
    /// Floats per token slot: kv_heads * head_dim.
    pub slot: usize,
    pub k: Vec<CudaSlice<f32>>,
    pub v: Vec<CudaSlice<f32>>,
    /// Cache slot of each row of the current step.
    slots: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    sample_logits: CudaSlice<f32>,
    ban_idx: CudaSlice<i32>,
    ban_val: CudaSlice<f32>,
    uniforms: CudaSlice<f32>,
    tokens: CudaSlice<i32>,
    sample_lp: CudaSlice<f32>,
}

impl DeviceKvCache {
    /// A cache of `blocks` blocks for `cfg`'s decoder; `max_rows` bounds
    /// the rows of one step (prompt tokens or batch), `max_table` the
    /// entries of all block tables of one decode step together.
    pub fn new(
        stream: &Arc<CudaStream>,
        cfg: &ModelConfig,
        block_size: usize,
        blocks: usize,
        max_rows: usize,
        max_table: usize,
    ) -> Result<Self, DriverError> {
        let tc = &cfg.text;
        let slot = tc.num_kv_heads * tc.head_dim;
        let n = (blocks * block_size * slot).max(1);
        let layer = || stream.alloc_zeros::<f32>(n);
        Ok(Self {
            block_size,
            blocks,
            slot,
            k: (0..tc.num_layers)
                .map(|_| layer())
                .collect::<Result<_, _>>()?,
            v: (0..tc.num_layers)
                .map(|_| layer())
                .collect::<Result<_, _>>()?,
            slots: stream.alloc_zeros(max_rows.max(1))?,
            tables: stream.alloc_zeros(max_table.max(1))?,
            lens: stream.alloc_zeros(max_rows.max(1))?,
            sample_logits: stream.alloc_zeros(1)?,
            ban_idx: stream.alloc_zeros(1)?,
            ban_val: stream.clone_htod(&[f32::NEG_INFINITY])?,
            uniforms: stream.alloc_zeros(1)?,
            tokens: stream.alloc_zeros(1)?,
            sample_lp: stream.alloc_zeros(1)?,
        })
    }

    fn shape(&self, tc: &super::config::TextConfig) -> PagedShape {
        PagedShape {
            block_size: self.block_size,
            q_heads: tc.num_heads,
            kv_heads: tc.num_kv_heads,
            head_dim: tc.head_dim,
            scale: 1.0 / (tc.head_dim as f32).sqrt(),
        }
    }

    /// Sizes the sampling scratch for `rows` rows (grows only).
    fn ensure_sampling(
        &mut self,
        s: &Arc<CudaStream>,
        rows: usize,
        vocab: usize,
        banned: usize,
    ) -> Result<(), DriverError> {
        if self.sample_logits.len() < rows * vocab {
            self.sample_logits = s.alloc_zeros(rows * vocab)?;
        }
        if self.ban_idx.len() < rows * banned {
            self.ban_idx = s.alloc_zeros(rows * banned)?;
            self.ban_val = s.clone_htod(&vec![f32::NEG_INFINITY; rows * banned])?;
        }
        if self.uniforms.len() < rows {
            self.uniforms = s.alloc_zeros(rows)?;
            self.tokens = s.alloc_zeros(rows)?;
            self.sample_lp = s.alloc_zeros(rows)?;
        }
        Ok(())
    }

    fn too_small(&self, what: String) -> ModelError {
        ModelError::Device(CudaError::Unsupported {
            kernel: "device kv cache",
            reason: what,
        })
    }

    fn check_slots(&self, slots: &[i32]) -> Result<(), ModelError> {
        let cap = self.blocks * self.block_size;
        if slots.len() > self.slots.len() {
            return Err(self.too_small(format!("{} rows > {}", slots.len(), self.slots.len())));
        }
        match slots.iter().find(|&&s| s < 0 || s as usize >= cap) {
            Some(s) => Err(self.too_small(format!("slot {s} outside {cap} slots"))),
            None => Ok(()),
        }
    }

    fn check_tables(&self, tables: &[i32], b: usize, stride: usize) -> Result<(), ModelError> {
        if b * stride > self.tables.len() || b > self.lens.len() {
            return Err(self.too_small(format!("block tables {b} x {stride}")));
        }
        match tables.iter().find(|&&t| t < 0 || t as usize >= self.blocks) {
            Some(t) => Err(self.too_small(format!("block {t} outside {}", self.blocks))),
            None => Ok(()),
        }
    }

    /// Copies block `src` to block `dst` in every layer (a fork's partial
    /// last block).
    pub fn copy_block(
        &mut self,
        s: &Arc<CudaStream>,
        src: usize,
        dst: usize,
    ) -> Result<(), DriverError> {
        let n = self.block_size * self.slot;
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let from = s.clone_dtod(&cache.slice(src * n..(src + 1) * n))?;
            s.memcpy_dtod(&from, &mut cache.slice_mut(dst * n..(dst + 1) * n))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use std::path::Path;

    fn fixture() -> (ModelConfig, SequenceInput) {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
        let cfg = ModelConfig::load(&dir).expect("fixture config");
        // A 4x6-patch image (2x3 merged tokens) between 2 and 3 text tokens.
        let img = cfg.tokens.image_token_id;
        let mut ids = vec![1, 2];
        ids.extend([img; 6]);
        ids.extend([3, 4, 5]);
        let input = SequenceInput {
            ids,
            pixel_values: vec![0.5; 24 * cfg.vision.patch_dim()],
            grids: vec![[1, 4, 6]],
            ..Default::default()
        };
        (cfg, input)
    }

    #[test]
    fn host_plan_matches_the_cpu_layout() {
        let (cfg, input) = fixture();
        let plan = HostPlan::new(&cfg, &input, Some(9)).unwrap();
        assert_eq!(
            plan.shape,
            ForwardShape {
                seqs: 1,
                tokens: 11,
                patches: 24,
                windows: 1,
                frames: 1,
                image_tokens: 6,
                response: 2,
            }
        );
        assert_eq!(plan.image_rows, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(plan.response_rows, vec![8, 9]);
        assert_eq!(plan.targets, vec![4, 5]);
        assert_eq!(plan.text_positions.len(), 3 * 11);
        assert_eq!(&plan.text_positions[..11], &plan.positions[0].t[..]);
        let vp = plan.vision.as_ref().unwrap();
        // Windows of 4x4 merged tokens cover the 2x3 image in one window,
        // so the permutation is the identity.
        assert_eq!(vp.patch_order, (0..24).collect::<Vec<_>>());
        assert_eq!(vp.positions.len(), 48);
        assert_eq!(&vp.positions[..4], &[0, 0, 1, 1]);
        assert_eq!(&vp.positions[24..28], &[0, 1, 0, 1]);
    }

    /// Two sequences packed: offsets, per-sequence positions (each starts
    /// over), both images through one vision layout.
    #[test]
    fn packed_host_plan_concatenates_the_sequences() {
        let (cfg, input) = fixture();
        let text = SequenceInput {
            ids: vec![9, 8, 7],
            ..Default::default()
        };
        let one = HostPlan::new(&cfg, &input, Some(9)).unwrap();
        let plan =
            HostPlan::packed(&cfg, &[&input, &text, &input], &[Some(9), Some(1), None]).unwrap();
        assert_eq!(plan.cu_text, vec![0, 11, 14, 25]);
        assert_eq!(plan.shape.seqs, 3);
        assert_eq!((plan.shape.patches, plan.shape.image_tokens), (48, 12));
        let second_image: Vec<i32> = one.image_rows.iter().map(|r| r + 14).collect();
        assert_eq!(
            plan.image_rows,
            [one.image_rows.clone(), second_image].concat()
        );
        assert_eq!(plan.response_rows, vec![8, 9, 11, 12]);
        assert_eq!(plan.targets, vec![4, 5, 8, 7]);
        assert_eq!(plan.response_lens, vec![2, 2, 0]);
        // Each stream holds the sequences back to back, each from its own origin.
        let t_stream = &plan.text_positions[..25];
        assert_eq!(&t_stream[..11], &one.positions[0].t[..]);
        assert_eq!(&t_stream[11..14], &[0, 1, 2]);
        assert_eq!(&t_stream[14..], &one.positions[0].t[..]);
        assert_eq!(plan.text_positions.len(), 75);
        let vp = plan.vision.as_ref().unwrap();
        assert_eq!(vp.layout.cu_full, vec![0, 24, 48]);
        assert_eq!(vp.patch_order.len(), 48);
        let err = HostPlan::packed(&cfg, &[&input, &text], &[Some(9), Some(3)]).unwrap_err();
        assert!(
            matches!(err, ModelError::NoResponse { seq: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn host_plan_rejects_mismatched_inputs() {
        let (cfg, mut input) = fixture();
        assert!(matches!(
            HostPlan::new(&cfg, &input, Some(11)),
            Err(ModelError::NoResponse { .. })
        ));
        input.pixel_values.pop();
        assert!(matches!(
            HostPlan::new(&cfg, &input, None),
            Err(ModelError::PixelShape { .. })
        ));
    }

    #[test]
    fn arena_plan_sizes_every_role_for_its_largest_use() {
        let (cfg, input) = fixture();
        let plan = HostPlan::new(&cfg, &input, Some(9)).unwrap();
        let a = ArenaPlan::new(&cfg, &plan.shape);
        let (vc, tc) = (&cfg.vision, &cfg.text);
        assert_eq!(a.pixels, 24 * vc.patch_dim());
        // Residual stream: 24 patches x 32 (768) over 11 tokens x 64 (704).
        assert_eq!(a.x, 768);
        // Gate: text MLP 11 x 128 (1408) over vision MLP 24 x 48 (1152) and
        // merger fc1 6 x 128 (768).
        assert_eq!(tc.intermediate_size, 128);
        assert_eq!(a.gate, 1408);
        // 24 patches x 2 heads (48) over 11 tokens x 4 heads (44).
        assert_eq!(a.lse, 48);
        assert_eq!(a.vision_out, 6 * 64);
        assert_eq!(a.logits, 2 * tc.vocab_size);
        assert_eq!((a.cu_window, a.cu_full, a.cu_text), (2, 2, 2));
        assert_eq!((a.ids, a.targets, a.tpos), (11, 2, 33));
        assert!(a.bytes() > 0);
    }

    #[test]
    fn arena_reuse_and_growth() {
        let (cfg, input) = fixture();
        let big = ArenaPlan::new(&cfg, &HostPlan::new(&cfg, &input, Some(9)).unwrap().shape);
        let text_only = SequenceInput {
            ids: vec![1, 2, 3, 4],
            ..Default::default()
        };
        let small = ArenaPlan::new(
            &cfg,
            &HostPlan::new(&cfg, &text_only, Some(2)).unwrap().shape,
        );
        assert!(small.fits_in(&big));
        assert!(!big.fits_in(&small));
        let long_text = SequenceInput {
            ids: vec![7; 100],
            ..Default::default()
        };
        let long = ArenaPlan::new(
            &cfg,
            &HostPlan::new(&cfg, &long_text, Some(50)).unwrap().shape,
        );
        assert!(!long.fits_in(&big));
        let both = big.max(&long);
        assert!(big.fits_in(&both) && long.fits_in(&both));
        assert_eq!(both.pixels, big.pixels);
        assert_eq!(both.ids, 100);
    }

    #[test]
    fn logit_chunks_bound_the_buffer() {
        assert_eq!(logit_chunk_rows(0, 384), 1);
        assert_eq!(logit_chunk_rows(7, 384), 7);
        assert_eq!(
            logit_chunk_rows(10_000, 151_936),
            LOGIT_CHUNK_ELEMS / 151_936
        );
    }
}
