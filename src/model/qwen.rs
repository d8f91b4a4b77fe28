//! Qwen2.5-VL as one object: load a checkpoint directory, run the forward on
//! packed sequences with images, and (for training) the chunked loss head
//! and the backward through the whole graph.

use super::acts::Save;
use super::checkpoint::{Checkpoint, LoadError, NameLayout};
use super::config::{ConfigError, ModelConfig};
use super::params::{ParamLayout, Tensors};
use super::positions::{mrope_positions, MropePositions, PositionError};
use super::text::{decoder_bwd, decoder_fwd, lm_head_rows, KvSink, TextActs};
use super::vision::{vision_bwd, vision_fwd, VisionActs};
use crate::backend::cpu::embedding::{embedding_bwd, embedding_fwd};
use crate::backend::cpu::gemm::{matmul, Trans};
use crate::backend::cpu::kl::softmax_kl_fwd;
use crate::backend::cpu::logprob::{token_logprob_bwd, token_logprob_fwd};
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cpu::OpError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("checkpoint directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Positions(#[from] PositionError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("the batch has {tokens} image tokens but the images give {features} features")]
    ImageTokens { tokens: usize, features: usize },
    #[error("pixel_values has {len} values, not a multiple of the patch size {patch_dim}")]
    PixelShape { len: usize, patch_dim: usize },
    #[error("sequence {seq}: prompt length {prompt_len} leaves no response in {len} tokens")]
    NoResponse {
        seq: usize,
        prompt_len: usize,
        len: usize,
    },
    #[error("the two forwards compared by response_kl score different tokens")]
    ForwardsDiffer,
    #[error("loss gradients have {found} entries for {expected} response tokens")]
    GradLength { expected: usize, found: usize },
    #[error("device backward called without a training forward before it")]
    NoPendingForward,
    #[error(
        "the device optimizer keeps fp32 weights; with bf16 model weights AdamW runs on the host"
    )]
    DeviceOptimizer,
    #[error("the fused dual pass needs the image processor on the device (set_image_processor)")]
    NoImageProcessor,
    #[error(
        "the fused dual pass needs the resized image bytes of the input (build it from images)"
    )]
    NoResizedImages,
    #[error("CUDA device: {0}")]
    Device(#[from] crate::backend::cuda::CudaError),
}

impl From<cudarc::driver::DriverError> for ModelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Device(e.into())
    }
}

/// One token sequence and its images (already processed).
#[derive(Debug, Clone, Default)]
pub struct SequenceInput {
    pub ids: Vec<u32>,
    /// Concatenated `[N, patch_dim]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// Patch grid `(t, h, w)` of each image.
    pub grids: Vec<[usize; 3]>,
    /// Each image after smart_resize, as 8-bit RGB (empty when the input
    /// was built from `pixel_values` alone): the GPU embeds patches, and
    /// draws VPPO's perturbed copy, straight from these bytes.
    pub resized: Vec<crate::processor::image::RgbImage>,
}

/// Forward results of one sequence.
pub struct ForwardOutput {
    /// Final-norm hidden states `[T, hidden]`.
    pub hidden: Vec<f32>,
    pub positions: MropePositions,
    /// Vision tower + merger output `[image tokens, hidden]`, in scatter order.
    pub vision_embeds: Vec<f32>,
}

/// A forward over packed sequences, with what a backward needs.
pub struct PackedForward {
    pub ids: Vec<u32>,
    pub cu_seqlens: Vec<i32>,
    pub positions: Vec<MropePositions>,
    pub hidden: Vec<f32>,
    pub vision_embeds: Vec<f32>,
    /// Packed rows holding image tokens, in scatter order.
    pub image_rows: Vec<usize>,
    pixel_values: Vec<f32>,
    rope: RopeTable<f32>,
    vision_acts: Option<VisionActs>,
    text_acts: Option<TextActs>,
}

/// A training sequence: the model input and where its response starts.
#[derive(Debug, Clone)]
pub struct TrainSequence {
    pub input: SequenceInput,
    pub prompt_len: usize,
}

/// The loss head's forward over all response tokens of a batch.
pub struct TrainForward {
    pub packed: PackedForward,
    /// `log p(token)` of every response token, sequences concatenated.
    pub logprobs: Vec<f32>,
    /// Entropy of the next-token distribution at the same positions.
    pub entropy: Vec<f32>,
    /// Response tokens per sequence.
    pub response_lens: Vec<usize>,
    rows: Vec<usize>,
    targets: Vec<u32>,
    lse: Vec<f32>,
}

