//! Qwen2.5-VL as one object: load a checkpoint directory, run the forward on
//! a sequence with images.

use super::checkpoint::{Checkpoint, LoadError, NameLayout};
use super::config::{ConfigError, ModelConfig};
use super::params::{ParamLayout, Tensors};
use super::positions::{mrope_positions, MropePositions, PositionError};
use super::text::{decoder_fwd, lm_head_rows};
use super::vision::vision_fwd;
use crate::backend::cpu::embedding::embedding_fwd;
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
    #[error("the sequence has {tokens} image tokens but the images give {features} features")]
    ImageTokens { tokens: usize, features: usize },
    #[error("pixel_values has {len} values, not a multiple of the patch size {patch_dim}")]
    PixelShape { len: usize, patch_dim: usize },
}

/// One token sequence and its images (already processed).
#[derive(Debug, Clone, Default)]
pub struct SequenceInput {
    pub ids: Vec<u32>,
    /// Concatenated `[N, patch_dim]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// Patch grid `(t, h, w)` of each image.
    pub grids: Vec<[usize; 3]>,
}

/// Forward results of one sequence.
pub struct ForwardOutput {
    /// Final-norm hidden states `[T, hidden]`.
    pub hidden: Vec<f32>,
    pub positions: MropePositions,
    /// Vision tower + merger output `[image tokens, hidden]`, in scatter order.
    pub vision_embeds: Vec<f32>,
}

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
        let (tc, vc) = (&self.config.text, &self.config.vision);
        let h = tc.hidden_size;
        let t = input.ids.len();
        let mut x = vec![0.0; t * h];
        embedding_fwd(
            &input.ids,
            self.weights.get(self.layout.text.embed),
            h,
            &mut x,
        )?;

        let image_id = self.config.tokens.image_token_id;
        let image_rows: Vec<usize> = (0..t).filter(|&i| input.ids[i] == image_id).collect();
        let vision_embeds = if input.grids.is_empty() {
            Vec::new()
        } else {
            if input.pixel_values.len() % vc.patch_dim() != 0 {
                return Err(ModelError::PixelShape {
                    len: input.pixel_values.len(),
                    patch_dim: vc.patch_dim(),
                });
            }
            vision_fwd(
                vc,
                &self.layout.vision,
                &self.weights,
                &input.pixel_values,
                &input.grids,
                false,
            )?
            .0
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

        let positions = mrope_positions(&input.ids, image_id, &input.grids, vc.spatial_merge_size)?;
        let rope = RopeTable::mrope(
            [&positions.t, &positions.h, &positions.w],
            tc.mrope_section,
            tc.head_dim,
            tc.rope_theta,
        );
        let cu = [0, t as i32];
        let (hidden, _) = decoder_fwd(tc, &self.layout.text, &self.weights, x, &rope, &cu, false)?;
        Ok(ForwardOutput {
            hidden,
            positions,
            vision_embeds,
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
}
