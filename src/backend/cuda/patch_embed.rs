//! Launcher of the vision patch-embed kernel (`kernels/patch_embed.cu`). It
//! keeps the C signature it launches in a comment: kernel arguments are
//! untyped.

use super::launch_util::{need, to_i32, Elem};
use super::{CudaBackend, CudaError};
use crate::backend::desc::{patch_mask_threshold, PatchGeometry};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

/// The perturbed copy of a patch-embed call: its output and the draw.
pub struct PatchMask<'a, 'v, T> {
    pub out: &'a mut CudaViewMut<'v, T>,
    pub seed: u64,
    /// Probability of blackening each patch.
    pub p: f64,
}

impl CudaBackend {
    /// Uploads an image processor's per-channel normalisation table
    /// (`processor::image::normalize_lut`, 768 floats), once per processor.
    pub fn patch_lut(&self, lut: &[[f32; 256]; 3]) -> Result<CudaSlice<f32>, CudaError> {
        let flat: Vec<f32> = lut.concat();
        Ok(self.stream.clone_htod(&flat)?)
    }

    /// Twin of `processor::image::patchify` on a resized `[height, width, 3]`
    /// uint8 image already on the device (`lut` from [`Self::patch_lut`]),
    /// writing `pixel_values[N, 3*T*P*P]`; with `mask`, also the twin of
    /// `rl::perturb::blacken_patches` applied to a copy, in the same
    /// pass over the image.
    /// With `T = bf16` the outputs are the f32 values rounded to bf16 (the
    /// GEMM operand).
    // patch_embed_u8_{f32,bf16}(const unsigned char* img, int width, int height,
    //     const float* lut, T* out, T* out_masked, int patch, int merge,
    //     int temporal, unsigned long long seed, unsigned threshold)
    #[allow(clippy::too_many_arguments)]
    pub fn patch_embed<T: Elem>(
        &self,
        geom: &PatchGeometry,
        lut: &CudaSlice<f32>,
        img: &CudaView<'_, u8>,
        width: usize,
        height: usize,
        out: &mut CudaViewMut<'_, T>,
        mask: Option<PatchMask<'_, '_, T>>,
    ) -> Result<(), CudaError> {
        const K: &str = "patch_embed";
        let (p, m, t) = (geom.patch, geom.merge, geom.temporal);
        let factor = p * m;
        if p == 0 || m == 0 || t == 0 || width % factor != 0 || height % factor != 0 {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: format!(
                    "{width}x{height} is not a multiple of patch*merge = {factor} (or the config is empty)"
                ),
            });
        }
        let patches = (width / p) * (height / p);
        let features = 3 * t * p * p;
        need(K, "img", img.len(), width * height * 3)?;
        need(K, "lut", lut.len(), 3 * 256)?;
        need(K, "out", out.len(), patches * features)?;
        if patches == 0 {
            return Ok(());
        }
        let (w_i, h_i) = (to_i32(K, "width", width)?, to_i32(K, "height", height)?);
        let (p_i, m_i, t_i) = (
            to_i32(K, "patch", p)?,
            to_i32(K, "merge", m)?,
            to_i32(K, "temporal", t)?,
        );
        let f = self.function("patch_embed", &format!("patch_embed_u8_{}", T::SUFFIX))?;
        let cfg_launch = LaunchConfig {
            grid_dim: (patches as u32, 1, 1),
            block_dim: (features.next_multiple_of(32).min(1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        let (seed, threshold) = mask
            .as_ref()
            .map_or((0, 0), |mk| (mk.seed, patch_mask_threshold(mk.p)));
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(img).arg(&w_i).arg(&h_i).arg(lut).arg(out);
        match mask {
            Some(mk) => {
                need(K, "masked out", mk.out.len(), patches * features)?;
                launch.arg(mk.out);
            }
            None => {
                launch.arg(&null);
            }
        }
        launch
            .arg(&p_i)
            .arg(&m_i)
            .arg(&t_i)
            .arg(&seed)
            .arg(&threshold);
        // SAFETY: matches the C signature above (a null u64 stands for a null
        // float*); img holds width*height*3 bytes, lut 768 floats, the outputs
        // patches*features floats; one block per patch.
        unsafe { launch.launch(cfg_launch) }?;
        Ok(())
    }
}