/// Response rows per lm_head chunk: bounds the `[rows, vocab]` logits held
/// at once (training never holds the full `[T, vocab]`).
const LOSS_CHUNK_ROWS: usize = 256;

pub struct Qwen25Vl {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub weights: Tensors,
    /// The weight-name layout of the checkpoint it came from.
    pub names: NameLayout,
}

impl Qwen25Vl {
    /// Loads `config.json` and the weights of a Hugging Face checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotADirectory(dir.to_path_buf()));
        }
        let config = ModelConfig::load(dir)?;
        let layout = ParamLayout::new(&config);
        let ckpt = Checkpoint::open(dir)?;
        let weights = ckpt.load_params(&layout)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            layout,
            weights,
            names: ckpt.layout,
        })
    }

    /// Runs vision tower, image scatter and decoder on one sequence.
    pub fn forward(&self, input: &SequenceInput) -> Result<ForwardOutput, ModelError> {
        let packed = self.forward_packed(std::slice::from_ref(input), Save::Nothing)?;
        Ok(ForwardOutput {
            hidden: packed.hidden,
            positions: packed.positions.into_iter().next().expect("one sequence"),
            vision_embeds: packed.vision_embeds,
        })
    }

    /// Forward over several sequences packed into one batch (no padding):
    /// all images go through the vision tower together, each sequence gets
    /// its own M-RoPE positions and causal attention span.
    pub fn forward_packed(
        &self,
        seqs: &[SequenceInput],
        save: Save,
    ) -> Result<PackedForward, ModelError> {
        self.forward_packed_kv(seqs, save, None)
    }

    /// [`Self::forward_packed`], handing each layer's post-RoPE keys and
    /// values to `kv_sink` (prefill of a KV cache).
    pub fn forward_packed_kv(
        &self,
        seqs: &[SequenceInput],
        save: Save,
        kv_sink: Option<KvSink>,
    ) -> Result<PackedForward, ModelError> {
        let (tc, vc) = (&self.config.text, &self.config.vision);
        let h = tc.hidden_size;
        let mut ids = Vec::new();
        let mut cu_seqlens = vec![0i32];
        let mut pixel_values = Vec::new();
        let mut grids = Vec::new();
        let mut positions = Vec::with_capacity(seqs.len());
        let image_id = self.config.tokens.image_token_id;
        for s in seqs {
            if s.pixel_values.len() % vc.patch_dim() != 0 {
                return Err(ModelError::PixelShape {
                    len: s.pixel_values.len(),
                    patch_dim: vc.patch_dim(),
                });
            }
            positions.push(mrope_positions(
                &s.ids,
                image_id,
                &s.grids,
                vc.spatial_merge_size,
            )?);
            ids.extend_from_slice(&s.ids);
            cu_seqlens.push(ids.len() as i32);
            pixel_values.extend_from_slice(&s.pixel_values);
            grids.extend_from_slice(&s.grids);
        }
        let t = ids.len();
        let mut x = vec![0.0; t * h];
        embedding_fwd(&ids, self.weights.get(self.layout.text.embed), h, &mut x)?;
        let image_rows: Vec<usize> = (0..t).filter(|&i| ids[i] == image_id).collect();
        let (vision_embeds, vision_acts) = if grids.is_empty() {
            (Vec::new(), None)
        } else {
            vision_fwd(
                vc,
                &self.layout.vision,
                &self.weights,
                &pixel_values,
                &grids,
                save,
            )?
        };
        let features = vision_embeds.len() / h;
        if features != image_rows.len() {
            return Err(ModelError::ImageTokens {
                tokens: image_rows.len(),
                features,
            });
        }
        for (k, &row) in image_rows.iter().enumerate() {
            x[row * h..(row + 1) * h].copy_from_slice(&vision_embeds[k * h..(k + 1) * h]);
        }
        let stream = |f: fn(&MropePositions) -> &Vec<i32>| -> Vec<i32> {
            positions
                .iter()
                .flat_map(|p| f(p).iter().copied())
                .collect()
        };
        let (pt, ph, pw) = (stream(|p| &p.t), stream(|p| &p.h), stream(|p| &p.w));
        let rope = RopeTable::mrope(
            [&pt, &ph, &pw],
            tc.mrope_section,
            tc.head_dim,
            tc.rope_theta,
        );
        let (hidden, text_acts) = decoder_fwd(
            tc,
            &self.layout.text,
            &self.weights,
            x,
            &rope,
            &cu_seqlens,
            save,
            kv_sink,
        )?;
        Ok(PackedForward {
            ids,
            cu_seqlens,
            positions,
            hidden,
            vision_embeds,
            image_rows,
            pixel_values,
            rope,
            vision_acts,
            text_acts,
        })
    }

    /// Logits of the selected rows of a forward's hidden states.
    pub fn logits(&self, out: &ForwardOutput, rows: &[usize]) -> Vec<f32> {
        lm_head_rows(
            &self.config.text,
            &self.layout.text,
            &self.weights,
            &out.hidden,
            rows,
        )
    }

    fn head(&self) -> &[f32] {
        let t = &self.layout.text;
        self.weights.get(t.lm_head.unwrap_or(t.embed))
    }

    /// Training forward: packed forward keeping activations (`save`), then
    /// log-prob and entropy of every response token, chunk by chunk over
    /// the vocabulary head.
    pub fn train_forward(
        &self,
        batch: &[TrainSequence],
        save: Save,
    ) -> Result<TrainForward, ModelError> {
        let inputs: Vec<SequenceInput> = batch.iter().map(|s| s.input.clone()).collect();
        let packed = self.forward_packed(&inputs, save)?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut response_lens = Vec::with_capacity(batch.len());
        for (i, s) in batch.iter().enumerate() {
            let start = packed.cu_seqlens[i] as usize;
            let len = s.input.ids.len();
            if s.prompt_len == 0 || s.prompt_len >= len {
                return Err(ModelError::NoResponse {
                    seq: i,
                    prompt_len: s.prompt_len,
                    len,
                });
            }
            for pos in s.prompt_len..len {
                rows.push(start + pos - 1);
                targets.push(s.input.ids[pos]);
            }
            response_lens.push(len - s.prompt_len);
        }
        let n = rows.len();
        let (mut logprobs, mut entropy, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let tc = &self.config.text;
        for c0 in (0..n).step_by(LOSS_CHUNK_ROWS) {
            let c1 = (c0 + LOSS_CHUNK_ROWS).min(n);
            let logits = lm_head_rows(
                tc,
                &self.layout.text,
                &self.weights,
                &packed.hidden,
                &rows[c0..c1],
            );
            token_logprob_fwd(
                &logits,
                tc.vocab_size,
                &targets[c0..c1],
                &mut logprobs[c0..c1],
                &mut entropy[c0..c1],
                &mut lse[c0..c1],
            )?;
        }
        Ok(TrainForward {
            packed,
            logprobs,
            entropy,
            response_lens,
            rows,
            targets,
            lse,
        })
    }

    /// Exact per-token KL(p_a || p_b) over the full vocabulary between the
    /// next-token distributions of two training forwards of the same tokens
    /// (VPPO's dependency with the original and the perturbed image),
    /// chunk by chunk over the head: never both `[T, vocab]` logits at once.
    pub fn response_kl(&self, a: &TrainForward, b: &TrainForward) -> Result<Vec<f32>, ModelError> {
        if a.targets != b.targets || a.response_lens != b.response_lens {
            return Err(ModelError::ForwardsDiffer);
        }
        let n = a.rows.len();
        let tc = &self.config.text;
        let mut kl = vec![0.0; n];
        for c0 in (0..n).step_by(LOSS_CHUNK_ROWS) {
            let c1 = (c0 + LOSS_CHUNK_ROWS).min(n);
            let logits = |f: &TrainForward| {
                lm_head_rows(
                    tc,
                    &self.layout.text,
                    &self.weights,
                    &f.packed.hidden,
                    &f.rows[c0..c1],
                )
            };
            let (la, lb) = (logits(a), logits(b));
            let (mut lse_a, mut lse_b) = (vec![0.0; c1 - c0], vec![0.0; c1 - c0]);
            softmax_kl_fwd(
                &la,
                &lb,
                tc.vocab_size,
                &mut kl[c0..c1],
                &mut lse_a,
                &mut lse_b,
            );
        }
        Ok(kl)
    }

    /// Backward of a loss given as its gradient w.r.t. each response
    /// token's log-prob and entropy (`d_logprob`, `d_entropy`, in
    /// [`TrainForward::logprobs`] order): GRPO/VPPO losses are a weighting,
    /// not new graph code. Accumulates every parameter's gradient into `grads`.
    pub fn train_backward(
        &self,
        fwd: &TrainForward,
        d_logprob: &[f32],
        d_entropy: &[f32],
        grads: &mut Tensors,
    ) -> Result<(), ModelError> {
        let n = fwd.rows.len();
        for found in [d_logprob.len(), d_entropy.len()] {
            if found != n {
                return Err(ModelError::GradLength { expected: n, found });
            }
        }
        let (tc, vc) = (&self.config.text, &self.config.vision);
        let (h, vocab) = (tc.hidden_size, tc.vocab_size);
        let packed = &fwd.packed;
        let head_id = self.layout.text.lm_head.unwrap_or(self.layout.text.embed);
        // Loss head, chunk by chunk: recompute the chunk's logits, take their
        // gradient, push it through the head.
        let mut d_hidden = vec![0.0; packed.hidden.len()];
        for c0 in (0..n).step_by(LOSS_CHUNK_ROWS) {
            let c1 = (c0 + LOSS_CHUNK_ROWS).min(n);
            let rows = &fwd.rows[c0..c1];
            let m = rows.len();
            let mut hidden_rows = Vec::with_capacity(m * h);
            for &r in rows {
                hidden_rows.extend_from_slice(&packed.hidden[r * h..(r + 1) * h]);
            }
            let mut logits = vec![0.0; m * vocab];
            matmul(
                m,
                h,
                vocab,
                1.0,
                &hidden_rows,
                Trans::No,
                self.head(),
                Trans::Yes,
                0.0,
                &mut logits,
            );
            let mut d_logits = vec![0.0; m * vocab];
            token_logprob_bwd(
                &logits,
                vocab,
                &fwd.targets[c0..c1],
                &fwd.lse[c0..c1],
                &fwd.entropy[c0..c1],
                &d_logprob[c0..c1],
                &d_entropy[c0..c1],
                &mut d_logits,
            );
            drop(logits);
            let mut d_rows = vec![0.0; m * h];
            matmul(
                m,
                vocab,
                h,
                1.0,
                &d_logits,
                Trans::No,
                self.head(),
                Trans::No,
                0.0,
                &mut d_rows,
            );
            matmul(
                vocab,
                m,
                h,
                1.0,
                &d_logits,
                Trans::Yes,
                &hidden_rows,
                Trans::No,
                1.0,
                grads.get_mut(head_id),
            );
            for (k, &r) in rows.iter().enumerate() {
                for (a, b) in d_hidden[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&d_rows[k * h..(k + 1) * h])
                {
                    *a += b;
                }
            }
        }
        let text_acts = packed
            .text_acts
            .as_ref()
            .expect("train_forward keeps decoder activations");
        let d_embeds = decoder_bwd(
            tc,
            &self.layout.text,
            &self.weights,
            text_acts,
            &packed.rope,
            &packed.cu_seqlens,
            &d_hidden,
            grads,
        )?;
        // Image rows were replaced by vision features: their gradient goes to
        // the vision tower, the embedding rows of image tokens get none.
        let mut d_vision = vec![0.0; packed.image_rows.len() * h];
        let mut is_image = vec![false; packed.ids.len()];
        for (k, &r) in packed.image_rows.iter().enumerate() {
            d_vision[k * h..(k + 1) * h].copy_from_slice(&d_embeds[r * h..(r + 1) * h]);
            is_image[r] = true;
        }
        let (text_ids, text_grads): (Vec<u32>, Vec<f32>) = {
            let mut ids = Vec::new();
            let mut g = Vec::new();
            for (i, &id) in packed.ids.iter().enumerate() {
                if !is_image[i] {
                    ids.push(id);
                    g.extend_from_slice(&d_embeds[i * h..(i + 1) * h]);
                }
            }
            (ids, g)
        };
        embedding_bwd(
            &text_ids,
            &text_grads,
            h,
            grads.get_mut(self.layout.text.embed),
        )?;
        if let Some(vacts) = &packed.vision_acts {
            vision_bwd(
                vc,
                &self.layout.vision,
                &self.weights,
                vacts,
                &packed.pixel_values,
                &d_vision,
                grads,
            )?;
        }
        Ok(())
    }
}
